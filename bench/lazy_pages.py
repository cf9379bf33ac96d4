"""Benchmark: `hybridmig lazy-pages` against stock `criu lazy-pages`.

    cd /work/main && .venv/bin/python -m bench.lazy_pages \
        [--sizes 1024,4096] [--repeat 3] [--out bench/out/lazy-pages] \
        [--hybridmig-rev HEAD] [--daemons criu,hybridmig] [--from-json FILE]

--hybridmig-rev REV benchmarks hybridmig as of a git revision, exported with
git archive and built apart under build/bench/ (others edit and rebuild the
working tree while a run goes on; without it .venv/bin/hybridmig, i.e. the
working tree, is run and the native module's hash is recorded before and
after).  Before each restore the bench waits for a second in which the
machine is quiet (--quiet-threshold busy CPUs, at most --quiet-timeout s),
and it records the CPUs busy and stolen by the hypervisor during each run.
--from-json re-renders the tables of an earlier results.json.

For each size (MiB) a memwork workload (src/hybridmig/testing/memwork.c: 1 writer
thread, ``--rate`` pages/s, so its memory is mostly stable) is started and
dumped once with `criu dump`.  The same images are then restored again and
again with `criu restore --lazy-pages -d`, once per repetition and daemon,
the daemons alternating which goes first (repetition 0: stock first,
repetition 1: hybridmig first, ...).  Each restore gets a fresh work dir (-W)
for the daemon's socket and the logs; each restored tree is verified (every
page checked: "bad" must be 0) and stopped before the next restore.

Per run, timed on CLOCK_MONOTONIC from the start of `criu restore`:
  restore_s    `criu restore` exited (the tree runs, pages still lazy)
  installed_s  the daemon exited, i.e. every lazy page is installed (both
               daemons exit once all pages are in; the daemon is reaped with
               wait4() by a thread, which also gives its ru_maxrss)
and, from the workload itself (CLOCK_REALTIME, which a restore does not hide):
  resume_ms    restore start -> the first page write after the restore
  max_gap_ms   the longest stall of the writer: the migration gap, i.e. dump
               freeze -> resume, so it includes the time the images sat on
               disk before this restore (it grows with every repetition)
  timeline_2s  writes per 100 ms for the 2 s after resume (at --rate pages/s
               a full bucket holds rate/10 writes)
  writes_during_install_pct  writes from resume until all pages are in, as
               a share of the --rate pace (how much the workload was held up)
For hybridmig, its --stats-json (fault latency p50/p99/max measured inside
the native fault loop, from the moment the loop reads the fault message;
install_s from restore-finished).  Stock criu has no fault latency
statistics: reported as n/a.  Both daemons: peak RSS (ru_maxrss), CPU time,
and per-thread CPU time sampled every 50 ms (the last sample before exit).

The page cache is not dropped: the pages images were just written by the dump
and stay cached (each run records fincore's view of them), so both daemons
read them from RAM.

Results: OUT/results.json (all raw runs, written after each run) and
OUT/results.md (the table, also printed); OUT/logs/ keeps every run's logs.
Everything started here is stopped by pid and every temp dir removed, also on
Ctrl-C or failure; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.criu_util import criu_binary, criu_dump, log_excerpt  # noqa: E402

from hybridmig.testing.workload import Workload, WorkloadError, become_subreaper, build_memwork  # noqa: E402

DAEMONS = ("criu", "hybridmig")
TARGET_RATIO = 2.0  # all pages installed at least 2x sooner than stock
TARGET_P99_US = 50.0  # p99 fault latency
TIMELINE_S = 2.0
BUCKET_S = 0.1
HYBRIDMIG = str(REPO / ".venv" / "bin" / "hybridmig")
VENV_PY = str(REPO / ".venv" / "bin" / "python")
PINNED_ROOT = REPO / "build" / "bench"


class BenchError(RuntimeError):
    """A run failed; the message says why (with log excerpts)."""


# --- child processes ---------------------------------------------------------------


class Child:
    """A process started here and reaped by a thread with wait4(), so that its
    exit time is taken when it exits and its rusage (ru_maxrss) is kept.
    Signalled through a pidfd, which never hits a reused pid."""

    live: set[Child] = set()

    def __init__(self, name: str, argv: list[str], out_path: Path, pass_fds=(), env=None):
        self.name = name
        self.argv = argv
        self.exit_t: float | None = None
        self.returncode: int | None = None
        self.rusage = None
        with open(out_path, "wb") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        self.start_t = time.monotonic()
        self.pid = self.popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        Child.live.add(self)
        self._thread = threading.Thread(target=self._reap, name=f"wait4-{name}", daemon=True)
        self._thread.start()

    def _reap(self) -> None:
        while True:
            try:
                _, status, ru = os.wait4(self.pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                status, ru = None, None
                break
        self.exit_t = time.monotonic()
        self.rusage = ru
        self.returncode = os.waitstatus_to_exitcode(status) if status is not None else -255
        self.popen.returncode = self.returncode  # Popen must not wait for it again

    @property
    def exited(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float) -> bool:
        self._thread.join(max(timeout, 0))
        return self.exited

    def kill(self) -> None:
        if not self.exited:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(10)

    def close(self) -> None:
        self.kill()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        Child.live.discard(self)


def sweep_descendants() -> list[int]:
    """SIGKILL whatever is left below us (restored trees reparented to us as
    a subreaper, a workload whose dump failed...), by pid via psutil; reap
    the direct children.  Returns the pids killed."""
    me = psutil.Process()
    killed = []
    try:
        kids = me.children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in kids:
        try:
            p.send_signal(signal.SIGKILL)
            killed.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 10
    for p in kids:
        try:
            if p.ppid() == me.pid:
                os.waitpid(p.pid, 0)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
        if time.monotonic() > deadline:
            break
    return killed


# --- a pinned hybridmig ----------------------------------------------------------------


def pinned_hybridmig(rev: str) -> tuple[list[str], dict, str]:
    """Build hybridmig as of git revision ``rev`` (git archive + its own cffi
    build) under build/bench/hybridmig-SHA, so that a run is not disturbed
    by edits and rebuilds of the working tree.  Returns the command prefix,
    the environment it needs and the full sha."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", rev + "^{commit}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    root = PINNED_ROOT / f"hybridmig-{sha[:12]}"
    pkg = root / "pkg"
    if not (root / ".built").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        # the package is src/hybridmig since the layout move, engine/ before it
        src = (
            "src/hybridmig"
            if subprocess.run(
                ["git", "-C", str(REPO), "cat-file", "-e", f"{sha}:src/hybridmig"], capture_output=True, timeout=30
            ).returncode
            == 0
            else "engine"
        )
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", sha, src, "native"], capture_output=True, timeout=120, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, timeout=120, check=True)
        build = subprocess.run([VENV_PY, "native/build.py"], cwd=root, capture_output=True, text=True, timeout=600)
        if build.returncode != 0:
            raise BenchError(f"building hybridmig {sha[:12]} failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}")
        built = sorted(root.glob("hybridmig/_native*.so"))
        if not built:
            raise BenchError(f"building hybridmig {sha[:12]}: no hybridmig/_native*.so in {root}")
        shutil.copy2(built[0], root / src / built[0].name)
        pkg.mkdir()
        (pkg / "hybridmig").symlink_to(root / src)
        (root / ".built").write_text(sha + "\n")
    env = dict(os.environ, PYTHONPATH=str(pkg))
    # The editable install's finder comes after sys.path: PYTHONPATH wins; checked here.
    where = subprocess.run(
        [VENV_PY, "-c", "import hybridmig._native, hybridmig.cli; print(hybridmig.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if where.returncode != 0 or not where.stdout.strip().startswith(str(pkg)):
        raise BenchError(f"pinned hybridmig does not import from {pkg}: {where.stdout}{where.stderr}")
    cmd = [VENV_PY, "-c", "import sys; from hybridmig.cli import main; sys.argv[0] = 'hybridmig'; sys.exit(main())"]
    return cmd, env, sha


# --- helpers ---------------------------------------------------------------------


def cpu_busy_jiffies() -> tuple[int, int, int]:
    """(busy, stolen, total) jiffies of the whole machine, from /proc/stat.
    Stolen: time the hypervisor ran something else on our vCPUs."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    vals = vals[:8] + [0] * (8 - len(vals[:8]))  # guest time is already in user
    idle = vals[3] + vals[4]  # idle + iowait
    steal = vals[7]
    return sum(vals) - idle - steal, steal, sum(vals)


CLK_TCK = os.sysconf("SC_CLK_TCK")


class ThreadCpu(threading.Thread):
    """Samples the CPU time of every thread of ``pid`` every 50 ms until it
    exits; ``last`` keeps the last sample: {tid: (comm, cpu seconds)}."""

    def __init__(self, pid: int):
        super().__init__(name=f"cpu-{pid}", daemon=True)
        self.pid = pid
        self.last: dict[int, tuple[str, float]] = {}
        self._halt = threading.Event()

    def sample(self) -> bool:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return False
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[0] is field 3 (state): utime and stime are fields 14, 15
            if fields[0] == "Z":
                continue
            self.last[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
        return True

    def run(self) -> None:
        while not self._halt.is_set() and self.sample():
            self._halt.wait(0.05)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(2)
        return [{"tid": t, "comm": c, "cpu_s": v} for t, (c, v) in sorted(self.last.items())]


def describe_death(host_pid: int) -> str:
    """How the restored root ended, if it did: its wait status (it is our
    child, as a subreaper) and what the kernel logged about it."""
    out = []
    try:
        pid, status = os.waitpid(host_pid, os.WNOHANG)
        if pid == 0:
            out.append(f"pid {host_pid} still running")
        elif os.WIFSIGNALED(status):
            out.append(f"pid {host_pid} killed by {signal.Signals(os.WTERMSIG(status)).name}")
        else:
            out.append(f"pid {host_pid} exited {os.WEXITSTATUS(status)}")
    except ChildProcessError:
        out.append(f"pid {host_pid} is not our child (already reaped)")
    try:
        kmsg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        out += [line for line in kmsg if f"[{host_pid}]" in line or line.lstrip().startswith("Code:")][-4:]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "\n".join(out)


def wait_quiet(threshold: float, timeout: float) -> dict:
    """Wait (up to ``timeout`` s) for a second in which the machine's busy
    CPUs stay below ``threshold``: others' jobs share this machine.  Returns
    what was seen, for the record."""
    start = time.monotonic()
    while True:
        b0 = cpu_busy_jiffies()
        time.sleep(1.0)
        b1 = cpu_busy_jiffies()
        busy = (b1[0] - b0[0] + b1[1] - b0[1]) / max(b1[2] - b0[2], 1) * (os.cpu_count() or 1)
        waited = time.monotonic() - start
        if busy < threshold or waited >= timeout:
            return {"busy_cpus_before": round(busy, 3), "waited_s": round(waited, 1), "quiet": busy < threshold}


def fincore_pct(images: Path) -> float | None:
    """Share of the pages images resident in the page cache (fincore)."""
    files = sorted(str(p) for p in images.glob("pages-*.img"))
    if not files or not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        res = size = 0
        for line in out.splitlines():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
        return 100.0 * res / size if size else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def wait_ready(status_rd: int, daemon: Child, socket_path: Path, timeout: float) -> None:
    """Wait for the daemon's --status-fd byte (written once it listens) and
    its socket; fail if it exits or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    got = False
    while not got:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{daemon.name} lazy-pages did not get ready within {timeout}s")
        r, _, _ = select.select([status_rd], [], [], min(left, 0.2))
        if r:
            data = os.read(status_rd, 1)
            if not data:
                daemon.wait(2)
                raise BenchError(
                    f"{daemon.name} lazy-pages closed its status fd without getting ready (exit {daemon.returncode})"
                )
            got = True
        elif daemon.exited:
            raise BenchError(f"{daemon.name} lazy-pages exited ({daemon.returncode}) before getting ready")
    if not socket_path.exists():
        raise BenchError(f"{daemon.name} lazy-pages is ready but {socket_path} does not exist")


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no {path}: {e})"
    return "\n".join([f"--- last {n} lines of {path.name} ---"] + lines[-n:])


def timeline_after(verify: dict, t_resume: float, seconds: float | None = TIMELINE_S) -> list[int] | None:
    """Writes per 100 ms bucket from the bucket holding t_resume on, for
    ``seconds`` (None: up to the verify)."""
    tl = verify.get("timeline")
    if not tl or t_resume is None:
        return None
    first = int(round(tl["start"] / BUCKET_S))
    idx = int(math.floor(t_resume / BUCKET_S)) - first
    ops = tl["ops"]
    if seconds is None:
        return ops[idx:] if idx >= 0 else None
    n = int(round(seconds / BUCKET_S))
    if idx < 0 or idx + n > len(ops):
        return None
    return ops[idx : idx + n]


def writes_during(timeline: list[int], t_resume: float, t_end: float, rate: float) -> float | None:
    """Writes done in [t_resume, t_end] as a share of what ``rate`` allows
    (whole buckets, the partial first and last ones pro rata)."""
    if not timeline or t_end <= t_resume:
        return None
    b0 = math.floor(t_resume / BUCKET_S)
    done = 0.0
    for i, n in enumerate(timeline):
        lo, hi = (b0 + i) * BUCKET_S, (b0 + i + 1) * BUCKET_S
        overlap = min(hi, t_end) - max(lo, t_resume)
        if overlap <= 0:
            if lo >= t_end:
                break
            continue
        done += n * overlap / BUCKET_S
    return done / (rate * (t_end - t_resume))


# --- one size: the dump ------------------------------------------------------------


def dump_workload(size_mb: int, images: Path, report: Path, rate: float, binary: str) -> dict:
    timeout = 120 + size_mb / 20
    wl = Workload.start(size_mb, threads=1, procs=1, rate=rate, report=report, timeout=timeout, binary=binary)
    try:
        time.sleep(2.0)  # a little steady state before the dump
        t = time.monotonic()
        criu_dump(wl.host_pid, images, timeout=timeout)
        dump_s = time.monotonic() - t
        wl.wait_gone(60)
    except BaseException:
        wl.stop()
        raise
    size = sum(p.stat().st_size for p in images.glob("pages-*.img"))
    return {"dump_s": dump_s, "pages_img_bytes": size, "dumped_at_realtime": time.time()}


# --- one restore -----------------------------------------------------------------------


def one_run(
    size_mb: int,
    rep: int,
    daemon: str,
    images: Path,
    report: Path,
    tmp_root: Path,
    logs_dir: Path,
    order: int,
    rate: float,
    verbosity: int | None,
    hybridmig: tuple[list[str], dict | None, list[str]],
    quiet: tuple[float, float],
) -> dict:
    work = tmp_root / f"work-{size_mb}-{rep}-{daemon}"
    work.mkdir()
    run: dict = {
        "size_mb": size_mb,
        "rep": rep,
        "daemon": daemon,
        "order": order,
        "ok": False,
        "error": None,
        "pages_img_cached_pct": fincore_pct(images),
    }
    # Generous bounds: the slowest expected here is a few seconds per GiB.
    restore_timeout = 120 + size_mb / 20
    install_timeout = 120 + size_mb / 10
    criu = criu_binary()
    dmn = rst = wl = cpu = None
    host_pid = None
    status_rd, status_wr = os.pipe()
    try:
        run["before"] = wait_quiet(*quiet)
        common = [
            "lazy-pages",
            "-D",
            str(images),
            "-W",
            str(work),
            "-o",
            "lazy-pages.log",
            "--status-fd",
            str(status_wr),
        ]
        if daemon == "criu":
            argv = [criu, *common]
        else:
            argv = [*hybridmig[0], *common, "--stats-json", str(work / "stats.json"), "--timeout", "120", *hybridmig[2]]
        if verbosity is not None:
            argv.append(f"-v{verbosity}")
        run["daemon_argv"] = argv
        dmn = Child(
            daemon,
            argv,
            work / "daemon.out",
            pass_fds=(status_wr,),
            env=hybridmig[1] if daemon == "hybridmig" else None,
        )
        cpu = ThreadCpu(dmn.pid)
        cpu.start()
        os.close(status_wr)
        status_wr = -1
        wait_ready(status_rd, dmn, work / "lazy-pages.socket", 60)

        pidfile = work / "restore.pid"
        rargv = [
            criu,
            "restore",
            "-D",
            str(images),
            "-W",
            str(work),
            "-d",
            "--pidfile",
            str(pidfile),
            "-o",
            "restore.log",
            "-v4",
            "--lazy-pages",
        ]
        run["restore_argv"] = rargv
        busy0 = cpu_busy_jiffies()
        t0_real = time.time()
        rst = Child("restore", rargv, work / "restore.out")
        t0 = rst.start_t
        if not rst.wait(restore_timeout):
            raise BenchError(
                f"criu restore did not exit within {restore_timeout}s\n" + log_excerpt(work / "restore.log")
            )
        run["restore_s"] = rst.exit_t - t0
        run["restore_rc"] = rst.returncode
        if rst.returncode != 0:
            raise BenchError(
                f"criu restore exited {rst.returncode}\n"
                + log_excerpt(work / "restore.log")
                + "\n"
                + tail(work / "lazy-pages.log")
                + "\n"
                + tail(work / "daemon.out")
            )
        host_pid = int(pidfile.read_text().strip())
        try:
            wl = Workload.adopt(host_pid, report=report, procs=1)
        except WorkloadError as e:
            raise BenchError(
                f"{e}: the restored workload died right after the restore\n"
                + describe_death(host_pid)
                + "\n"
                + tail(work / "daemon.out", 5)
            ) from None

        if not dmn.wait(install_timeout):
            raise BenchError(
                f"{daemon} lazy-pages did not exit within {install_timeout}s after "
                "the restore started\n" + tail(work / "lazy-pages.log") + "\n" + tail(work / "daemon.out")
            )
        run["installed_s"] = dmn.exit_t - t0
        busy1 = cpu_busy_jiffies()
        # Average busy CPUs of the whole machine from restore start to now:
        # daemon + restore + workload + anything else running (others' jobs).
        span = max(busy1[2] - busy0[2], 1) / (os.cpu_count() or 1)
        run["machine_busy_cpus"] = (busy1[0] - busy0[0]) / span
        # vCPU time the hypervisor gave to others (this is a VM on a shared host)
        run["machine_steal_cpus"] = (busy1[1] - busy0[1]) / span
        run["daemon_rc"] = dmn.returncode
        run["daemon_threads_cpu"] = cpu.stop()
        ru = dmn.rusage
        if ru is not None:
            run["daemon_peak_rss_kib"] = ru.ru_maxrss
            run["daemon_cpu_s"] = ru.ru_utime + ru.ru_stime
        if dmn.returncode != 0:
            raise BenchError(
                f"{daemon} lazy-pages exited {dmn.returncode}\n"
                + tail(work / "lazy-pages.log")
                + "\n"
                + tail(work / "daemon.out")
            )
        if daemon == "hybridmig":
            try:
                run["stats"] = json.loads((work / "stats.json").read_text())
            except (OSError, ValueError) as e:
                raise BenchError(f"hybridmig wrote no usable stats JSON: {e}\n" + tail(work / "daemon.out")) from e

        # Leave the first TIMELINE_S after resume undisturbed by the verify pause.
        settle = t0 + run["restore_s"] + TIMELINE_S + 0.5 - time.monotonic()
        if settle > 0:
            time.sleep(settle)
        if not wl.alive():
            raise BenchError("the restored workload died\n" + describe_death(host_pid))
        verify = wl.verify(timeout=120 + size_mb / 20)[0]
        run["verify"] = {
            k: verify.get(k)
            for k in (
                "pages",
                "bad",
                "first_bad",
                "zero_pages",
                "zero_pages_bad",
                "bad_detail",
                "ops",
                "max_gap_ms",
                "max_gap_at",
            )
        }
        t_resume = verify.get("max_gap_at")
        run["resume_ms"] = (t_resume - t0_real) * 1e3 if t_resume else None
        run["max_gap_ms"] = verify.get("max_gap_ms")
        run["timeline_2s"] = timeline_after(verify, t_resume)
        run["timeline_after_resume"] = timeline_after(verify, t_resume, None)
        if t_resume:
            t_installed_real = t0_real + run["installed_s"]
            run["writes_during_install_pct"] = _pct(
                writes_during(run["timeline_after_resume"], t_resume, t_installed_real, rate)
            )
        if verify.get("bad") != 0:
            raise BenchError(f"verify found {verify.get('bad')} bad pages: {verify.get('bad_detail')}")
        run["ok"] = True
    except (BenchError, WorkloadError, OSError, ValueError) as e:
        run["error"] = f"{type(e).__name__}: {e}"
    finally:
        if status_wr >= 0:
            os.close(status_wr)
        os.close(status_rd)
        if cpu is not None and "daemon_threads_cpu" not in run:
            run["daemon_threads_cpu"] = cpu.stop()
        if wl is not None:
            try:
                wl.stop()
            except WorkloadError as e:
                run["error"] = (run["error"] or "") + f"\nstopping the restored tree: {e}"
        for child in (rst, dmn):
            if child is not None:
                if not child.exited:
                    run["error"] = (run["error"] or "") + f"\n{child.name} killed by the bench"
                child.close()
        killed = sweep_descendants()
        if killed:
            run["swept_pids"] = killed
        dest = logs_dir / f"{size_mb}-{rep}-{daemon}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("lazy-pages.log", "restore.log", "daemon.out", "restore.out", "stats.json"):
            if (work / name).exists():
                shutil.copy2(work / name, dest / name)
        shutil.rmtree(work, ignore_errors=True)
    return run


# --- summary ---------------------------------------------------------------------------


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _fmt(vals: list, scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})"


def summarize(results: dict) -> str:
    runs = results["runs"]
    sizes = sorted({r["size_mb"] for r in runs})
    present = [d for d in DAEMONS if any(r["daemon"] == d for r in runs)]
    rate = results["meta"]["rate"]
    full = rate * BUCKET_S
    out = []
    out.append(
        "Medians over repetitions, (min–max) when there are several; times from the start "
        "of `criu restore --lazy-pages`. Only runs whose workload verified with 0 bad pages "
        "count."
    )
    out.append("")
    out.append(
        "| Size | Daemon | All pages installed (s) | Restore exit (s) | Installed after restore exit (s) "
        "| Stock / hybridmig (installed) | Fault latency p50 (µs) | Fault latency p99 (µs) "
        "| Daemon peak RSS (MiB) | Daemon CPU (s) | Runs ok |"
    )
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for size in sizes:
        ok = {d: [r for r in runs if r["size_mb"] == size and r["daemon"] == d and r["ok"]] for d in DAEMONS}
        total = {d: len([r for r in runs if r["size_mb"] == size and r["daemon"] == d]) for d in DAEMONS}
        # ratio within each repetition where both runs are good
        ratios = []
        for rep in sorted({r["rep"] for r in runs if r["size_mb"] == size}):
            pair = {r["daemon"]: r for r in ok["criu"] + ok["hybridmig"] if r["rep"] == rep}
            if len(pair) == 2:
                ratios.append(pair["criu"]["installed_s"] / pair["hybridmig"]["installed_s"])
        for d in present:
            rs = ok[d]
            if d == "hybridmig":
                p50 = _fmt([r["stats"]["fault_latency_us"]["p50"] for r in rs], digits=1)
                p99 = _fmt([r["stats"]["fault_latency_us"]["p99"] for r in rs], digits=1)
                ratio = _fmt(ratios) + ("x" if ratios else "")
            else:
                p50 = p99 = "n/a"
                ratio = ""
            out.append(
                f"| {size} MiB | {'stock `criu lazy-pages`' if d == 'criu' else '`hybridmig lazy-pages`'} "
                f"| {_fmt([r['installed_s'] for r in rs])} | {_fmt([r['restore_s'] for r in rs])} "
                f"| {_fmt([r['installed_s'] - r['restore_s'] for r in rs])} | {ratio} | {p50} | {p99} "
                f"| {_fmt([r.get('daemon_peak_rss_kib') for r in rs], 1 / 1024, 0)} "
                f"| {_fmt([r.get('daemon_cpu_s') for r in rs])} | {len(rs)}/{total[d]} |"
            )
        if ratios:
            med = statistics.median(ratios)
            verdicts.append(
                f"- {size} MiB, all pages installed ≥ {TARGET_RATIO:g}x sooner than stock: "
                f"**{'met' if med >= TARGET_RATIO else 'NOT met'}** (median {med:.2f}x, "
                f"min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
            )
        else:
            verdicts.append(f"- {size} MiB, ≥ {TARGET_RATIO:g}x sooner than stock: no valid pair of runs")
        p99s = [r["stats"]["fault_latency_us"]["p99"] for r in ok["hybridmig"]]
        if p99s:
            worst = max(p99s)
            verdicts.append(
                f"- {size} MiB, p99 fault latency ≤ {TARGET_P99_US:g} µs: "
                f"**{'met' if worst <= TARGET_P99_US else 'NOT met'}** "
                f"(median {statistics.median(p99s):.1f} µs, worst {worst:.1f} µs)"
            )
    out.append("")
    out.append("Targets:")
    out += verdicts

    out.append("")
    out.append(f"Restored workload (1 writer at {rate:g} pages/s: a full 100 ms bucket holds {full:g} writes):")
    out.append("")
    out.append(
        "| Size | Daemon | Resume after restore start (ms) | Writes per 100 ms, first 2 s after resume "
        "(min / median) | Lazy pages | Faults; pages faulted / prefetched / zero (hybridmig) "
        "| install_s, restore-finished → all in (hybridmig stats, s) "
        f"| Writes from resume to all installed, % of the {rate:g}/s pace "
        "| Machine CPUs busy / stolen by the host, restore start → installed | Verify: bad pages |"
    )
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for d in present:
            rs = [r for r in runs if r["size_mb"] == size and r["daemon"] == d]
            good = [r for r in rs if r["ok"]]
            tls = [r["timeline_2s"] for r in good if r.get("timeline_2s")]
            mins = [min(t[1:]) for t in tls]  # the resume bucket itself is partial
            meds = [statistics.median(t[1:]) for t in tls]
            tl_cell = f"{_fmt(mins, digits=0)} / {_fmt(meds, digits=0)}" if tls else "n/a"
            if d == "hybridmig":
                st = [r["stats"] for r in good]
                lazy = _fmt([s["lazy_pages"] for s in st], digits=0)
                split = (
                    (
                        f"{_fmt([s['faults'] for s in st], digits=0)}; "
                        f"{_fmt([s['pages_fault'] for s in st], digits=0)} / "
                        f"{_fmt([s['pages_prefetch'] for s in st], digits=0)} / "
                        f"{_fmt([s['pages_zero'] for s in st], digits=0)}"
                    )
                    if st
                    else "n/a"
                )
                inst = _fmt([s["install_s"] for s in st], digits=3)
            else:
                lazy, split, inst = "", "n/a", "n/a"
            bad = ", ".join(str(r.get("verify", {}).get("bad", "—")) for r in rs)
            out.append(
                f"| {size} MiB | {'stock' if d == 'criu' else 'hybridmig'} "
                f"| {_fmt([r.get('resume_ms') for r in good], digits=0)} | {tl_cell} | {lazy} | {split} "
                f"| {inst} | {_fmt([r.get('writes_during_install_pct') for r in good], digits=0)} "
                f"| {_fmt([r.get('machine_busy_cpus') for r in good], digits=2)} / "
                f"{_fmt([r.get('machine_steal_cpus') for r in good], digits=2)} | {bad} |"
            )
    failed = [r for r in runs if not r["ok"]]
    if failed:
        out.append("")
        out.append("Failed runs:")
        for r in failed:
            first = (r["error"] or "").strip().splitlines()[:1]
            out.append(f"- {r['size_mb']} MiB rep {r['rep']} {r['daemon']}: {first[0] if first else '?'}")
    return "\n".join(out)


def machine_info() -> dict:
    info = {"kernel": platform.release(), "nproc": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["mem_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    info["swap_total_gib"] = round(psutil.swap_memory().total / 2**30, 1)
    try:
        info["criu"] = (
            subprocess.run([criu_binary(), "--version"], capture_output=True, text=True, timeout=10)
            .stdout.split("\n")[0]
            .strip()
        )
        info["git_head"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        # Others may edit and rebuild hybridmig while a run goes on: say what ran.
        info["git_dirty"] = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "engine", "native"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        pass
    info["native_module"] = native_module_id()
    return info


def native_module_id() -> str | None:
    """sha256 and mtime of hybridmig's compiled module (engine/_native*.so)."""
    import hashlib

    mods = sorted((REPO / "engine").glob("_native*.so"))
    if not mods:
        return None
    data = mods[0].read_bytes()
    mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mods[0].stat().st_mtime))
    return f"{mods[0].name} sha256:{hashlib.sha256(data).hexdigest()[:16]} mtime:{mtime}Z"


# --- main ------------------------------------------------------------------------------


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lazy_pages", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,4096", help="workload sizes in MiB, comma separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000, help="workload writes, pages/s")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "lazy-pages"))
    ap.add_argument(
        "--daemons", default=",".join(DAEMONS), help="which daemons to run (criu,hybridmig); the ratio needs both"
    )
    ap.add_argument(
        "--daemon-verbosity",
        type=int,
        default=None,
        help="pass -vN to both daemons (default: their own default; -v4 slows stock criu)",
    )
    ap.add_argument("--tmpdir", default=None, help="parent of the temp dir (images, work dirs); default $TMPDIR")
    ap.add_argument(
        "--hybridmig-rev",
        metavar="REV",
        help="benchmark hybridmig as of this git revision, built apart under build/bench "
        "(default: the working tree through .venv/bin/hybridmig)",
    )
    ap.add_argument(
        "--hybridmig-args",
        default="",
        help="extra arguments to `hybridmig lazy-pages`, e.g. '--installers 1 --batch-pages 64'",
    )
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        help="before each restore wait for a second with fewer busy CPUs than this (others' jobs)",
    )
    ap.add_argument("--quiet-timeout", type=float, default=120, help="... but no longer than this (s)")
    ap.add_argument(
        "--from-json",
        metavar="RESULTS_JSON",
        help="run nothing: print the tables of an earlier results.json (and rewrite its results.md)",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        write_markdown(json.loads(path.read_text()), path.parent)
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    daemons = tuple(d for d in DAEMONS if d in args.daemons.split(","))
    if not daemons:
        ap.error(f"--daemons: choose among {', '.join(DAEMONS)}")

    if os.geteuid() != 0:
        print("needs root (criu dump/restore)", file=sys.stderr)
        return 2
    if not os.access(HYBRIDMIG, os.X_OK):
        print(f"{HYBRIDMIG} missing: run make setup", file=sys.stderr)
        return 2
    hm_extra = args.hybridmig_args.split()
    hybridmig: tuple[list[str], dict | None, list[str]] = ([HYBRIDMIG], None, hm_extra)
    pinned = None
    if args.hybridmig_rev:
        try:
            cmd, env, pinned = pinned_hybridmig(args.hybridmig_rev)
        except (BenchError, subprocess.SubprocessError) as e:
            print(f"cannot build hybridmig {args.hybridmig_rev}: {e}", file=sys.stderr)
            return 2
        hybridmig = (cmd, env, hm_extra)
        print(f"hybridmig pinned at {pinned[:12]} ({PINNED_ROOT / ('hybridmig-' + pinned[:12])})", flush=True)
    signal.signal(signal.SIGTERM, _sigterm)
    become_subreaper()
    binary = build_memwork()

    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    logs_dir = out / "logs"
    shutil.rmtree(logs_dir, ignore_errors=True)
    command = "python -m bench.lazy_pages " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {
        "meta": {
            "command": command,
            "sizes_mb": sizes,
            "repeat": args.repeat,
            "rate": args.rate,
            "threads": 1,
            "procs": 1,
            "daemon_verbosity": args.daemon_verbosity,
            "hybridmig_pinned_rev": pinned,
            "page_cache": "not dropped (images cached since the dump)",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "targets": {"installed_ratio_min": TARGET_RATIO, "fault_p99_us_max": TARGET_P99_US},
        },
        "dumps": {},
        "runs": [],
    }

    def save():
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out / "results.json")

    tmp_root = Path(tempfile.mkdtemp(prefix="hm-bench-lazy-", dir=args.tmpdir))
    rc = 0
    try:
        for size in sizes:
            images = tmp_root / f"images-{size}"
            report = tmp_root / f"report-{size}" / "report.jsonl"
            print(f"[{size} MiB] starting memwork and dumping it ...", flush=True)
            results["dumps"][str(size)] = dump_workload(size, images, report, args.rate, binary)
            print(f"[{size} MiB] dumped in {results['dumps'][str(size)]['dump_s']:.1f}s", flush=True)
            save()
            for rep in range(args.repeat):
                order = daemons if rep % 2 == 0 else daemons[::-1]
                for i, daemon in enumerate(order):
                    run = one_run(
                        size,
                        rep,
                        daemon,
                        images,
                        report,
                        tmp_root,
                        logs_dir,
                        i,
                        args.rate,
                        args.daemon_verbosity,
                        hybridmig,
                        (args.quiet_threshold, args.quiet_timeout),
                    )
                    results["runs"].append(run)
                    save()
                    if run["ok"]:
                        extra = ""
                        if "stats" in run:
                            lat = run["stats"]["fault_latency_us"]
                            extra = f", fault p50 {lat['p50']:.1f} us p99 {lat['p99']:.1f} us"
                        print(
                            f"[{size} MiB rep {rep}] {daemon:9s}: restore {run['restore_s']:.2f}s, "
                            f"all installed {run['installed_s']:.2f}s, peak RSS "
                            f"{run.get('daemon_peak_rss_kib', 0) / 1024:.0f} MiB{extra}, bad 0, machine busy "
                            f"{run.get('machine_busy_cpus', 0):.2f} CPUs, stolen {run.get('machine_steal_cpus', 0):.2f}"
                            f"{'' if run['before']['quiet'] else ' (NOT quiet before the run)'}",
                            flush=True,
                        )
                    else:
                        rc = 1
                        print(f"[{size} MiB rep {rep}] {daemon:9s}: FAILED: {run['error']}", flush=True)
            shutil.rmtree(images, ignore_errors=True)
            shutil.rmtree(report.parent, ignore_errors=True)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        rc = 130
    finally:
        for child in list(Child.live):
            child.close()
        sweep_descendants()
        shutil.rmtree(tmp_root, ignore_errors=True)
        results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["meta"]["native_module_at_end"] = native_module_id()
        if not pinned and results["meta"]["native_module_at_end"] != results["meta"]["machine"]["native_module"]:
            print("WARNING: hybridmig's native module changed during the run", file=sys.stderr)
        save()
    write_markdown(results, out)
    return rc


def write_markdown(results: dict, out: Path) -> None:
    """Print the tables and write them to OUT/results.md."""
    if results["runs"]:
        md = summarize(results)
        m = results["meta"]["machine"]
        command = results["meta"]["command"]
        head = (
            f"# lazy-pages: stock criu vs hybridmig\n\n`{command}`\n\n"
            f"Machine: kernel {m.get('kernel')}, {m.get('nproc')} CPUs ({m.get('cpu')}), "
            f"{m.get('mem_total_gib')} GiB RAM, swap {m.get('swap_total_gib')} GiB; "
            f"CRIU {str(m.get('criu')).replace('Version: ', '')}; "
            + (
                f"hybridmig pinned at {results['meta']['hybridmig_pinned_rev'][:12]} (git archive, built apart)"
                if results["meta"].get("hybridmig_pinned_rev")
                else f"hybridmig working tree at {m.get('git_head', '?')[:12]}"
                f"{' (dirty: ' + ', '.join(x.split()[-1] for x in m['git_dirty']) + ')' if m.get('git_dirty') else ''}"
                f"{', ' + m['native_module'] if m.get('native_module') else ''}"
            )
            + ". Page cache not dropped.\n\n"
        )
        (out / "results.md").write_text(head + md + "\n")
        print()
        print(md)
        print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, logs in {out / 'logs'}")


if __name__ == "__main__":
    sys.exit(main())
