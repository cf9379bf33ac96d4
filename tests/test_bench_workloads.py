"""The bench's redis and pyheap workloads, against real processes in real
network namespaces: they start and report a sane timeline, their checks pass
on an untouched run and fail on a changed dataset or a corrupted object (so
a bench result built on them can fail), and they survive a plain CRIU dump
in the source namespace and restore in the destination one (redis with its
client reconnecting there)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import types

import psutil
import pytest

from criu_util import criu_dump, criu_restore
from hybridmig.bench.workloads.base import BUCKET_S
from hybridmig.bench.workloads.nsproc import NsProcError
from hybridmig.bench.workloads.progkit import SYSTEM_PYTHON
from hybridmig.bench.workloads.pyheap import PyHeap
from hybridmig.bench.workloads.redis import Redis
from hybridmig.testing.netns import TwoHosts

pytestmark = pytest.mark.timeout(180)

RUN_S = 1.5  # how long the workloads run before they are checked


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip("needs root: network and PID namespaces")
    for tool in ("ip", "nsenter", "unshare", "setsid"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool!r} on PATH")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"the workload programs run with {SYSTEM_PYTHON}, which is missing")
    with TwoHosts(prefix="hw") as h:
        yield h


def _need_redis():
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool} (Debian's redis-server, installed by `make setup`)")


@pytest.fixture
def started():
    """started(workload, hosts) starts it; stopped at the end, also on failure."""
    workloads = []

    def start(wl, hosts):
        workloads.append(wl)
        wl.start(hosts)
        return wl

    yield start
    for wl in workloads:
        wl.stop()


def assert_sane_timeline(res, began, rate):
    now = time.time()
    assert began - 1 <= res.timeline_start <= now, res
    assert len(res.timeline_ops) >= int(RUN_S / BUCKET_S) - 1, res.timeline_ops
    # Every full bucket of the steady state did work, about rate * BUCKET_S of it.
    steady = res.timeline_ops[1:-1]
    assert all(n > 0 for n in steady), res.timeline_ops
    assert sum(steady) / len(steady) >= 0.5 * rate * BUCKET_S, res.timeline_ops
    assert 0 < res.max_gap_ms < 1000, res
    assert res.timeline_start <= res.max_gap_end <= now, res


def in_netns(ns, *cmd):
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", *cmd], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


# --- redis --------------------------------------------------------------------------
@pytest.mark.root
def test_redis_untouched_run_is_ok(hosts, started):
    _need_redis()
    began = time.time()
    wl = started(Redis(16, rate=500), hosts)
    assert wl.keys > 10000 and wl.used_memory >= 16 << 20, wl.params()
    assert wl.before()["digest"] == wl.digest
    time.sleep(RUN_S)
    res = wl.finish()
    assert res.ok, res.detail
    assert "digest same" in res.detail and " 0 bad" in res.detail, res.detail
    assert_sane_timeline(res, began, 500)
    assert res.unit == "GETs+SETs"
    again = wl.finish()  # the client is stopped now: same report, the digest taken again
    assert again.ok and again.timeline_ops == res.timeline_ops, again


@pytest.mark.root
@pytest.mark.parametrize(
    "change", [("SET", "hm-intruder", "1"), ("RENAME", "key:7", "key:7-renamed")], ids=["new-key", "renamed-key"]
)
def test_redis_detects_a_changed_dataset(hosts, started, change):
    _need_redis()
    wl = started(Redis(16, rate=500), hosts)
    wl.before()
    time.sleep(0.3)
    # Behind the workload's back; a change the client's SETs cannot undo
    # (they only rewrite key:N with its populated value).
    in_netns(hosts.src, "redis-cli", "-p", str(wl.port), *change)
    res = wl.finish()
    assert not res.ok, res.detail
    assert "CHANGED" in res.detail, res.detail


# --- pyheap -------------------------------------------------------------------------
@pytest.mark.root
def test_pyheap_untouched_run_is_ok(hosts, started):
    began = time.time()
    wl = started(PyHeap(32, rate=500), hosts)
    assert wl.items > 20000 and wl.ready["rss"] >= 32 << 20, wl.params()
    time.sleep(RUN_S)
    res = wl.finish()
    assert res.ok, res.detail
    assert res.detail == "%d items verified, 0 bad" % wl.items
    assert_sane_timeline(res, began, 500)
    # A second check after the first: still fine, and the first check's
    # pause does not count as a gap of the loop.
    time.sleep(0.3)
    again = wl.finish()
    assert again.ok and again.max_gap_ms < 1000, again


@pytest.mark.root
def test_pyheap_detects_a_corrupted_object(hosts, started):
    # At 50 updates/s over 20000+ items, the program rewriting (and so
    # repairing) the poked item before the check is a 1 in 10000 chance.
    wl = started(PyHeap(32, rate=50), hosts)
    assert wl.finish().ok
    assert wl.poke_blob(4 * 1234 + 1) >= 1
    res = wl.finish()
    assert not res.ok, res.detail
    assert "1 bad (first [%d])" % (4 * 1234 + 1) in res.detail, res.detail


# --- through CRIU -----------------------------------------------------------------
def migrate(wl, hosts, images):
    """What a stop-and-copy strategy does: dump in the source, restore in the
    destination, with the workload's CRIU options; returns (start, end)."""
    t0 = time.time()
    criu_dump(wl.host_pid, images, extra=wl.criu_opts(), netns=hosts.src, timeout=120)
    pid = criu_restore(images, extra=wl.criu_opts(), netns=hosts.dst, timeout=120)
    wl.adopt(pid)
    return t0, time.time()


def test_redis_survives_criu_migration(criu_ready, hosts, started, tmp_path):
    _need_redis()
    wl = started(Redis(32, rate=500), hosts)
    wl.before()
    time.sleep(1)
    t0, t1 = migrate(wl, hosts, tmp_path / "images")
    # redis now listens in the destination only
    assert in_netns(hosts.dst, "redis-cli", "-p", str(wl.port), "PING") == "PONG"
    time.sleep(1)
    res = wl.finish()
    assert res.ok, res.detail
    assert f"digest same ({hosts.dst})" in res.detail, res.detail
    assert " 0 reconnects" not in res.detail, res.detail
    # The longest gap is the migration's: it ends after the dump started.
    assert t0 < res.max_gap_end, (res.max_gap_end, t0, t1)
    assert res.max_gap_ms > 0, res


def test_pyheap_survives_criu_migration(criu_ready, hosts, started, tmp_path):
    wl = started(PyHeap(32, rate=500), hosts)
    time.sleep(1)
    t0, t1 = migrate(wl, hosts, tmp_path / "images")
    time.sleep(1)
    res = wl.finish()
    assert res.ok, res.detail
    assert t0 < res.max_gap_end, (res.max_gap_end, t0, t1)
    assert res.max_gap_ms >= (t1 - t0) * 1000 * 0.5, (res.max_gap_ms, t1 - t0)


# --- the end ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: Redis(4), lambda: PyHeap(4)], ids=["redis", "pyheap"])
def test_stop_after_a_failed_start_cleans_up_and_is_idempotent(make):
    wl = make()
    wl.stop()  # before start: nothing to do
    nowhere = types.SimpleNamespace(src="hw-no-such-netns", dst="hw-no-such-netns-either")
    with pytest.raises(NsProcError, match="does not exist"):
        wl.start(nowhere)
    left = wl._dir
    assert left and os.path.isdir(left)
    wl.stop()
    assert not os.path.exists(left)
    wl.stop()


@pytest.mark.root
def test_stop_ends_every_process(hosts, started):
    _need_redis()
    wl = started(Redis(4, rate=100), hosts)
    procs = [psutil.Process(pid) for pid in (wl.host_pid, wl._client.pid, wl._redis.unshare.pid)]
    wl.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    wl.stop()


def test_redis_checks_on_the_source_when_it_resumes(criu_ready, hosts, started, tmp_path):
    # A failed strategy resumes the source and calls finish() without adopt():
    # here a dump that leaves redis running, its client connection untouched.
    _need_redis()
    wl = started(Redis(16, rate=500), hosts)
    wl.before()
    time.sleep(0.5)
    criu_dump(
        wl.host_pid, tmp_path / "images", extra=[*wl.criu_opts(), "--leave-running"], netns=hosts.src, timeout=120
    )
    time.sleep(0.5)
    res = wl.finish()
    assert res.ok, res.detail
    assert f"digest same ({hosts.src})" in res.detail and " 0 reconnects" in res.detail, res.detail
