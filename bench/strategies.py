"""Migration strategies the research bench compares, each driving the real
tools between the two namespaces of a Trial.

A strategy's migrate(trial) moves trial.workload.host_pid from the source
namespace to the destination one and returns an Outcome; it raises
StrategyError when it cannot (the source then keeps running, or CRIU
resumed it). Phase times are wall-clock seconds measured here.

- criu-stop-copy    criu dump; copy the images over the link; criu restore.
- criu-lazy-restore criu dump; copy the images; criu restore --lazy-pages
                    served by the stock `criu lazy-pages` from the copied images.
- criu-post-copy    criu dump --lazy-pages (memory stays on the source, its
                    page server serves it); copy the other images; restore
                    with `criu lazy-pages --page-server` fetching over the link.
- criu-floor        criu-post-copy with the page server reached over an
                    unshaped veth: what freeze, dump and restore cost when
                    the memory is as good as local. Nothing can beat it by
                    much: it is CRIU's own share of any blackout.
- criu-pre-dump     criu pre-dump --track-mem, copy; criu dump
                    --prev-images-dir, copy the rest; criu restore. Needs
                    soft-dirty: where the kernel lacks it, its failure and
                    CRIU's reason are its result.
- hybridmig         `hybridmig serve` on the destination, `hybridmig run`.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from dataclasses import dataclass, field

from hybridmig.criu.command import CRIU_LOG_LEVEL, criu_binary
from hybridmig.keys import generate_key

from .trial import StrategyError, Trial, log_tail

PY = sys.executable
HYBRIDMIG = os.path.join(os.path.dirname(sys.executable), "hybridmig")
COPY_PORT, PAGE_PORT, SERVE_PORT = 7801, 7802, 7803


@dataclass
class Outcome:
    new_pid: int
    phases: dict  # name -> seconds, in order
    resumed_at: float  # time.time() once the restore returned
    extra: dict = field(default_factory=dict)  # remote_faults, rounds, ...


def _wait_line(proc, stream, needle: str, timeout: float, what: str) -> None:
    """Wait until ``stream`` (a pipe of proc) prints ``needle``."""
    deadline = time.monotonic() + timeout
    buf = b""
    while needle.encode() not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise StrategyError(
                "{} did not start ({})".format(
                    what, f"exit {proc.returncode}" if proc.returncode is not None else "timeout"
                )
            )
        if select.select([stream], [], [], min(left, 0.1))[0]:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                continue
            buf += chunk


def _status_fd_wait(rfd: int, proc, timeout: float, what: str, log) -> None:
    """CRIU writes one byte to --status-fd once it listens."""
    ready = select.select([rfd], [], [], timeout)[0]
    data = os.read(rfd, 1) if ready else b""
    os.close(rfd)
    if not data:
        raise StrategyError(f"{what} is not ready: {log_tail(log)}")


class Strategy:
    name = "?"
    container = False  # migrates a container workload (PodmanMemwork), and nothing else

    def migrate(self, trial: Trial) -> Outcome:
        raise NotImplementedError

    # --- steps shared by the CRIU strategies ---------------------------------------------
    @staticmethod
    def dump(trial: Trial, images, *opts) -> None:
        os.makedirs(images, exist_ok=True)
        trial.run(
            "src",
            [
                criu_binary(),
                "dump",
                "-t",
                trial.workload.host_pid,
                "-D",
                images,
                "-o",
                "dump.log",
                CRIU_LOG_LEVEL,
                *trial.workload.criu_opts(),
                *opts,
            ],
            "criu-dump.out",
            "criu dump",
            criu_log=os.path.join(images, "dump.log"),
        )

    @staticmethod
    def copy(trial: Trial, src_dir, dst_dir, tag="") -> None:
        """The images over the (shaped) link, with bench/imagecopy.py."""
        addr = "%s:%d" % (trial.hosts.dst_addr, COPY_PORT)
        recv = trial.spawn(
            "dst", [PY, "-m", "hybridmig.bench.imagecopy", "recv", addr, dst_dir], f"copy-recv{tag}.log", stdout=-1
        )
        _wait_line(recv, recv.stdout, "listening", 30, "the image receiver")
        trial.run(
            "src",
            [PY, "-m", "hybridmig.bench.imagecopy", "send", addr, src_dir],
            f"copy-send{tag}.log",
            "copying the images",
        )
        if trial.wait(recv, 60, "the image receiver") != 0:
            raise StrategyError("the image receiver failed: {}".format(log_tail(trial.logs / (f"copy-recv{tag}.log"))))
        recv.stdout.close()

    @staticmethod
    def restore(trial: Trial, images, *opts) -> int:
        pidfile = os.path.join(images, "restore.pid")
        trial.run(
            "dst",
            [
                criu_binary(),
                "restore",
                "-D",
                images,
                "-W",
                images,
                "-d",
                "--pidfile",
                pidfile,
                "-o",
                "restore.log",
                CRIU_LOG_LEVEL,
                *trial.workload.criu_opts(),
                *opts,
            ],
            "criu-restore.out",
            "criu restore",
            criu_log=os.path.join(images, "restore.log"),
        )
        with open(pidfile) as f:
            pid = int(f.read())
        trial.restored.append(pid)
        return pid


class StopAndCopy(Strategy):
    name = "criu-stop-copy"
    restore_opts = ()

    def migrate(self, trial):
        src, dst = trial.work / "src-images", trial.work / "dst-images"
        t0 = time.time()
        self.dump(trial, src)
        t1 = time.time()
        self.copy(trial, src, dst)
        t2 = time.time()
        daemon = self.before_restore(trial, dst)
        pid = self.restore(trial, dst, *self.restore_opts)
        t3 = time.time()
        extra = {}
        if daemon is not None:
            _reap_daemon(trial, daemon, dst)
            extra = {"pages_installed_s": time.time() - t3, "remote_faults": 0}
        return Outcome(pid, {"dump": t1 - t0, "copy": t2 - t1, "restore": t3 - t2}, t3, extra)

    def before_restore(self, trial, images):
        return None


class LazyRestore(StopAndCopy):
    name = "criu-lazy-restore"
    restore_opts = ("--lazy-pages",)

    def before_restore(self, trial, images):
        return _lazy_daemon(trial, ["-D", images, "-W", images])


class PostCopy(Strategy):
    name = "criu-post-copy"
    fast = False  # page server over the shaped link

    def migrate(self, trial):
        src, dst = trial.work / "src-images", trial.work / "dst-images"
        os.makedirs(src)
        h = trial.hosts
        ps_addr = h.src_fast_addr if self.fast else h.src_addr
        rfd, wfd = os.pipe()
        t0 = time.time()
        # The dump writes everything but the lazy memory, then its page server
        # serves that memory until the destination's daemon has it all.
        dump = trial.spawn(
            "src",
            [
                criu_binary(),
                "dump",
                "-t",
                trial.workload.host_pid,
                "-D",
                src,
                "-o",
                "dump.log",
                CRIU_LOG_LEVEL,
                "--lazy-pages",
                "--address",
                ps_addr,
                "--port",
                PAGE_PORT,
                "--status-fd",
                wfd,
                *trial.workload.criu_opts(),
            ],
            "criu-dump.out",
            pass_fds=(wfd,),
        )
        os.close(wfd)
        _status_fd_wait(rfd, dump, trial.timeout, "criu dump --lazy-pages", src / "dump.log")
        t1 = time.time()
        self.copy(trial, src, dst)
        t2 = time.time()
        daemon = _lazy_daemon(trial, ["-D", dst, "-W", dst, "--page-server", "--address", ps_addr, "--port", PAGE_PORT])
        pid = self.restore(trial, dst, "--lazy-pages")
        t3 = time.time()
        _reap_daemon(trial, daemon, dst)
        if trial.wait(dump, trial.timeout, "criu dump's page server") != 0:
            raise StrategyError("criu dump's page server failed: {}".format(log_tail(src / "dump.log")))
        t4 = time.time()
        with open(dst / "lazy-pages.log", errors="replace") as f:
            faults = sum(1 for line in f if "#PF at" in line)
        return Outcome(
            pid,
            {"dump": t1 - t0, "copy": t2 - t1, "restore": t3 - t2},
            t3,
            {"pages_installed_s": t4 - t3, "remote_faults": faults},
        )


class Floor(PostCopy):
    name = "criu-floor"
    fast = True


class PreDump(Strategy):
    name = "criu-pre-dump"

    def migrate(self, trial):
        pre_src, pre_dst = trial.work / "src-pre", trial.work / "dst-pre"
        src, dst = trial.work / "src-images", trial.work / "dst-images"
        t0 = time.time()
        os.makedirs(pre_src)
        trial.run(
            "src",
            [
                criu_binary(),
                "pre-dump",
                "-t",
                trial.workload.host_pid,
                "-D",
                pre_src,
                "-o",
                "pre-dump.log",
                CRIU_LOG_LEVEL,
                "--track-mem",
                *trial.workload.criu_opts(),
            ],
            "criu-pre-dump.out",
            "criu pre-dump",
            criu_log=pre_src / "pre-dump.log",
        )
        self.copy(trial, pre_src, pre_dst, "-pre")
        t1 = time.time()
        self.dump(trial, src, "--track-mem", "--prev-images-dir", "../src-pre")
        t2 = time.time()
        self.copy(trial, src, dst)
        # The copied `parent` link names the source's pre-dump directory.
        if os.path.lexists(dst / "parent"):
            os.unlink(dst / "parent")
        os.symlink("../dst-pre", dst / "parent")
        t3 = time.time()
        pid = self.restore(trial, dst)
        t4 = time.time()
        return Outcome(pid, {"dump": t2 - t1, "copy": t3 - t2, "restore": t4 - t3}, t4, {"pre_dump_s": t1 - t0})


class Hybridmig(Strategy):
    name = "hybridmig"
    switchover = "precopy"  # this row's history: pre-copy, auto-converge on
    run_args: tuple = ()  # more options of `run`

    def migrate(self, trial):
        h = trial.hosts
        key = trial.work / "key"
        key.unlink(missing_ok=True)  # a trial directory reused
        generate_key(key)
        serve_dir = trial.logs / "serve"  # CRIU's restore log is kept
        serve_dir.mkdir()
        listen = "%s:%d" % (h.dst_addr, SERVE_PORT)
        serve = trial.spawn(
            "dst",
            [HYBRIDMIG, "serve", "--listen", listen, "--dir", serve_dir, "--key-file", key, "--once", "--keep", "-v3"]
            + self.serve_args(trial),
            "serve.log",
        )
        _wait_log(trial.logs / "serve.log", "listening on", serve, 30)
        opts = [f"--criu-opt={o}" for o in trial.workload.criu_opts()]
        t0 = time.time()
        with open(trial.logs / "run.json", "wb") as report_out:  # (the child keeps its own copy)
            run = trial.spawn(
                "src",
                [
                    HYBRIDMIG,
                    "run",
                    *self.what(trial),
                    "--to",
                    listen,
                    "--key-file",
                    key,
                    "--json",
                    "--timeout",
                    int(trial.timeout),
                    "-v3",
                    "--work-dir",
                    trial.logs / "run",
                    "--switchover",
                    self.switchover,
                    *self.run_args,
                    *opts,
                ],
                "run.err",
                stdout=report_out,
            )
        rc = trial.wait(run, trial.timeout * 3, "hybridmig run")
        t1 = time.time()
        try:
            report = json.loads((trial.logs / "run.json").read_text())
        except ValueError:
            report = {"error": "no JSON report: {}".format(log_tail(trial.logs / "run.err"))}
        if rc != 0 or report.get("result") != "migrated":
            raise StrategyError("hybridmig run failed (exit %d): %s" % (rc, report.get("error")))
        trial.wait(serve, 60, "hybridmig serve")
        b = report["breakdown"]
        phases = {
            "pre-copy": report["precopy_s"],
            "dump": (b["criu_startup_ms"] + b["freeze_to_dumped_ms"]) / 1000,
            "copy": (b["final_pages_ms"] + b["images_ms"]) / 1000,
            "restore": b["restore_ms"] / 1000,
        }
        return Outcome(
            report["restored_pid"],
            phases,
            # run ends once every page is installed (RESULT): the copy
            # resumed that long before (else total counted it twice)
            t1 - b["installing_after_resume_ms"] / 1000,
            {
                "remote_faults": report["remote_faults"],
                "rounds": len(report["rounds"]) - 1,
                # round 0 sends every page once: the data path's pace
                "precopy_mb_s": report["rounds"][0]["rate_mb_s"],
                "downtime_ms": report["downtime_ms"],
                "breakdown": b,
                "pages_installed_s": b["installing_after_resume_ms"] / 1000,
                "run_wall_s": t1 - t0,
                "switchover": report.get("switchover"),
                "postcopy": report.get("postcopy"),
                "bytes_sent": report.get("bytes_sent"),
                "target_downtime": report.get("target_downtime"),
            },
        )

    def serve_args(self, trial):
        return []

    def what(self, trial):
        """What `run` migrates: its first arguments."""
        return [trial.workload.host_pid]


def _podman(trial, side):
    """`podman` with the options of the workload's podman storage on `side`."""
    pair = getattr(trial.workload, "pair", None)
    if pair is None:
        raise StrategyError("a container strategy needs a container workload (--workloads podman)")
    return ["podman", *(pair.src if side == "src" else pair.dst).opts]


class PodmanStopCopy(Strategy):
    """podman's own migration: `container checkpoint --export` (the
    container frozen from here), the archive over the link, `container
    restore --import` under the same name on the destination's podman."""

    name = "podman-stop-copy"
    container = True

    def migrate(self, trial):
        name = trial.workload.name
        src, dst = trial.work / "src-export", trial.work / "dst-import"
        src.mkdir()
        t0 = time.time()
        export = ["container", "checkpoint", name, "--export", src / "checkpoint.tar", "--compress", "none"]
        trial.run("src", _podman(trial, "src") + export, "podman-checkpoint.log", "podman container checkpoint")
        t1 = time.time()
        self.copy(trial, src, dst)
        t2 = time.time()
        restore = ["container", "restore", "--import", dst / "checkpoint.tar", "--name", name]
        trial.run("dst", _podman(trial, "dst") + restore, "podman-restore.log", "podman container restore")
        t3 = time.time()
        info = trial.workload.pair.dst.inspect(name)
        if not info or not info["State"]["Running"]:
            raise StrategyError(f"podman restored {name}, but does not say it runs")
        trial.restored.append(info["State"]["Pid"])
        return Outcome(info["State"]["Pid"], {"dump": t1 - t0, "copy": t2 - t1, "restore": t3 - t2}, t3, {})


class HybridmigContainer(Hybridmig):
    """`hybridmig run --container` to `serve --podman`."""

    name = "hybridmig-container"
    container = True

    def serve_args(self, trial):
        _podman(trial, "dst")  # a container workload, or a clear error
        return trial.workload.pair.dst.podman_opt_args()

    def what(self, trial):
        return ["--container", trial.workload.name, *trial.workload.pair.src.podman_opt_args()]


class HybridmigPostCopy(Hybridmig):
    """Post-copy after one round (--switchover postcopy)."""

    name = "hybridmig-postcopy"
    switchover = "postcopy"


class HybridmigPostCopyNow(HybridmigPostCopy):
    """Post-copy with no round at all (--postcopy-after 0): QEMU's pure post-copy."""

    name = "hybridmig-postcopy-now"
    run_args = ("--postcopy-after", "0")


class HybridmigPostCopyHalf(HybridmigPostCopy):
    """Post-copy after half of round 0 (--postcopy-after 0.5)."""

    name = "hybridmig-postcopy-half"
    run_args = ("--postcopy-after", "0.5")


class HybridmigAuto(Hybridmig):
    """The default: pre-copy while rounds shrink, then post-copy."""

    name = "hybridmig-auto"
    switchover = "auto"


def _wait_log(path, needle, proc, timeout):
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise StrategyError(f"hybridmig serve did not start: {log_tail(path)}")
        time.sleep(0.05)


def _lazy_daemon(trial, args):
    """The stock `criu lazy-pages` on the destination, ready to serve. At
    -v4: its "#PF at" debug lines are how remote faults are counted."""
    rfd, wfd = os.pipe()
    daemon = trial.spawn(
        "dst",
        [criu_binary(), "lazy-pages", *args, "-o", "lazy-pages.log", "-v4", "--status-fd", wfd],
        "criu-lazy-pages.out",
        pass_fds=(wfd,),
    )
    os.close(wfd)
    _status_fd_wait(rfd, daemon, 30, "criu lazy-pages", os.path.join(args[1], "lazy-pages.log"))
    return daemon


def _reap_daemon(trial, daemon, images):
    """The lazy-pages daemon exits once every page is in."""
    if trial.wait(daemon, trial.timeout, "criu lazy-pages") != 0:
        raise StrategyError("criu lazy-pages failed: {}".format(log_tail(os.path.join(images, "lazy-pages.log"))))


STRATEGIES = {
    s.name: s
    for s in (
        StopAndCopy,
        LazyRestore,
        PostCopy,
        Floor,
        PreDump,
        Hybridmig,
        HybridmigPostCopy,
        HybridmigPostCopyNow,
        HybridmigPostCopyHalf,
        HybridmigAuto,
        PodmanStopCopy,
        HybridmigContainer,
    )
}
