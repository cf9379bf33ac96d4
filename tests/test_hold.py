"""run's own hold of the source (source/hold.py): once the copy may run,
the source's criu dump dying must not let the source run beside it. Real
CRIU, real post-copy and pre-copy migrations, memwork checking its pages.
Before the hold, CRIU's death let the source run again at once: post-copy
then ended the destination's copy (the process went back in time to the
switch-over), and a source left in doubt ran beside a copy that may have
been kept."""

import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from hybridmig.source.hold import RECORDS, Hold
from migrate_util import frozen_by, settle, state, tracer, wait_for
from test_commit_in_doubt import Proxy, running_copies, serve_for_many
from test_migrate import assert_intact, assert_migrated
from test_migrate import env as env  # noqa: F401 -- the fixture
from test_postcopy import assert_copy_ended, gone, postcopy_running

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.slow]


def cpu_ticks(pid):
    """utime + stime of pid, in clock ticks."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def assert_held_stopped(pids):
    """Every process stopped (not in tracing stop: its tracer is gone), and
    none of them runs for a second."""
    wait_for(lambda: all(state(p) == "T" for p in pids), 10, "the source stopped by run's hold")
    before = [cpu_ticks(p) for p in pids]
    time.sleep(1)
    assert [state(p) for p in pids] == ["T"] * len(pids)
    assert [cpu_ticks(p) for p in pids] == before, "the held source ran"


def kill_criu(wl):
    """SIGKILL the criu dump holding the source; its pid."""
    criu = psutil.Process(tracer(wl.host_pid))
    assert criu.name() == "criu" and criu.cmdline()[1] == "dump", criu.cmdline()
    criu.kill()
    return criu.pid


@pytest.mark.timeout(300)
def test_criu_killed_during_postcopy_the_migration_completes(env):
    """The source's criu dump SIGKILLed while the copy still lacks pages:
    the source stays stopped, run serves the rest from it, the migration
    completes with every page, and run ends the source."""
    wl = env.workload(64, threads=2, rate=20000)
    pids = wl.pids()
    serve, run, restored = postcopy_running(env, wl, "--bandwidth-limit", "4M")
    env.cleanup.kill_pid_tree(restored)
    kill_criu(wl)
    assert_held_stopped(pids)
    rc, rep, err = run.wait(180)
    assert_migrated(env, wl, rc, rep, err, serve, 64, postcopy=True)
    assert any("died after the switch-over" in w and "ended" in w for w in rep["warnings"]), rep["warnings"]
    assert not os.path.exists(os.path.join(RECORDS, "%d.json" % wl.host_pid))


@pytest.mark.timeout(300)
def test_run_and_criu_killed_during_postcopy_the_source_waits_to_be_settled(env):
    """run SIGKILLed while the copy lacks pages (the destination ends its
    copy), then its criu dump: nothing resumes the source behind the
    operator's back. `hybridmig settle` given the source's pid resumes it,
    whole."""
    wl = env.workload(64, rate=20000)
    pids = wl.pids()
    serve, run, restored = postcopy_running(env, wl, "--bandwidth-limit", "4M")
    env.cleanup.kill_pid_tree(restored)
    criu = psutil.Process(tracer(wl.host_pid))
    images = criu.cmdline()[criu.cmdline().index("-D") + 1]
    env.cleanup.add(shutil.rmtree, os.path.dirname(images), True)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(30)
    assert_copy_ended(serve, restored)
    kill_criu(wl)
    assert_held_stopped(pids)
    assert "has died" in settle(env, wl.host_pid, pids, "resume")
    wait_for(lambda: all(state(p) not in ("t", "T") for p in pids), 10, "the source to run again")
    assert_intact(wl.verify(), 1)
    assert not os.path.exists(os.path.join(RECORDS, "%d.json" % wl.host_pid))


@pytest.mark.timeout(240)
def test_commit_in_doubt_then_criu_killed_the_source_stays_held(env):
    """DONE lost and serve unreachable: run leaves the source in doubt,
    frozen by its criu dump and held by run. That CRIU then killed, the
    source still does not run beside the destination's copy; the pid run
    named settles it all the same (here: end, the destination kept it)."""
    wl = env.workload(32, rate=1000)
    pids = wl.pids()
    serve_for_many(env)
    proxy = Proxy(env, "refuse-later")
    rc, rep, err = env.run(wl.host_pid, "--timeout", "5", to=proxy.to)
    assert rc != 0 and rep["result"] == "in doubt", rep
    assert "held stopped" in rep["error"], rep["error"]
    criu_pid = frozen_by(env, rep["error"])
    copies = running_copies(wl)
    assert len(copies) == 1 and copies[0] not in pids, copies
    env.cleanup.kill_pid_tree(copies[0])
    os.kill(criu_pid, signal.SIGKILL)
    assert_held_stopped(pids)
    assert running_copies(wl) == copies
    settle(env, criu_pid, pids, "end")
    wait_for(lambda: all(gone(p) for p in pids), 30, "the source to end")
    assert running_copies(wl) == copies
    new = env.adopt(copies[0], wl)
    assert_intact(new.verify(), 1)


def test_a_record_whose_tree_has_ended_is_not_used(tmp_path):
    """A hold's record names its processes with their start: one whose root
    is gone (its pid free, or used again) is dropped, never signalled."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        os.makedirs(RECORDS, mode=0o700, exist_ok=True)
        path = os.path.join(RECORDS, "%d.json" % proc.pid)
        with open(path, "w") as f:  # as if another process had had its pid
            json.dump({"root": proc.pid, "criu": [1, 0], "procs": [[proc.pid, 1]], "time": 0}, f)
        assert Hold.find(proc.pid) is None
        assert not os.path.exists(path)
        with open(path, "w") as f:  # any other lookup removes it too
            json.dump({"root": proc.pid, "criu": [1, 0], "procs": [[proc.pid, 1]], "time": 0}, f)
        assert Hold.find(1) is None
        assert not os.path.exists(path)
        assert proc.poll() is None and state(proc.pid) not in ("T", "t")
    finally:
        proc.kill()
        proc.wait(10)
