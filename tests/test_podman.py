"""`hybridmig run --container NAME` → `hybridmig serve --podman`: a real
podman container (busybox + memwork, which checks every page) moved
between two podman storages (--root/--runroot/--tmpdir each) on two
network-namespace "hosts". A migration leaves the container running under
its name in the destination's podman, its memory and a file it wrote
intact, and the source container stopped (or removed); a failure leaves
the source container running ("Up", memory verified) and nothing on the
destination."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import psutil
import pytest

from hybridmig import cgroup_yard, scratch
from hybridmig.keys import generate_key
from hybridmig.testing.netns import TwoHosts
from hybridmig.testing.podman import IMAGE, ULIMITS, PodmanPair, need_podman
from hybridmig.testing.workload import Workload
from lazy_util import HYBRIDMIG_BIN
from migrate_util import PORT, Cleanup, Serve, kill_by_report, wait_for
from test_cgroup_yard import mounts

pytestmark = [pytest.mark.usefixtures("criu_ready"), pytest.mark.timeout(300)]
NAME = "hm-mig"


class Env:
    def __init__(self, hosts, tmp_path, cleanup, pair):
        self.hosts, self.tmp, self.cleanup, self.pair = hosts, tmp_path, cleanup, pair
        self.key = tmp_path / "key"
        generate_key(self.key)

    def serve(self, *extra, podman=True, env=None):
        base = self.pair.base / f"serve-{time.monotonic_ns()}"
        opts = self.pair.dst.podman_opt_args() if podman else []
        return Serve(
            self.hosts, self.hosts.dst, self.hosts.dst_addr, base, self.key, self.cleanup, self.tmp,
            extra=[*opts, *extra], env=env,
        ).wait_listening()  # fmt: skip

    def run_cmd(self, name, *extra):
        return self.hosts.run_in(self.hosts.src) + [
            HYBRIDMIG_BIN, "run", "--container", name, *self.pair.src.podman_opt_args(),
            "--to", f"{self.hosts.dst_addr}:{PORT}", "--key-file", str(self.key), "--json", "--timeout", "60",
            "-v3", *extra,
        ]  # fmt: skip

    def run(self, name, *extra, timeout=240):
        proc = subprocess.run(
            self.run_cmd(name, *extra), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        print(f"run --container {name} -> rc {proc.returncode}\n--- stderr\n{proc.stderr[-6000:]}")
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = None
        return proc.returncode, report, proc.stderr


@pytest.fixture
def pair(pipe_max_size):
    reason = need_podman()
    if reason:
        pytest.skip(reason)
    p = PodmanPair()
    yield p
    p.close()


@pytest.fixture
def env(criu_ready, tmp_path, pair):
    cleanup = Cleanup()
    with TwoHosts() as hosts:
        try:
            yield Env(hosts, tmp_path, cleanup, pair)
        finally:
            cleanup.run()
            kill_by_report(str(pair.report_dir / "report.jsonl"))  # a copy restored where none should be


def verified(wl):
    """Every page of wl checked twice, 0.2 s apart (it runs, it is not frozen)."""
    for _ in range(2):
        reports = wl.verify()
        assert len(reports) == 1 and reports[0]["bad"] == 0 and reports[0]["zero_pages_bad"] == 0, [
            {k: v for k, v in r.items() if k != "timeline"} for r in reports
        ]
        time.sleep(0.2)


def assert_source_untouched(env, wl, rc, report, err):
    """A refused or rolled-back run: non-zero, said why, and the source
    container running ("Up") with every page intact, its CRIU config file
    gone, nothing of that name on the destination."""
    assert rc != 0
    assert "error" in err, err
    assert report is not None and report["result"] == "failed" and report["error"], report
    assert env.pair.src.status(NAME) == "running"
    assert wl.alive()
    verified(wl)
    assert not (env.pair.src.dir / "criu" / f"{NAME}.conf").exists()
    assert NAME not in env.pair.dst.names()
    return report["error"]


@pytest.mark.parametrize("remove", [False, True], ids=["stopped", "rm"])
def test_container_migrates_with_its_memory_and_files(env, remove):
    wl = env.pair.src.start(NAME, env.pair.report_dir, size_mb=128, before="echo moved > /tmp/before; ")
    source_id = env.pair.src.inspect(NAME)["Id"]
    verified(wl)
    serve = env.serve("--keep")  # the session's images: the dump's inventory
    rc, report, err = env.run(NAME, *(["--rm"] if remove else []))
    assert rc == 0, err
    assert report["result"] == "migrated" and report["container"] == NAME, report
    assert report["remote_faults"] == 0, report
    assert serve.wait(60) == 0, serve.log()
    # destination: running under the same name (a new ID: the source's was held until the commit)
    info = env.pair.dst.inspect(NAME)
    assert info is not None and info["State"]["Status"] == "running", info and info["State"]
    assert info["Id"] != source_id and info["State"]["Pid"] == report["restored_pid"]
    ps = env.pair.dst.podman("ps", "--format", "{{.Names}} {{.Status}}").stdout
    assert f"{NAME} Up" in ps, ps
    restored = Workload(info["State"]["Pid"], env.pair.report_dir / "report.jsonl", 1)
    verified(restored)
    assert env.pair.dst.podman("exec", NAME, "cat", "/tmp/before").stdout == "moved\n"
    # source: stopped by its checkpoint, or removed
    if remove:
        assert NAME not in env.pair.src.names()
    else:
        assert env.pair.src.status(NAME) == "exited"
    assert not (env.pair.src.dir / "criu" / f"{NAME}.conf").exists()
    assert not wl.alive()
    # run's CRIU config: no iptables lock of the netns for the freeze
    assert inventory(next(serve.base_dir.rglob("inventory.img")))["network_lock_method"] == NETWORK_LOCK_SKIP
    # serve's CRIU took the cgroup hierarchies from serve's yard, mounted before
    # the freeze, and mounted none itself; the yard is gone since
    log = next(serve.base_dir.rglob("restore.log")).read_text(errors="replace")
    yard = re.search(r"Opening (\S*/hybridmig-cgyard-\S+) as cg yard", log)
    assert yard and "Making controller dir" not in log, log[-3000:]
    assert not os.path.exists(yard.group(1))


NETWORK_LOCK_SKIP = 2  # CRIU's enum NETWORK_LOCK_METHOD (cr_options.h), as inventory.img holds it


def inventory(path):
    import pycriu  # here, not above: make test-unit collects this module without pycriu

    with open(path, "rb") as f:
        return pycriu.images.load(f)["entries"][0]


def test_no_such_container(env):
    serve = env.serve()
    rc, report, err = env.run("hm-nobody")
    assert rc != 0 and "no podman container named 'hm-nobody'" in err, err
    assert report["result"] == "failed", report
    assert serve.proc.poll() is None  # never contacted: it serves on


def test_stopped_container(env):
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    env.pair.src.podman("stop", "--time", "1", NAME)
    serve = env.serve()
    rc, report, err = env.run(NAME)
    assert rc != 0 and "is exited, not running" in err, err
    assert env.pair.src.status(NAME) == "exited" and not wl.alive()
    assert serve.proc.poll() is None


def test_paused_container(env):
    """A paused container (frozen by podman) is refused, and stays paused."""
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    env.pair.src.podman("pause", NAME)
    serve = env.serve()
    rc, report, err = env.run(NAME)
    assert rc != 0 and "is paused, not running" in err, err
    assert env.pair.src.status(NAME) == "paused"
    env.pair.src.podman("unpause", NAME)
    verified(wl)
    assert serve.proc.poll() is None


@pytest.mark.parametrize("switchover", ["postcopy", "auto"])
def test_container_postcopy_refused(env, switchover):
    """Only pre-copy moves a container: post-copy (or auto, which may switch
    to it) is refused before the container or the destination is touched."""
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    serve = env.serve()
    rc, report, err = env.run(NAME, "--switchover", switchover)
    assert rc != 0 and f"--switchover {switchover}" in err and "--switchover precopy" in err, err
    assert env.pair.src.status(NAME) == "running"
    verified(wl)
    assert not (env.pair.src.dir / "criu" / f"{NAME}.conf").exists()
    assert serve.proc.poll() is None  # never contacted: it serves on


def test_container_without_the_annotation(env):
    wl = env.pair.src.start(NAME, env.pair.report_dir, annotate=False)
    serve = env.serve()
    rc, report, err = env.run(NAME)
    assert rc != 0 and "created without the org.criu.config annotation" in err, err
    assert "podman run --annotation org.criu.config=" in err, err
    assert env.pair.src.status(NAME) == "running"
    verified(wl)
    assert serve.proc.poll() is None


def test_destination_serve_without_podman(env):
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    env.serve(podman=False)
    rc, report, err = env.run(NAME)
    error = assert_source_untouched(env, wl, rc, report, err)
    assert "does not restore podman containers: start it with --podman" in error, error


def test_serve_where_podman_is_missing(env, tmp_path):
    """serve --podman on a host without podman refuses to start, saying so."""
    from hybridmig.doctor import find_criu

    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("setpriv", "sh", "nsenter"):
        os.symlink(f"/usr/bin/{tool}" if os.path.exists(f"/usr/bin/{tool}") else f"/bin/{tool}", path / tool)
    proc = subprocess.run(
        [HYBRIDMIG_BIN, "serve", "--listen", "127.0.0.1:1", "--dir", str(tmp_path), "--key-file", str(env.key)]
        + ["--podman"],
        env=dict(os.environ, PATH=str(path), CRIU=find_criu()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "podman is not installed" in proc.stderr, proc.stderr


# two busybox nc joined by a TCP connection inside the container (its own netns)
TCP_PAIR = (
    "sleep 1000 | busybox nc -l -p 5555 >/dev/null & sleep 0.3; "
    "sleep 1000 | busybox nc 127.0.0.1 5555 >/dev/null & sleep 0.3; "
)


def test_container_criu_cannot_dump(env):
    """An established TCP connection, which CRIU dumps only when told
    (--tcp-established): the dump fails after the freeze, CRIU resumes the
    container, and the error says CRIU's reason."""
    wl = env.pair.src.start(NAME, env.pair.report_dir, before=TCP_PAIR)
    serve = env.serve()
    rc, report, err = env.run(NAME)
    error = assert_source_untouched(env, wl, rc, report, err)
    assert "podman container checkpoint hm-mig failed" in error and "tcp-established" in error, error
    assert serve.wait(60) not in (0, None)
    # the destination's podman had started its restore (CONTAINER_START, before
    # the freeze): held at its conmon, it was undone (nothing of NAME there, above)
    assert "podman's held restore told to abort" in serve.log(), serve.log()


def test_image_missing_on_the_destination(env):
    env.pair.dst.podman("rmi", "--all", "--force")
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    serve = env.serve()
    rc, report, err = env.run(NAME)
    error = assert_source_untouched(env, wl, rc, report, err)
    assert "is not in the destination's podman storage" in error, error
    assert serve.wait(60) not in (0, None)


# A runc for the destination's podman (--runtime): `restore` fails, or waits
# first; every other command is runc's own.
RUNTIME_WRAPPER = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = restore ]; then
    {action}
  fi
done
exec {runc} "$@"
"""


def runtime_wrapper(env, action):
    import shutil

    path = env.pair.base / "runtime-wrapper"
    path.write_text(RUNTIME_WRAPPER.format(action=action, runc=shutil.which("runc")))
    path.chmod(0o755)
    return f"--podman-opt=--runtime={path}"


def test_destination_restore_fails(env):
    """runc's restore fails on the destination: podman's restore fails, the
    source's CRIU is told to resume, and the source container runs on."""
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    serve = env.serve(runtime_wrapper(env, 'echo "injected failure" >&2; exit 1'))
    rc, report, err = env.run(NAME)
    error = assert_source_untouched(env, wl, rc, report, err)
    assert "podman container restore of hm-mig failed" in error and "injected failure" in error, error
    assert serve.wait(60) not in (0, None)


def test_run_killed_while_the_destination_restores(env):
    """`run` is SIGKILLed while the destination's podman restores (its runc
    held 5 s first): CRIU, given no verdict, resumes the source container;
    the destination, never sent COMMIT, ends and removes its copy."""
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    marker = env.pair.base / "restoring"
    serve = env.serve(runtime_wrapper(env, f"touch {marker}; sleep 5"))
    run = subprocess.Popen(env.run_cmd(NAME), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    env.cleanup.kill_pid_tree(run.pid)
    wait_for(lambda: marker.exists() or run.poll() is not None, 120, "the destination's restore")
    assert run.poll() is None, "run ended before the destination restored"
    os.kill(run.pid, signal.SIGKILL)
    run.wait(10)
    run.stdout.close()
    wait_for(lambda: env.pair.src.status(NAME) == "running", 60, "the source container to run again")
    assert serve.wait(90) not in (0, None), serve.log()
    wait_for(lambda: NAME not in env.pair.dst.names(), 30, "the destination's copy to be removed")
    verified(wl)


def _restore_process(serve, match):
    """A process of serve's restore (podman under serve; its conmon, runc
    and CRIU, daemonized by conmon, anywhere) whose command line `match`
    accepts, or None."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if match(cmd) and (any(str(serve.base_dir) in a for a in cmd) or p.ppid() == serve.proc.pid):
            return p
    return None


def _podman(cmd):
    return bool(cmd) and os.path.basename(cmd[0]) == "podman" and "restore" in cmd


def _held(cmd):
    """CRIU's pre-restore script, waiting (CRIU 0013: `make setup`'s)."""
    return any(os.path.basename(a) == "criu-hold" for a in cmd)


def test_destination_podman_killed_during_pre_copy(env):
    """The destination's podman is SIGKILLed during pre-copy, its restore
    held in CRIU's pre-restore script (CRIU 0013):
    at RESTORE serve says podman's restore failed, without waiting on the
    conmon that holds podman's output, and tells the held CRIU to abort; the
    source container runs on, every page verified, and no process of the
    restore is left on the destination."""
    wl = env.pair.src.start(NAME, env.pair.report_dir, rate=100)  # (1.6 MB/s: below the limit)
    serve = env.serve()
    cmd = env.run_cmd(NAME, "--bandwidth-limit", "8M")  # 64 MiB: round 0 takes ~8 s
    run = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env.cleanup.kill_pid_tree(run.pid)
    wait_for(lambda: _restore_process(serve, _held) is not None or run.poll() is not None, 60, "the held restore")
    podman = _restore_process(serve, _podman)
    assert podman is not None and run.poll() is None, "run ended before the destination's restore was held: " + (
        run.stderr.read()[-3000:] if run.poll() is not None else "podman is gone"
    )
    podman.kill()
    out, err = run.communicate(timeout=120)
    print(err[-6000:])
    error = assert_source_untouched(env, wl, run.returncode, json.loads(out) if out.strip() else None, err)
    assert "podman container restore of hm-mig failed" in error, error
    assert serve.wait(90) not in (0, None), serve.log()
    # CRIU, its podman gone, was told to abort, not let go: it never
    # began to restore (before the fix it went on, 30 s, to no one)
    # (serve's error has the tail of CRIU's log: the held script's name, and
    # either CRIU still waiting in it or its abort there)
    assert "criu-hold" in serve.log() and "setup-namespaces" not in serve.log(), serve.log()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(serve.base_dir) in " ".join(p.info["cmdline"] or ())]
    assert not left, left


def test_run_killed_at_the_switch_over(env):
    """`run` is SIGKILLed once the source container is frozen and its last
    pages are sent, before RESTORE or while the destination's CRIU reads
    the images (with CRIU 0013 the restore waits in CRIU, started during
    pre-copy; the test above kills before it is let go): CRIU, given no
    verdict, resumes the source container; the destination, never sent
    COMMIT, ends and removes its copy."""
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    serve = env.serve()
    log = env.pair.base / "run-killed.log"
    with open(log, "w") as err:
        run = subprocess.Popen(env.run_cmd(NAME), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    env.cleanup.kill_pid_tree(run.pid)
    wait_for(lambda: "final round:" in log.read_text() or run.poll() is not None, 120, "run's final round")
    assert run.poll() is None, "run ended before its final round was sent:\n" + log.read_text()[-3000:]
    os.kill(run.pid, signal.SIGKILL)
    run.wait(10)
    wait_for(lambda: env.pair.src.status(NAME) == "running", 60, "the source container to run again")
    assert serve.wait(90) not in (0, None), serve.log()
    wait_for(lambda: NAME not in env.pair.dst.names(), 30, "the destination's copy to be removed")
    verified(wl)
    # the killed run's cgroup yard stays mounted until a later yard's sweep
    scratch.sweep(cgroup_yard.PREFIX)
    assert not [p for p in mounts() if cgroup_yard.PREFIX in p], mounts()


FETCH = """
import sys, urllib.request
try:
    with urllib.request.urlopen("http://%s:8080/index.html" % sys.argv[1], timeout=2) as reply:
        print(reply.read().decode(), end="")
except OSError:
    pass
"""


def fetch(ip, prefix=()):
    """What the container's httpd answers at ip:8080 ('' if nothing), asked
    from the network namespace `prefix` enters (none: this one)."""
    proc = subprocess.run([*prefix, sys.executable, "-c", FETCH, ip], capture_output=True, text=True, timeout=30)
    return proc.stdout


def test_container_on_a_bridge_network(env):
    """A container on podman's default bridge network (CNI) moves: the
    destination's podman gives it an address of its own (podman restores
    with --name, so not the old one), and the server listening in it
    answers there; its memory is intact."""
    page = "before the move"
    httpd = f"echo '{page}' > /tmp/index.html; busybox httpd -f -p 8080 -h /tmp & "
    wl = env.pair.src.start(NAME, env.pair.report_dir, network="bridge", before=httpd)
    src_ip = env.pair.src.inspect(NAME)["NetworkSettings"]["IPAddress"]
    wait_for(lambda: fetch(src_ip) == page + "\n", 30, "the container's httpd on the source")
    serve = env.serve()
    rc, report, err = env.run(NAME)
    assert rc == 0, err
    assert serve.wait(60) == 0, serve.log()
    info = env.pair.dst.inspect(NAME)
    dst_ip = info["NetworkSettings"]["IPAddress"]
    assert dst_ip and dst_ip != src_ip, info["NetworkSettings"]
    # the copy's veth is on the destination host's bridge (serve's podman
    # ran there): asked from that host
    assert fetch(dst_ip, env.hosts.run_in(env.hosts.dst)) == page + "\n"
    verified(Workload(info["State"]["Pid"], env.pair.report_dir / "report.jsonl", 1))
    assert not wl.alive()


@pytest.mark.parametrize("network", ["none", "bridge"])
def test_tcp_established_refused(env, network):
    """--tcp-established cannot work for a container (tried: on a bridge the
    copy's address changes; on none its new namespace's loopback is down
    while CRIU restores): refused before the container is touched."""
    wl = env.pair.src.start(NAME, env.pair.report_dir, network=network)
    serve = env.serve()
    rc, report, err = env.run(NAME, "--criu-opt=--tcp-established")
    assert rc != 0 and "--tcp-established cannot carry" in err and f"on network {network}" in err, err
    assert env.pair.src.status(NAME) == "running"
    verified(wl)
    assert serve.proc.poll() is None


# tmpfs mounts in a container: `podman run` options and where they are
RO_EMPTY, SCRATCH = "/ro-empty", "/scratch"
TMPFS_OPTS = ["--mount", f"type=tmpfs,destination={RO_EMPTY},ro=true,tmpfs-mode=0750", "--tmpfs", SCRATCH]
# runc's masks (read-only, empty) that podman 4.3 gives every container here
MASKED = ("/proc/acpi", "/sys/firmware", "/sys/dev/block")
SHOW_TMPFS = (
    # the tmpfs mounts (in CRIU's order after a restore: sorted) but the binds of /dev's on /proc files
    f"grep -E ' ({'|'.join((*MASKED, RO_EMPTY, SCRATCH, '/dev', '/dev/shm', '/sys/fs/cgroup'))}) tmpfs ' /proc/mounts"
    " | cut -d' ' -f2-4 | sort; "
    f"stat -c '%n %a %u %g %h' {' '.join(MASKED)} {RO_EMPTY}; "
    f"for d in {' '.join(MASKED)} {RO_EMPTY} {SCRATCH}; do echo $d: $(ls -A $d); done; cat {SCRATCH}/kept"
)


def tmpfs_mnt_ids(dump_log):
    """{mount point in the container: CRIU's mnt_id} of its tmpfs mounts, from dump.log's mount list."""
    found = {}
    for line in dump_log.splitlines():
        parts = line.split()
        if "type" in parts and parts[parts.index("type") + 1] == "tmpfs" and "mnt_id" in parts and "@" in parts:
            found[parts[parts.index("@") + 1][1:]] = int(parts[parts.index("mnt_id") + 1])
    return found


def checkpoint_keeping_logs(pair, tmp_path):
    """podman's own checkpoint of NAME (--export, --keep for CRIU's log): the archive, dump.log's text."""
    source_id = pair.src.inspect(NAME)["Id"]
    archive = tmp_path / "checkpoint.tar"
    pair.src.podman(
        "container", "checkpoint", NAME, "--export", str(archive), "--compress", "none", "--keep", timeout=120
    )
    return archive, next(pair.src.dir.glob(f"root/overlay-containers/{source_id}/userdata/dump.log")).read_text()


def restore_keeping_logs(pair, archive):
    """podman's own restore of the archive as NAME (--keep): its inspect, restore.log's text."""
    proc = pair.dst.podman("container", "restore", "--import", str(archive), "--name", NAME, "--keep", timeout=120)
    restored_id = proc.stdout.split()[-1]
    info = pair.dst.inspect(NAME)
    assert info["State"]["Status"] == "running", info["State"]
    return info, next(pair.dst.dir.glob(f"root/overlay-containers/{restored_id}/userdata/restore.log")).read_text()


def test_empty_read_only_tmpfs_skips_tar(pair, tmp_path):
    """CRIU's patch 0006: an empty read-only tmpfs (runc's masked paths, a
    `--mount type=tmpfs,ro=true`) is dumped as the fixed empty archive
    without tar, and restored without tar; a writable tmpfs keeps its
    files through tar. podman's own checkpoint and restore (--keep, for
    CRIU's logs and images), the restored mounts as the source's were."""
    wl = pair.src.start(NAME, pair.report_dir, annotate=False, run_opts=TMPFS_OPTS, before=f"echo k > {SCRATCH}/kept; ")
    before = pair.src.podman("exec", NAME, "sh", "-c", SHOW_TMPFS).stdout
    assert f"{RO_EMPTY} tmpfs ro," in before and "mode=750" in before and f"{SCRATCH} tmpfs rw," in before, before
    archive, dump_log = checkpoint_keeping_logs(pair, tmp_path)
    mnt_ids = tmpfs_mnt_ids(dump_log)
    for path in (*MASKED, RO_EMPTY):
        assert f"tmpfs {mnt_ids[path]} is empty and read-only: no tar" in dump_log, (path, mnt_ids)
    for path in ("/dev", SCRATCH):  # files in them: tar as before
        assert f"tmpfs {mnt_ids[path]} is empty" not in dump_log, (path, mnt_ids)
    with tarfile.open(archive) as tar:
        sizes = {m.name: m.size for m in tar if m.name.startswith("checkpoint/tmpfs-dev-")}
    assert sorted(sizes.values()).count(45) == len(MASKED) + 1, sizes  # the fixed empty archive, 45 bytes each

    info, restore_log = restore_keeping_logs(pair, archive)
    assert restore_log.count("was dumped empty: no tar") == len(MASKED) + 1, restore_log[-3000:]
    assert pair.dst.podman("exec", NAME, "sh", "-c", SHOW_TMPFS).stdout == before
    verified(Workload(info["State"]["Pid"], pair.report_dir / "report.jsonl", 1))
    assert not wl.alive()


@pytest.mark.parametrize("network", ["none", "bridge"])
def test_restore_skips_the_network_lock_when_asked(pair, tmp_path, network):
    """CRIU's patch 0007 (serve's restores ask for it): `network-lock skip`
    in the restore's CRIU config, against a dump that locked with
    iptables, means no lock and no unlock of the netns podman made for the
    restore (`--network=none`: CRIU's --empty-ns net; a bridge: an
    external netns); the restored container's netns holds no CRIU rule."""
    conf = tmp_path / "criu.conf"  # absent at the dump: CRIU locks as usual
    pair.src.podman("run", "-d", "--name", NAME, f"--network={network}", *ULIMITS,
                    "--annotation", f"org.criu.config={conf}", IMAGE, "sleep", "1000", timeout=120)  # fmt: skip
    archive = tmp_path / "checkpoint.tar"
    pair.src.podman("container", "checkpoint", NAME, "--export", str(archive), "--compress", "none", timeout=120)
    conf.write_text("network-lock skip\n")
    info, restore_log = restore_keeping_logs(pair, archive)
    assert "Network lock skipped on restore, as asked" in restore_log, restore_log[-3000:]
    for tool in ("iptables", "ip6tables"):
        rules = subprocess.run(["nsenter", "-t", str(info["State"]["Pid"]), "-n", tool, "-S"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert rules.returncode == 0 and "CRIU" not in rules.stdout, (tool, rules.stdout, rules.stderr)


# /dev and cgroup v1's /sys/fs/cgroup: what CRIU's in-process tar (patch 0010) must keep as tar did
SHOW_DEV = (
    "for f in /dev /dev/* /sys/fs/cgroup /sys/fs/cgroup/*; do"
    # a mount point's own root is the mounted file system's, a new mount after a restore
    ' if [ $f = /dev ] || [ $f = /sys/fs/cgroup ] || ! grep -q " $f " /proc/mounts; then'
    " stat -c '%n %f %u %g %t %T %Y %N' $f; fi;"
    " done"
)


def test_dev_and_cgroup_tmpfs_without_tar(pair, tmp_path):
    """CRIU's patches 0009 and 0010: a container's /dev (device nodes,
    links, mount points) and /sys/fs/cgroup (mount points, links) are
    dumped and restored without running tar, into images any tar reads as
    tar.gz; every entry comes back with its type, mode, owner, device
    numbers, mtime and link target. The container's netns (runc's
    --empty-ns net) is dumped without its conntrack tables."""
    wl = pair.src.start(NAME, pair.report_dir, annotate=False)
    before = pair.src.podman("exec", NAME, "sh", "-c", SHOW_DEV).stdout
    assert "/dev/null 21b6 0 0 1 3" in before and "/dev/ptmx" in before and "/sys/fs/cgroup 416d" in before, before
    archive, dump_log = checkpoint_keeping_logs(pair, tmp_path)
    mnt_ids = tmpfs_mnt_ids(dump_log)
    for path in ("/dev", "/sys/fs/cgroup"):
        assert f"tmpfs {mnt_ids[path]} dumped without tar" in dump_log, (path, mnt_ids)
    assert "Conntrack of netns" in dump_log and "not dumped" in dump_log
    members = {}
    with tarfile.open(archive) as outer:
        for m in outer:
            if m.name.startswith("checkpoint/tmpfs-dev-") and m.size > 45:
                f = outer.extractfile(m)
                assert f is not None
                with tarfile.open(fileobj=f, mode="r:gz") as inner:  # what a CRIU without 0010 runs tar on
                    members[m.name] = {i.name: i for i in inner}
    devs = [ms for ms in members.values() if "./null" in ms]
    assert len(members) == 2 and len(devs) == 1, members
    assert devs[0]["./null"].ischr() and (devs[0]["./null"].devmajor, devs[0]["./null"].devminor) == (1, 3)
    assert devs[0]["./ptmx"].issym() and devs[0]["./ptmx"].linkname == "pts/ptmx"

    info, restore_log = restore_keeping_logs(pair, archive)
    assert restore_log.count("restored without tar") == 2, restore_log[-3000:]
    assert pair.dst.podman("exec", NAME, "sh", "-c", SHOW_DEV).stdout == before
    verified(Workload(info["State"]["Pid"], pair.report_dir / "report.jsonl", 1))
    assert not wl.alive()


def test_restore_moves_no_task_into_the_cgroups_it_is_in(pair, tmp_path):
    """CRIU's patch 0012: runc moves CRIU into the restored container's
    cgroups before the restore, so its root task is born in them; CRIU
    then writes no pid to their cgroup.procs (each write waits for an RCU
    grace period, the container frozen). The task ends in the container's
    cgroups all the same, as podman and runc name them."""
    wl = pair.src.start(NAME, pair.report_dir, annotate=False)
    archive, _ = checkpoint_keeping_logs(pair, tmp_path)
    info, restore_log = restore_keeping_logs(pair, archive)
    moves = [line for line in restore_log.splitlines() if "cg:   `->" in line]
    assert moves and all(line.endswith(": in it already") for line in moves), restore_log[-3000:]
    with open(f"/proc/{info['State']['Pid']}/cgroup") as f:
        cgroups = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in cgroups:
        if controllers in ("", "pids", "memory", "freezer", "devices", "blkio", "cpu", "cpuset", "cpuacct"):
            assert path.endswith("/libpod-" + info["Id"]), (controllers, path)
    verified(Workload(info["State"]["Pid"], pair.report_dir / "report.jsonl", 1))
    assert not wl.alive()


def test_restore_held_in_criu_before_the_images(env):
    """CRIU's patch 0013 (`--pre-restore-first`): serve lets the
    destination's restore go on during pre-copy up to CRIU's pre-restore
    script, which CRIU now runs before it reads any image (runc's
    descriptors.json came ahead); the container is restored once the
    images are there, every page verified."""
    from hybridmig.doctor import check_criu_pre_restore_first

    assert check_criu_pre_restore_first().ok, check_criu_pre_restore_first().detail
    wl = env.pair.src.start(NAME, env.pair.report_dir)
    serve = env.serve("--keep")
    rc, report, err = env.run(NAME)
    assert rc == 0 and report["result"] == "migrated", err
    assert serve.wait(60) == 0, serve.log()
    log = next(serve.base_dir.rglob("restore.log")).read_text(errors="replace")
    # the pre-restore script ran before CRIU read the inventory
    assert log.index("pre-restore scripts run before the images are read") < log.index("Reading image tree"), log[:3000]
    info = env.pair.dst.inspect(NAME)
    assert info["State"]["Status"] == "running" and info["State"]["Pid"] == report["restored_pid"], info["State"]
    verified(Workload(info["State"]["Pid"], env.pair.report_dir / "report.jsonl", 1))
    assert not wl.alive()
