"""`hybridmig run` → `hybridmig serve` end to end: real CRIU, real process
trees (memwork, which checks every one of its pages), two network
namespaces joined by a veth as the two hosts.

Successful migrations must leave exactly one copy, in the destination's
network namespace, with every page intact and no remote fault; failed ones
must leave the source running, untouched (no tracker left attached, not
frozen) and intact, with nothing restored on the destination.
"""

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from hybridmig.keys import generate_key
from hybridmig.testing.netns import TwoHosts
from hybridmig.testing.workload import Workload, WorkloadError
from lazy_util import lost_memory, restored_alive
from migrate_util import (
    PORT,
    BackgroundRun,
    Cleanup,
    PyTree,
    Serve,
    held_by_criu,
    kill_by_report,
    net_ns_inode,
    netns_inode,
    run_migration,
    settle,
    state,
    tracked,
    uffd_fds,
    wait_for,
)

MIB = 1 << 20


class Env:
    """Two hosts, a key file, and everything started by a test (stopped at teardown)."""

    def __init__(self, hosts, tmp_path, cleanup):
        self.hosts = hosts
        self.tmp = tmp_path
        self.cleanup = cleanup
        self.key = tmp_path / "key"
        generate_key(self.key)

    def other_key(self):
        path = self.tmp / "other-key"
        generate_key(path)
        return path

    def new_dir(self, name):
        """A fresh directory, removed at teardown. Short, under /tmp: serve's
        lazy-pages socket lives below its --dir (see test_serve_dir_with_long_path)."""
        path = Path(tempfile.mkdtemp(prefix=f"hm-{name[:8]}-", dir="/tmp"))
        self.cleanup.add(shutil.rmtree, str(path), True)
        return path

    def workload(self, size_mb, ns=None, **kw):
        wl = Workload.start(size_mb, netns=ns or self.hosts.src, **kw)
        self.cleanup.add(kill_by_report, str(wl.report_path))  # last: any copy left behind
        self.cleanup.add(wl.stop)
        return wl

    def _restored(self, result):
        rc, rep, err = result
        if rep and rep.get("restored_pid"):
            self.cleanup.kill_pid_tree(rep["restored_pid"])  # whatever the test expected
        return result

    def adopt(self, pid, old):
        self.cleanup.kill_pid_tree(pid)  # even if adopt itself fails
        wl = Workload.adopt(pid, report=old)
        self.cleanup.add(wl.stop)
        return wl

    def serve(self, ns=None, addr=None, key=None, base_dir=None, env=None, keep=False):
        ns = ns or self.hosts.dst
        addr = addr or (self.hosts.dst_addr if ns == self.hosts.dst else self.hosts.src_addr)
        base_dir = base_dir or self.new_dir("serve")
        return Serve(
            self.hosts, ns, addr, base_dir, key or self.key, self.cleanup, self.tmp, env=env, keep=keep
        ).wait_listening()

    def to(self, ns=None):
        ns = ns or self.hosts.dst
        return "%s:%d" % (self.hosts.dst_addr if ns == self.hosts.dst else self.hosts.src_addr, PORT)

    def run(self, pid, *extra, ns=None, to=None, key=None, timeout=180):
        extra = _precopy_unless_told(extra)
        return self._restored(
            run_migration(
                self.hosts, ns or self.hosts.src, pid, to or self.to(), key or self.key, *extra, timeout=timeout
            )
        )

    def run_background(self, pid, *extra, ns=None, to=None, key=None):
        extra = _precopy_unless_told(extra)
        run = BackgroundRun(
            self.hosts,
            ns or self.hosts.src,
            pid,
            to or self.to(),
            key or self.key,
            *extra,
            cleanup=self.cleanup,
            log_dir=self.tmp,
        )
        wait = run.wait
        run.wait = lambda timeout=180: self._restored(wait(timeout))
        return run


def _precopy_unless_told(extra):
    """These tests are of pre-copy and its failures (a failed run resumes
    the source): `auto`, the default, would switch to post-copy whenever a
    loaded machine makes the rounds stop shrinking. tests/test_postcopy.py
    asks for the other modes."""
    return extra if any(str(a).startswith("--switchover") for a in extra) else ("--switchover", "precopy", *extra)


@pytest.fixture
def env(criu_ready, tmp_path):
    cleanup = Cleanup()
    with TwoHosts() as hosts:  # removed on exit, whatever happens
        try:
            yield Env(hosts, tmp_path, cleanup)
        finally:
            cleanup.run()


# --- checks ----------------------------------------------------------------------------


def assert_intact(results, procs):
    assert len(results) == procs, results
    for r in results:
        assert r["bad"] == 0, r.get("bad_detail", r)
        assert r["zero_pages_bad"] == 0, r
        assert r["first_bad"] == -1, r
    return results


def assert_migrated(
    env, wl, rc, rep, err, serve, size_mb, procs=1, dst_ns=None, kept=False, compressed=False, postcopy=False
):
    """The checks of a successful migration of wl (size_mb MiB per process);
    returns the restored Workload. kept: serve ran with --keep. compressed:
    the memory travels compressed (fewer bytes than its size). postcopy: it
    switched over to post-copy (remote faults are its way)."""
    dst_ns = dst_ns or env.hosts.dst
    assert rc == 0, err
    assert rep is not None, "no JSON report on stdout"
    if rep.get("restored_pid"):
        env.cleanup.kill_pid_tree(rep["restored_pid"])
    assert rep["result"] == "migrated", rep
    assert rep["pid"] == wl.host_pid
    rounds = rep["rounds"]
    assert isinstance(rounds, list) and len(rounds) >= 2, rounds
    assert [bool(r.get("final")) for r in rounds] == [False] * (len(rounds) - 1) + [True], rounds
    assert rounds[0]["number"] == 0 and rounds[0]["pages_sent"] >= procs * size_mb * MIB // 4096, rounds[0]
    for r in rounds:  # each round's rate, and where its time went (within its duration)
        parts = sum(r[k] for k in ("scan_s", "read_s", "encode_s", "seal_s", "send_s", "ack_s"))
        assert r["frames"] >= r["frames_lz4"] >= 0 and parts <= r["duration_s"] * 1.01 + 1e-3, r
        assert r["rate_mb_s"] == pytest.approx(r["bytes_raw"] / r["duration_s"] / 1e6 if r["duration_s"] else 0), r
    assert rep["downtime_ms"] is not None and rep["downtime_ms"] > 0, rep
    assert rep["bytes_sent"] >= procs * size_mb * MIB * (0.1 if compressed else 1), rep["bytes_sent"]
    assert rep["switchover"] == ("postcopy" if postcopy else "precopy"), rep
    if not postcopy:
        assert rep["remote_faults"] == 0, rep
        assert rep["destination"]["remote_pages"] == 0, rep["destination"]
    assert rep["destination"]["ok"] is True, rep["destination"]
    restore = rep["destination"]["restore_breakdown_ms"]
    assert set(restore) == {"daemon_ready", "criu_to_connected", "connected_to_finished", "finished_to_exit"}, restore
    assert all(v >= 0 for v in restore.values()), restore
    assert abs(sum(restore.values()) - rep["breakdown"]["restore_ms"]) < 1, (restore, rep["breakdown"])
    print(
        "migrated: downtime %.1f ms, %d rounds, %d bytes, breakdown %s, restore %s"
        % (rep["downtime_ms"], len(rounds), rep["bytes_sent"], rep["breakdown"], restore)
    )

    # exactly one copy: the source tree is gone ...
    old_pids = list(wl._known)
    wl.wait_gone(30)
    assert not [p for p in old_pids if psutil.pid_exists(p) and state(p) != "Z"], old_pids

    # ... and the restored one is whole, intact, in the destination's network namespace
    new = env.adopt(rep["restored_pid"], wl)
    assert len(new.pids()) == procs, new.pids()
    assert sorted(new.ns_pids().values()) == list(range(1, procs + 1))
    for pid in new.pids():
        assert net_ns_inode(pid) == netns_inode(dst_ns), "pid %d is not in %s" % (pid, dst_ns)
        assert not tracked(pid) and not uffd_fds(pid), "pid %d still carries a userfaultfd" % pid
    assert_intact(new.verify(), procs)
    time.sleep(0.3)  # it keeps running: writes after the restore check out too
    assert_intact(new.verify(), procs)

    assert serve.wait(60) == 0, serve.log()
    if kept:
        (session,) = os.listdir(serve.base_dir)
        restore_log = (serve.base_dir / session / "images" / "restore.log").read_text()
        assert "Restore finished successfully" in restore_log, restore_log[-2000:]
    else:
        assert os.listdir(serve.base_dir) == [], "serve left its session dir behind after a commit"
    return new


def restored_copies(wl, source_pids):
    """Live processes of this workload (by its report path) other than the
    source's own: restored copies."""
    ours = set(source_pids) | ({wl._popen.pid} if wl._popen else set())
    return set(restored_alive(wl.report_path)) - ours


def assert_rolled_back(env, wl, pids_before, rc, rep, err, procs=1):
    """A failed run: non-zero, a reason, the JSON failure, the source untouched and intact."""
    assert rc != 0
    assert "error" in err, err
    assert rep is not None, "no JSON on stdout"
    assert rep["result"] == "failed" and rep["error"], rep
    assert rep["pid"] == wl.host_pid
    assert wl.alive(), "the source is gone"
    assert wl.pids() == pids_before, (wl.pids(), pids_before)
    for pid in pids_before:
        assert state(pid) not in ("T", "t", "Z", "X"), "pid %d is %s" % (pid, state(pid))
        assert not uffd_fds(pid), "pid %d was left a userfaultfd" % pid
        assert not tracked(pid), "pid %d was left write-protected (uffd-wp)" % pid
    assert_intact(wl.verify(), procs)
    time.sleep(0.2)
    assert_intact(wl.verify(), procs)  # and it is running, not frozen
    # nothing restored anywhere: the only processes of this workload are the source's
    assert not restored_copies(wl, pids_before), restored_copies(wl, pids_before)
    return rep["error"]


def assert_no_leftovers(serve, timeout=30):
    """Once serve is done, nothing it started (criu restore and its helpers,
    all named by the session dir on their command line) is left running."""

    def leftovers():
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.info["pid"] != serve.proc.pid and str(serve.base_dir) in " ".join(p.info["cmdline"] or []):
                out.append((p.info["pid"], " ".join(p.info["cmdline"])[:200]))
        return out

    try:
        wait_for(lambda: not leftovers(), timeout, "serve's helpers to end")
    except TimeoutError:
        raise AssertionError(f"left behind by serve: {leftovers()}") from None


# --- successful migrations ------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_one_thread(env):
    """(with relative paths: serve's --dir, and run's --work-dir, which
    keeps CRIU's images and log)"""
    wl = env.workload(256, threads=1, rate=2000)
    serve = env.serve(base_dir=os.path.relpath(env.new_dir("serve")))
    work = env.new_dir("work") / "run"
    rc, rep, err = env.run(wl.host_pid, "--work-dir", os.path.relpath(work))
    assert_migrated(env, wl, rc, rep, err, serve, 256)
    assert "Dumping finished successfully" in (work / "images" / "dump.log").read_text()


@pytest.mark.timeout(240)
def test_eight_threads(env):
    wl = env.workload(128, threads=8, rate=1000)
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid)
    assert_migrated(env, wl, rc, rep, err, serve, 128)


@pytest.mark.timeout(240)
def test_tree_of_three(env):
    wl = env.workload(64, threads=2, procs=3, rate=1000)
    assert len(wl.pids()) == 3
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid)
    assert_migrated(env, wl, rc, rep, err, serve, 64, procs=3)


def _wait_in_precopy(wl, run):
    """Until run's dirty tracker is attached to the root (it is pre-copying)."""
    wait_for(lambda: tracked(wl.host_pid) or not run.running(), 30, "run to attach its tracker")
    assert run.running(), "run ended before its rounds could be observed"


def _during_precopy(wl, run, action, seconds=30):
    """Call action() (a churn or fork verify of the source) again and again
    while run pre-copies; returns the results of those that completed
    before the switch-over began. One that races the switch-over (the
    source is frozen, then gone, and the restored copy answers) is left out."""
    done = []
    t_end = time.monotonic() + seconds
    while run.running() and time.monotonic() < t_end:
        if held_by_criu(wl.pids()):
            break  # the switch-over began
        try:
            res = action()
        except WorkloadError:
            if run.running() and wl.alive() and not held_by_criu(wl.pids()):
                raise
            break
        if not run.running():
            break
        done.append(res)
        time.sleep(0.2)
    return done


def _run_slow_rounds(env, wl):
    """run in the background with rate-limited rounds that do not converge
    on their own estimate (what a test does to the tree lands in round 0
    and in later rounds), once it is in pre-copy."""
    run = env.run_background(
        wl.host_pid, "--switchover", "precopy", "--max-rounds", "50", "--target-downtime", "1",
        "--bandwidth-limit", "60M",
    )  # fmt: skip
    _wait_in_precopy(wl, run)
    return run


@pytest.mark.timeout(240)
def test_churn_during_precopy(env):
    """mremap/munmap/MADV_DONTNEED of the source's memory during its rounds."""
    wl = env.workload(128, threads=2, rate=1000)
    serve = env.serve()
    run = _run_slow_rounds(env, wl)
    churns = _during_precopy(wl, run, wl.churn_verify)
    assert len(churns) >= 2, "only %d churns happened during pre-copy" % len(churns)
    for res in churns:
        for r in assert_intact(res, 1):
            assert r["churn"]["done"], r
    rc, rep, err = run.wait(180)
    new = assert_migrated(env, wl, rc, rep, err, serve, 128)
    # the restored mappings can be churned in turn
    for r in assert_intact(new.churn_verify(), 1):
        assert r["churn"]["done"], r
    assert_intact(new.verify(), 1)


@pytest.mark.timeout(240)
def test_fork_during_precopy(env):
    """Each process of the tree forks a short-lived child (which checks the
    memory it inherited) again and again during the rounds."""
    wl = env.workload(128, threads=1, procs=2, rate=1000)
    serve = env.serve()
    run = _run_slow_rounds(env, wl)
    forks = _during_precopy(wl, run, wl.fork_verify)
    assert len(forks) >= 2, "only %d fork-verifies happened during pre-copy" % len(forks)
    for res in forks:
        assert_intact(res, 2)
    rc, rep, err = run.wait(180)
    new = assert_migrated(env, wl, rc, rep, err, serve, 128, procs=2)
    assert_intact(new.fork_verify(), 2)
    assert_intact(new.verify(), 2)


@pytest.mark.timeout(300)
def test_migrate_there_and_back(env):
    h = env.hosts
    wl = env.workload(128, threads=2, rate=2000)
    serve = env.serve(h.dst)
    rc, rep, err = env.run(wl.host_pid)
    there = assert_migrated(env, wl, rc, rep, err, serve, 128)

    back_serve = env.serve(h.src, keep=True)  # and --keep leaves the session's images and logs
    rc, rep, err = env.run(there.host_pid, ns=h.dst, to=env.to(h.src))
    assert_migrated(env, there, rc, rep, err, back_serve, 128, dst_ns=h.src, kept=True)


# --- rollback ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_wrong_key(env):
    wl = env.workload(64, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid, key=env.other_key(), timeout=60)
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "key" in error.lower() or "authentic" in error.lower(), error
    # serve refused that source and keeps waiting for a good one (or gave up)
    time.sleep(0.5)
    assert serve.proc.poll() in (None, 1, 2), serve.log()
    assert "failed authentication" in serve.log(), serve.log()
    assert os.listdir(serve.base_dir) == [], "a session was opened for a source without the key"


@pytest.mark.timeout(120)
def test_destination_unreachable(env):
    wl = env.workload(64, rate=2000)
    pids = wl.pids()
    rc, rep, err = env.run(wl.host_pid, timeout=60)  # nobody listens on the destination
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "connect" in error.lower(), error


@pytest.mark.timeout(180)
def test_destination_busy_with_another_migration(env):
    """serve takes one source at a time: a second run is told so within its
    connect timeout, and its process runs on intact; the first migrates."""
    first = env.workload(128, threads=2, rate=2000)
    second = env.workload(32, rate=2000)
    second_pids = second.pids()
    serve = env.serve()
    run = env.run_background(first.host_pid, "--bandwidth-limit", "20M")  # round 0 alone takes ~6 s
    _wait_in_precopy(first, run)
    rc, rep, err = env.run(second.host_pid, timeout=60)
    error = assert_rolled_back(env, second, second_pids, rc, rep, err)
    assert "busy with another migration" in error, error
    assert_intact(second.verify(), 1)
    rc, rep, err = run.wait(120)
    assert_migrated(env, first, rc, rep, err, serve, 128)


@pytest.mark.timeout(180)
def test_destination_hangs_during_rounds(env):
    """serve stops answering during the rounds (SIGSTOP: its kernel still
    acks, so TCP sees nothing wrong): run gives up after --timeout, and the
    source runs on intact."""
    wl = env.workload(256, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid, "--bandwidth-limit", "40M", "--timeout", "5")
    _wait_in_precopy(wl, run)
    serve.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        rc, rep, err = run.wait(60)
        assert time.monotonic() - t0 < 5 + 20, "run waited far longer than --timeout"
        error = assert_rolled_back(env, wl, pids, rc, rep, err)
        assert "too long" in error or "timed out" in error, error
    finally:
        serve.proc.send_signal(signal.SIGCONT)
    assert_intact(wl.verify(), 1)


@pytest.mark.timeout(180)
def test_destination_killed_during_rounds(env):
    wl = env.workload(256, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid, "--bandwidth-limit", "40M")  # round 0 alone takes ~6 s
    _wait_in_precopy(wl, run)
    time.sleep(1.0)
    assert run.running()
    serve.kill()
    rc, rep, err = run.wait(120)
    assert_rolled_back(env, wl, pids, rc, rep, err)


@pytest.mark.timeout(180)
def test_link_cut_during_rounds(env):
    """The link between the hosts goes down in the middle of pre-copy (no
    FIN, no RST: packets just stop): both ends give up on the session within
    wire.DEAD_PEER_S, and the source runs on intact."""
    wl = env.workload(256, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid, "--bandwidth-limit", "40M")  # round 0 alone takes ~6 s
    _wait_in_precopy(wl, run)
    h = env.hosts
    subprocess.run(["ip", "-n", h.src, "link", "set", h.veth[0], "down"], check=True)
    try:
        t0 = time.monotonic()
        rc, rep, err = run.wait(120)
        assert time.monotonic() - t0 < 90, "run took TCP's own retries to notice"
        assert_rolled_back(env, wl, pids, rc, rep, err)
        assert serve.wait(90) not in (0, None), serve.log()
    finally:
        subprocess.run(["ip", "-n", h.src, "link", "set", h.veth[0], "up"], check=True)


FAIL_STAGE_HOOK = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = "{stage}" ] && {{ echo "injected failure at $CRTOOLS_SCRIPT_ACTION" >&2; exit 1; }}
exit 0
"""
CRIU_WRAPPER = """#!/bin/sh
# the real criu, with an action script that fails restores at one stage
if [ "$1" = restore ]; then exec {criu} "$@" --action-script {hook}; fi
exec {criu} "$@"
"""


def criu_with_hook(env, hook_text, wrapper_text=None):
    """A `criu` for $CRIU: the real one, run by wrapper_text (default
    CRIU_WRAPPER: restores run hook_text as their action script)."""
    from hybridmig.doctor import find_criu

    tools = env.new_dir("criu-wrapper")
    hook = tools / "hook"
    hook.write_text(hook_text)
    wrapper = tools / "criu"
    wrapper.write_text((wrapper_text or CRIU_WRAPPER).format(criu=find_criu(), hook=hook))
    os.chmod(hook, 0o755)
    os.chmod(wrapper, 0o755)
    return wrapper


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", ["pre-restore", "post-restore"])  # CRIU ignores a failing pre-resume
def test_restore_fails(env, stage):
    """criu restore fails on the destination (an action script of its fails
    at `stage`): the destination reports it and the source resumes."""
    wrapper = criu_with_hook(env, FAIL_STAGE_HOOK.format(stage=stage))

    wl = env.workload(128, threads=2, procs=2, rate=2000)
    pids = wl.pids()
    serve = env.serve(env=({"CRIU": str(wrapper)}))
    rc, rep, err = env.run(wl.host_pid, timeout=150)
    error = assert_rolled_back(env, wl, pids, rc, rep, err, procs=2)
    assert "restore" in error, error
    assert serve.wait(60) not in (0, None), serve.log()
    assert "injected failure" in serve.log() or "criu restore failed" in serve.log(), serve.log()
    assert_no_leftovers(serve)


def serve_restores(serve, criu_only=True):
    """serve's criu restore: CRIU (or, not criu_only, also setpriv, the
    parent check or a wrapper before their exec), found by serve's dir in
    their command line."""
    return [
        p
        for p in psutil.process_iter(["cmdline", "name"])
        if "restore" in (p.info["cmdline"] or [])
        and str(serve.base_dir) in " ".join(p.info["cmdline"])
        and (p.info["name"] == "criu" or not criu_only)
    ]


HANG_HOOK = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = pre-restore ] && sleep {seconds}
exit 0
"""


def _run_until_restore_held(env, seconds):
    """A 64 MiB workload, run in the background, and serve's criu restore
    held `seconds` in a pre-restore action script; returns (wl, its pids,
    serve, run) once that criu restore runs (criu itself, not setpriv or
    the wrapper before their exec: its parent-death signal is set)."""
    wrapper = criu_with_hook(env, HANG_HOOK.format(seconds=seconds))
    wl = env.workload(64, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve(env={"CRIU": str(wrapper)})
    run = env.run_background(wl.host_pid)
    wait_for(lambda: serve_restores(serve) or not run.running(), 120, "serve's criu restore")
    assert run.running(), run.err_path.read_text()
    return wl, pids, serve, run


@pytest.mark.timeout(240)
def test_restore_outlasts_the_timeout(env):
    """The destination's restore hangs (an action script sleeps at
    pre-restore) longer than `run --timeout`: run gives up, the source
    resumes intact, and the destination ends the copy it restores late."""
    wrapper = criu_with_hook(env, HANG_HOOK.format(seconds=20))

    wl = env.workload(64, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve(env={"CRIU": str(wrapper)})
    t0 = time.monotonic()
    rc, rep, err = env.run(wl.host_pid, "--timeout", "5")
    assert time.monotonic() - t0 < 20 + 10, "run waited for the hanging restore"
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "sent nothing for too long" in error and "resumed" in error, error
    assert serve.wait(120) not in (0, None), serve.log()
    assert_no_leftovers(serve)
    wait_for(lambda: not restored_copies(wl, pids), 10, "the late restored copy to be ended")
    assert_intact(wl.verify(), 1)


@pytest.mark.timeout(180)
def test_run_killed_while_the_destination_restores(env):
    """`run` is SIGKILLed while the destination restores (held 5 s in a
    pre-restore action script). CRIU, given no verdict, resumes the source;
    the destination, never sent COMMIT, ends the copy it restores, though
    that restore succeeds and its RESULT leaves. One copy: the source."""
    wl, pids, serve, run = _run_until_restore_held(env, 5)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(10)
    wait_for(lambda: all(state(p) not in ("t", "T") for p in pids), 30, "the source to run again")
    assert serve.wait(60) not in (0, None), serve.log()
    assert "restore failed" not in serve.log(), serve.log()  # the restore itself went well
    assert not restored_copies(wl, pids), (restored_copies(wl, pids), serve.log())
    assert_intact(wl.verify(), 1)


@pytest.mark.timeout(180)
def test_destination_killed_during_the_switch_over(env):
    """serve is SIGKILLed while its criu restore runs (held in a pre-restore
    action script): the source resumes intact, and serve's CRIU dies with
    it (a parent-death signal) instead of restoring a second copy later."""
    wl, pids, serve, run = _run_until_restore_held(env, 15)
    serve.kill()
    rc, rep, err = run.wait(120)
    assert_rolled_back(env, wl, pids, rc, rep, err)
    wait_for(
        lambda: not serve_restores(serve, criu_only=False),
        3,
        "serve's criu restore to die (its action script sleeps 15 s)",
    )
    time.sleep(13)  # past the action script's sleep: nothing restores late
    assert not restored_copies(wl, pids), restored_copies(wl, pids)
    assert_intact(wl.verify(), 1)


HANG_AFTER_SETUP_NS = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-setup-namespaces ] && sleep 15
exit 0
"""


@pytest.mark.timeout(180)
def test_destination_killed_with_its_restore_half_done(env):
    """serve is SIGKILLed while its criu restore has forked the restored
    root but not finished (held in a post-setup-namespaces action script):
    CRIU dies with serve, and the root, half-restored in CRIU's restorer and
    named by no pidfile yet, must not stay behind (found by the soak). The
    guard knows it from serve's own restore action script."""
    wrapper = criu_with_hook(env, HANG_AFTER_SETUP_NS)
    wl = env.workload(64, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve(env={"CRIU": str(wrapper)})
    run = env.run_background(wl.host_pid)
    session = wait_for(lambda: list(serve.base_dir.glob("session-*")) or not run.running(), 60, "the session")
    root_file = session[0] / "restore.root"
    wait_for(lambda: root_file.exists() or not run.running(), 120, "the restored root")
    assert run.running(), run.err_path.read_text()
    root = int(root_file.read_text())
    serve.kill()
    rc, rep, err = run.wait(120)
    assert_rolled_back(env, wl, pids, rc, rep, err)
    dst = netns_inode(env.hosts.dst)

    def left():
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if net_ns_inode(p.info["pid"]) == dst and state(p.info["pid"]) != "Z":
                    out.append(p.info["pid"])
            except OSError:  # gone, or not ours to look at (init)
                pass
        return out

    wait_for(lambda: not left(), 20, "nothing left in the destination's namespace (the half-restored root %d)" % root)
    assert_intact(wl.verify(), 1)


@pytest.mark.timeout(240)
def test_destination_killed_while_installing(env):
    """serve is SIGKILLed once its criu restore has exited, the restored
    copy running, while its fault loop has most of 1 GiB still to install:
    with serve gone the copy would run on zeros for every page still owed.
    (Before CRIU's exit, CRIU dies with serve, and the tree with CRIU.) Its
    guard ends it; the source, never committed, resumes intact."""
    wl = env.workload(1024, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid)
    session = wait_for(lambda: list(serve.base_dir.glob("session-*")) or not run.running(), 60, "the session")
    pidfile = session[0] / "restore.pid"

    wait_for(
        lambda: (pidfile.exists() and not serve_restores(serve)) or not run.running(),
        150,
        "serve's criu restore to exit",
        interval=0.0005,
    )
    assert run.running(), run.err_path.read_text()
    # (its cmdline, lazy memory too, would read as zeros without serve)
    copy = psutil.Process(int(pidfile.read_text()))
    serve.kill()
    rc, rep, err = run.wait(120)
    assert_rolled_back(env, wl, pids, rc, rep, err)
    wait_for(lambda: not copy.is_running() or copy.status() == psutil.STATUS_ZOMBIE, 10, "the restored copy to end")
    # ended by its guard, not by its own crash on zeroed memory (memwork
    # segfaults within ~50 ms on it)
    assert "guard: ended the restored copy, pid %d" % copy.pid in serve.log(), serve.log()
    assert_intact(wl.verify(), 1)


def _kill_serve_after_restore(env, wl, delay):
    """One migration of wl whose serve is SIGKILLed `delay` s after its
    restore's pidfile appeared. Returns the copy that runs on: the source,
    rolled back, or, if serve had reported and the source committed first,
    the restored copy."""
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid)
    session = wait_for(lambda: list(serve.base_dir.glob("session-*")) or not run.running(), 60, "the session")
    pidfile = session[0] / "restore.pid"
    wait_for(lambda: pidfile.exists() or not run.running(), 150, "the restore's pidfile", interval=0.0005)
    time.sleep(delay)
    serve.kill()
    rc, rep, err = run.wait(120)
    assert not lost_memory(wl), "%s\n%s" % (lost_memory(wl), serve.log())
    if rc == 0 and rep and rep["result"] == "migrated":
        wl.wait_gone(30)
        copy = env.adopt(rep["restored_pid"], wl)
        assert_intact(copy.verify(), 1)
        return copy, "migrated"
    if rep and rep.get("result") == "in doubt":
        # serve died after telling its guard "commit", before its DONE went
        # out: the source stays frozen (never two copies); the restored copy,
        # which has every page (RESULT comes after the install), runs on
        error = rep["error"]
        criu_pid = int(error.split("hybridmig settle ")[1].split()[0])
        env.cleanup.kill_pid_tree(criu_pid)
        assert all(state(p) in ("t", "T") for p in pids), [state(p) for p in pids]
        copies = restored_copies(wl, pids)
        assert len(copies) <= 1, copies  # (one process per copy here)
        word = "end" if copies else "resume"
        settle(env, criu_pid, pids, word)
        if copies:
            wl.wait_gone(30)
            copy = env.adopt(min(copies), wl)
            assert_intact(copy.verify(), 1)
            return copy, "in doubt, settled: end"
        wait_for(lambda: all(state(p) not in ("t", "T") for p in pids), 30, "the source to resume")
        assert_intact(wl.verify(), 1)
        return wl, "in doubt, settled: resume"
    assert_rolled_back(env, wl, pids, rc, rep, err)
    return wl, "rolled back"


@pytest.mark.timeout(900)
def test_destination_killed_at_random_after_the_restore(env):
    """serve is SIGKILLed at a random moment (seeded, printed) after its
    criu restore wrote the pidfile, in several tries: the copy restored there
    must never run on a page it is still owed, whatever the moment; its
    faults wait until the guard has ended it. The source, never committed,
    resumes intact; if serve had reported first, the copy committed to has
    every page. HYBRIDMIG_KILL_TRIES sets the number of tries,
    HYBRIDMIG_KILL_SEED replays a run."""
    seed = int(os.environ.get("HYBRIDMIG_KILL_SEED") or random.randrange(1 << 32))
    tries = int(os.environ.get("HYBRIDMIG_KILL_TRIES") or 3)
    print("seed %d, %d tries (HYBRIDMIG_KILL_SEED=%d replays them)" % (seed, tries, seed))
    rng = random.Random(seed)
    outcomes = []
    wl = None
    for attempt in range(tries):
        # CRIU resumes the tasks a few ms after the pidfile; installing 512 MiB takes ~0.1-0.2 s more
        delay = rng.uniform(0, 0.15)
        print("try %d: serve killed %.1f ms after the pidfile appears" % (attempt, delay * 1000))
        if wl is None:
            wl = env.workload(512, threads=2, rate=4000, check_writes=True)
        wl, outcome = _kill_serve_after_restore(env, wl, delay)
        outcomes.append(outcome)
        if outcome == "migrated":
            wl.stop()
            wl = None  # (the next try starts a new source)
    print("outcomes: %s" % outcomes)


DUMP_KILLER_WRAPPER = """#!/bin/sh
# the real criu, whose dumps run one more action script: CRIU runs them in
# the reverse order of their options, so this one runs after hybridmig's
if [ "$1" = dump ]; then shift; exec {criu} dump --action-script {hook} "$@"; fi
exec {criu} "$@"
"""
KILL_CRIU_AT_POST_DUMP = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] && kill -9 $PPID
exit 0
"""


@pytest.mark.timeout(180)
def test_criu_killed_after_the_commit(env, monkeypatch):
    """The source's criu dump is SIGKILLed right after hybridmig's hook gave
    it the commit verdict: the frozen source runs again (its tracer is gone)
    while the destination holds its committed copy, which has every page.
    Exactly one copy must be left: the committed one. (run used to ABORT
    the destination while the hook's end-session child, told "commit",
    ended the source: no copy at all.)"""
    wrapper = criu_with_hook(env, KILL_CRIU_AT_POST_DUMP, DUMP_KILLER_WRAPPER)
    wl = env.workload(64, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    monkeypatch.setenv("CRIU", str(wrapper))  # run's CRIU only: serve has started
    rc, rep, err = env.run(wl.host_pid)
    assert rc == 0, err
    assert rep["result"] == "migrated", rep
    assert any("criu dump" in w for w in rep.get("warnings", [])), rep
    wait_for(lambda: not any(psutil.pid_exists(p) and state(p) != "Z" for p in pids), 30, "the source to end")
    assert serve.wait(60) == 0, serve.log()
    restored = env.adopt(rep["restored_pid"], wl)
    time.sleep(1)  # long enough for the hook's end-session child to have acted
    assert restored.alive() and rep["restored_pid"] in restored_copies(wl, pids), restored_copies(wl, pids)
    assert not any(psutil.pid_exists(p) and state(p) != "Z" for p in pids), "the source runs too"
    assert_intact(restored.verify(), 1)


# runs before hybridmig's hook (CRIU runs action scripts in the reverse order
# of their options) and leaves a killer of CRIU behind, for the final round
KILL_CRIU_DURING_THE_FINAL_ROUND = """#!/bin/sh
if [ "$CRTOOLS_SCRIPT_ACTION" = post-dump ]; then
    criu=$PPID
    (sleep 0.5; kill -9 $criu) </dev/null >/dev/null 2>&1 &
fi
exit 0
"""
DUMP_HOOK_FIRST_WRAPPER = """#!/bin/sh
if [ "$1" = dump ]; then exec {criu} "$@" --action-script {hook}; fi
exec {criu} "$@"
"""


@pytest.mark.timeout(180)
def test_criu_killed_during_the_final_round(env, monkeypatch):
    """The source's criu dump is SIGKILLed while run reads and sends the
    final pages (slowed to seconds by --bandwidth-limit): the tree runs
    again in the middle of it, so what was sent is torn (a page read before
    a write, its bookkeeping after). The destination must not restore it:
    a copy running on it read a stale page in the soak. run fails before
    RESTORE and the source runs on, intact."""
    wrapper = criu_with_hook(env, KILL_CRIU_DURING_THE_FINAL_ROUND, DUMP_HOOK_FIRST_WRAPPER)
    restored = env.new_dir("marker") / "restored"
    marker = criu_with_hook(env, "#!/bin/sh\ntouch %s\nexit 0\n" % restored)  # serve's restores
    wl = env.workload(64, threads=2, rate=5000)
    pids = wl.pids()
    serve = env.serve(env={"CRIU": str(marker)})
    monkeypatch.setenv("CRIU", str(wrapper))  # run's CRIU only: serve has started
    rc, rep, err = env.run(wl.host_pid, "--max-rounds", "1", "--bandwidth-limit", "10M", "--no-compress")
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "during the final round" in error and "nothing was restored" in error, error
    assert serve.wait(60) is not None, serve.log()
    assert not restored.exists(), "serve ran criu restore on the torn pages"
    assert not [r for r in wl.reports() if r.get("event") in ("corrupt", "crash")], wl.reports()


@pytest.mark.timeout(180)
def test_criu_killed_before_the_verdict(env):
    """The source's criu dump is SIGKILLed while the destination restores
    (held 3 s in a pre-restore action script), the tree frozen until then:
    the tree runs again at once, so the pages sent in the final round are
    no snapshot any more. run must not commit: the destination ends its copy,
    the source runs on intact, and the hook (still waiting for its verdict
    when CRIU died) leaves nothing behind and ends nothing."""
    wl, pids, serve, run = _run_until_restore_held(env, 3)
    dumps = [p for p in psutil.Process(run.proc.pid).children(recursive=True) if "dump" in p.cmdline()]
    assert dumps, "no criu dump under run"
    dump_pid = dumps[0].pid
    dumps[0].kill()
    rc, rep, err = run.wait(120)
    assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "criu dump" in rep["error"], rep["error"]
    assert serve.wait(60) not in (0, None), serve.log()
    wait_for(lambda: not restored_copies(wl, pids), 10, "the destination's copy to be ended")
    time.sleep(2)  # the hook's end-session child, if any, has acted by now
    hooks = [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [])[-3:-1] == ["end-session", str(dump_pid)]  # (not another run's)
    ]
    assert not hooks, [p.info["cmdline"] for p in hooks]
    assert_intact(wl.verify(), 1)


@pytest.mark.timeout(180)
def test_destination_cannot_store_images(env):
    """The destination fails to write the images at the switch-over (its
    session's images dir is replaced by a file during the rounds)."""
    wl = env.workload(128, threads=2, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid, "--bandwidth-limit", "60M")
    _wait_in_precopy(wl, run)
    sessions = wait_for(lambda: [d for d in serve.base_dir.glob("session-*/images")], 10, "the session dir")
    images = sessions[0]
    os.rmdir(images)
    images.write_text("not a directory\n")
    assert run.running(), "run ended before the images dir could be spoiled"
    rc, rep, err = run.wait(150)
    assert_rolled_back(env, wl, pids, rc, rep, err)
    assert serve.wait(60) not in (0, None), serve.log()
    assert_no_leftovers(serve)


@pytest.mark.timeout(120)
def test_criu_refuses_the_process(env):
    """CRIU, started with pre-copy, refuses the tree only once it seizes it
    (a perf event fd): the error names CRIU's reason, and the source, which
    CRIU resumes, runs on intact with no tracker left."""
    tree = PyTree(env.hosts, env.hosts.src, env.tmp, env.cleanup, private_mb=32, perf_event=True)
    serve = env.serve()
    rc, rep, err = env.run(tree.pid)
    assert rc != 0 and rep["result"] == "failed", rep
    assert "criu dump failed" in rep["error"] and "perf_event" in rep["error"], rep["error"]
    assert state(tree.pid) not in ("T", "t", "Z", "X"), state(tree.pid)
    assert not uffd_fds(tree.pid) and not tracked(tree.pid)
    assert tree.signal(tree.pid, signal.SIGUSR1, "check")["ok"]
    assert serve.wait(60) not in (0, None), serve.log()
    assert_no_leftovers(serve)


@pytest.mark.timeout(120)
def test_criu_fails_to_start(env):
    """CRIU starts with pre-copy: one that cannot (an allowed option with
    an argument it refuses) ends the migration, naming CRIU's complaint,
    with the source running on."""
    wl = env.workload(256, rate=1000)
    pids = wl.pids()
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid, "--criu-opt=--ext-unix-sk=no-such-inode", "--bandwidth-limit", "40M")
    assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "criu dump failed" in rep["error"] and "no-such-inode" in rep["error"], rep["error"]
    assert serve.wait(60) not in (0, None), serve.log()


@pytest.mark.timeout(60)
def test_unknown_pid(env):
    serve = env.serve()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not psutil.pid_exists(gone.pid)
    rc, rep, err = env.run(gone.pid, timeout=30)
    assert rc != 0 and rep == {"result": "failed", "error": rep["error"], "pid": gone.pid}, rep
    assert "no process" in rep["error"], rep
    assert "error" in err
    time.sleep(0.3)
    assert serve.proc.poll() is None and "session" not in serve.log(), serve.log()


@pytest.mark.timeout(60)
def test_criu_options_that_would_keep_the_source_are_refused(env):
    """--criu-opt=-R (leave running) would leave the source running after a
    commit, and hybridmig sets --port itself: both refused, naming the
    option, before anything is touched."""
    wl = env.workload(32, rate=2000)
    pids = wl.pids()
    serve = env.serve()
    for opt, why in (
        ("-R", "second copy"),
        ("--port=1234", "sets it itself"),
        ("--leave-run", "second copy"),  # CRIU's getopt_long takes any unambiguous prefix
        ("--action-scr=/x", "sets it itself"),
        ("--ghost-limit=1", "serve --allow-criu-opt ghost-limit"),  # not on the destination's list
    ):
        rc, rep, err = env.run(wl.host_pid, f"--criu-opt={opt}", timeout=30)
        error = assert_rolled_back(env, wl, pids, rc, rep, err)
        assert opt in error and why in error, error
    assert serve.proc.poll() is None and "session" not in serve.log(), serve.log()
    assert_intact(wl.verify(), 1)


@pytest.mark.timeout(60)
def test_malformed_destination(env):
    """--to without a port: a clear error, no traceback."""
    wl = env.workload(32, rate=2000)
    pids = wl.pids()
    rc, rep, err = env.run(wl.host_pid, to=env.hosts.dst_addr, timeout=30)
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "ADDRESS:PORT" in error and "Traceback" not in err, err


@pytest.mark.timeout(60)
def test_kernel_thread(env):
    serve = env.serve()
    assert psutil.Process(2).name() == "kthreadd"
    rc, rep, err = env.run(2, timeout=30)
    assert rc != 0 and rep["result"] == "failed", rep
    assert "kernel thread" in rep["error"], rep
    assert "error" in err
    assert psutil.Process(2).status() != psutil.STATUS_STOPPED
    time.sleep(0.3)
    assert serve.proc.poll() is None and "session" not in serve.log(), serve.log()


@pytest.mark.timeout(60)
def test_not_pid_namespace_init_on_same_machine(env):
    """A plain process (no pid namespace of its own) cannot be restored with
    its pid on this same machine while the source holds it: refused."""
    serve = env.serve()
    sleeper = subprocess.Popen(env.hosts.run_in(env.hosts.src) + ["sleep", "600"])
    env.cleanup.add(lambda: (sleeper.kill(), sleeper.wait(10)))
    wait_for(lambda: psutil.Process(sleeper.pid).name() == "sleep", 10, "sleep to start")
    rc, rep, err = env.run(sleeper.pid, timeout=30)
    assert rc != 0 and rep["result"] == "failed", rep
    assert "not the init of its own pid namespace" in rep["error"], rep
    assert "unshare" in rep["error"], rep
    assert "error" in err
    assert sleeper.poll() is None and state(sleeper.pid) == "S", state(sleeper.pid)
    assert not uffd_fds(sleeper.pid) and not tracked(sleeper.pid)
    # serve saw a source that went away before sending anything: nothing restored
    assert serve.wait(30) not in (0,), serve.log()
    assert os.listdir(serve.base_dir) == [], os.listdir(serve.base_dir)


@pytest.mark.timeout(120)
def test_serve_dir_with_long_path(env):
    """serve's --dir is any writable directory: one with a long path must
    either be refused when serve starts or work. (The lazy-pages socket is
    bound at DIR/session-XXXXXXXX/images/lazy-pages.socket, and a UNIX socket
    path is at most 107 bytes.)"""
    base = env.new_dir("long")
    deep = base / ("d" * (100 - len(str(base))))
    deep.mkdir()
    wl = env.workload(64, rate=2000)
    pids = wl.pids()
    serve = Serve(env.hosts, env.hosts.dst, env.hosts.dst_addr, deep, env.key, env.cleanup, env.tmp)
    wait_for(lambda: "listening on" in serve.log() or serve.proc.poll() is not None, 30, "serve to start")
    if serve.proc.poll() is not None:
        assert serve.proc.returncode != 0 and "error" in serve.log(), serve.log()
        return  # refused up front, with a reason: fine
    rc, rep, err = env.run(wl.host_pid)
    if rc != 0:
        assert_rolled_back(env, wl, pids, rc, rep, err)
    assert rc == 0, "serve accepted --dir %s (%d bytes) but the migration failed at the switch-over: %s" % (
        deep,
        len(str(deep)),
        rep["error"],
    )
    assert_migrated(env, wl, rc, rep, err, serve, 64)


# --- tree shapes beyond memwork (python processes, each init of its pid namespace) ----------


def assert_pytree_migrated(env, tree, rc, rep, err, serve, nprocs):
    assert rc == 0, err
    assert rep["result"] == "migrated", rep
    env.cleanup.kill_pid_tree(rep["restored_pid"])
    assert rep["remote_faults"] == 0, rep
    wait_for(lambda: not psutil.pid_exists(tree.pid) or state(tree.pid) == "Z", 30, "the source to end")
    new = psutil.Process(rep["restored_pid"])
    procs = [new] + new.children(recursive=True)
    assert len(procs) == nprocs, procs
    for p in procs:
        if p.status() != psutil.STATUS_ZOMBIE:  # a zombie has no namespaces left to show
            assert net_ns_inode(p.pid) == netns_inode(env.hosts.dst)
    check = tree.signal(new.pid, signal.SIGUSR1, "check")
    assert check["ok"], "the restored memory differs from the source's"
    assert serve.wait(60) == 0, serve.log()
    return new


@pytest.mark.timeout(120)
def test_tree_with_zombie(env):
    """A zombie child (exited, not yet reaped) is part of the tree CRIU dumps."""
    tree = PyTree(env.hosts, env.hosts.src, env.tmp, env.cleanup, private_mb=32, zombie=True)
    kids = psutil.Process(tree.pid).children()
    assert len(kids) == 1
    wait_for(lambda: kids[0].status() == psutil.STATUS_ZOMBIE, 10, "the child to exit")
    serve = env.serve()
    rc, rep, err = env.run(tree.pid)
    new = assert_pytree_migrated(env, tree, rc, rep, err, serve, 2)
    assert [p.status() for p in new.children()] == [psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(120)
def test_child_forked_during_precopy(env):
    """The root forks a long-lived child while run is in its rounds: the child
    is part of the tree at the switch-over and must come along."""
    _fork_during_rounds(env, PyTree(env.hosts, env.hosts.src, env.tmp, env.cleanup, private_mb=96), procs=2)


@pytest.mark.timeout(120)
def test_child_exits_during_precopy(env):
    """The root forks a child during round 0 that exits (and is reaped) while
    the next round is sending its memory: the tree lost a process, which
    is no reason to give up; the root migrates alone."""
    # 40 MB/s: round 0 (the root's ~100 MiB) ends after ~2.5 s, round 1 then
    # takes the child whole (~2.5 s more); the child ends 4 s after its fork
    _fork_during_rounds(
        env, PyTree(env.hosts, env.hosts.src, env.tmp, env.cleanup, private_mb=96, child_life=4.0), procs=1
    )


def _fork_during_rounds(env, tree, procs):
    """Migrate tree at 40 MB/s (round 0 alone takes ~2.5 s), its root
    forking once the tracker is attached; procs processes arrive."""
    serve = env.serve()
    run = env.run_background(tree.pid, "--bandwidth-limit", "40M")
    wait_for(lambda: tracked(tree.pid) or not run.running(), 30, "run to attach its tracker")
    assert run.running()
    tree.signal(tree.pid, signal.SIGUSR2, "forked")
    rc, rep, err = run.wait(120)
    assert_pytree_migrated(env, tree, rc, rep, err, serve, procs)


@pytest.mark.timeout(120)
def test_shared_memory_larger_than_a_frame(env):
    """MAP_SHARED anonymous memory is not lazy: CRIU writes it into the
    images, here 96 MiB of them, more than one wire frame (64 MiB) holds."""
    tree = PyTree(env.hosts, env.hosts.src, env.tmp, env.cleanup, private_mb=16, shared_mb=96)
    serve = env.serve()
    rc, rep, err = env.run(tree.pid)
    if rc != 0:
        print("serve log:\n" + serve.log())
    assert_pytree_migrated(env, tree, rc, rep, err, serve, 1)


# --- auto-converge ----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_auto_converge_brings_a_fast_writer_to_a_small_final_round(env):
    """A writer dirties 64 MiB at 20000 pages/s, four times what a 20 MB/s
    link carries: rounds alone never shrink. Auto-converge holds the tree a
    growing share of the time until they do; the final round is small and
    the memory arrives intact."""
    wl = env.workload(64, rate=20000)
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid, "--auto-converge", "--bandwidth-limit", "20M", timeout=240)
    assert_migrated(env, wl, rc, rep, err, serve, 64)
    rounds = rep["rounds"]
    throttle = [r["throttle_pct"] for r in rounds[:-1]]
    assert throttle == sorted(throttle) and throttle[-1] >= 50, throttle
    assert rep["auto_converge_held_s"] > 1
    assert rounds[-1]["pages_written"] < 0.25 * 64 * 256, rounds


@pytest.mark.timeout(300)
def test_run_killed_while_holding_the_tree_leaves_it_running(env):
    """The tree is held in ptrace stops, which end with their tracer: when
    `hybridmig run` is SIGKILLed in the middle of a hold, the kernel lets
    the tree go, and nothing of the tracking is left in it. The CRIU that
    run started with pre-copy, waiting in its pre-dump hook, gives up. The
    next run migrates the tree, and removes the temp dirs the killed one
    could not (its work dir and hook socket dir)."""
    wl = env.workload(64, rate=0)
    pids = wl.pids()
    serve = env.serve()
    run = env.run_background(wl.host_pid, "--auto-converge", "--bandwidth-limit", "10M")
    wait_for(
        lambda: "auto-converge" in run.err_path.read_text() or not run.running(),
        120,
        "auto-converge to start holding the tree",
    )
    wait_for(lambda: state(wl.host_pid) == "t" or not run.running(), 30, "a hold")
    assert run.running(), run.err_path.read_text()

    def criu_dumps():
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[1:4] == ["dump", "-t", str(wl.host_pid)]
        ]

    (dump,) = criu_dumps()
    cmd = dump.cmdline()
    left = [os.path.dirname(cmd[cmd.index("-D") + 1]), os.path.dirname(dump.environ()["HYBRIDMIG_HOOK_SOCKET"])]
    for d in left:  # in case the next run does not
        env.cleanup.add(shutil.rmtree, d, True)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(10)
    wait_for(lambda: all(state(p) not in ("t", "T") for p in pids), 5, "the tree to run again")
    for pid in pids:
        assert not uffd_fds(pid) and not tracked(pid), pid
    wait_for(lambda: not criu_dumps(), 10, "the waiting criu dump to give up")
    ops = wl.verify()[0]["ops"]
    time.sleep(0.3)
    after = assert_intact(wl.verify(), 1)[0]
    assert after["ops"] > ops, "the writer does not write any more"
    # (the killed run's dirs are not asserted to be there still: any run on
    # this machine, another test's too, removes those of a run that is gone)
    assert serve.wait(60) not in (0, None), serve.log()
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid)
    assert_migrated(env, wl, rc, rep, err, serve, 64)
    assert not [d for d in left if os.path.exists(d)], left
