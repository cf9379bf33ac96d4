"""The test workload and its helpers, proven against the real CRIU.

These tests show that memwork's verification passes on intact memory, fails
on damaged memory (so the migration tests built on it can fail), and passes
after a plain `criu dump` / `criu restore` round trip, including a fork and
mapping churn in the restored processes.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time

import pytest

from criu_util import criu_dump, criu_restore, require_root_and_criu
from hybridmig.testing.workload import Workload, become_subreaper, build_memwork

PAGES_PER_MB = 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: PID namespaces (unshare) and writing /proc/PID/mem")
    for tool in ("cc", "unshare"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool!r} on PATH to build and start the workload")


def _need_criu():
    _need_root()
    reason = require_root_and_criu()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    # Restored trees are orphaned when `criu restore -d` exits: inherit them.
    become_subreaper()


@pytest.fixture(scope="module")
def memwork():
    _need_root()
    return build_memwork()


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="hm-test-workload-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def assert_clean(results, procs, pages):
    assert len(results) == procs, results
    for r in results:
        assert r["bad"] == 0, r["bad_detail"]
        assert r["first_bad"] == -1
        assert r["zero_pages_bad"] == 0
        assert r["pages"] == pages


@pytest.mark.root
@pytest.mark.parametrize("threads,procs", [(1, 1), (4, 1), (1, 3)])
def test_clean_at_start(memwork, workdir, threads, procs):
    report = os.path.join(workdir, "report.jsonl")
    with Workload.start(64, threads=threads, procs=procs, report=report) as w:
        assert len(w.pids()) == procs
        assert sorted(w.ns_pids().values()) == list(range(1, procs + 1))
        first = w.verify()
        assert_clean(first, procs, 64 * PAGES_PER_MB)
        time.sleep(0.3)
        second = w.verify()
        assert_clean(second, procs, 64 * PAGES_PER_MB)
        for a, b in zip(first, second, strict=False):
            assert a["pid"] == b["pid"]
            assert b["ops"] > a["ops"], "writers are not running"
            assert len(b["ops_per_thread"]) == threads
            assert all(n > 0 for n in b["ops_per_thread"])
            assert b["timeline"]["bucket_ms"] == 100
            assert len(b["timeline"]["ops"]) == 6000  # 10 min of 100 ms buckets (TL_BUCKETS in memwork.c)
        assert_clean(w.fork_verify(), procs, 64 * PAGES_PER_MB)
        churned = w.churn_verify()
        for r in churned:
            assert r["churn"]["done"], r
            assert r["bad"] == 0, r["bad_detail"]
            assert (r["moved"], r["unmapped"], r["zero_pages"]) == (16, 16, 16)
        # The moved pages are written at their new place, the others skipped.
        time.sleep(0.2)
        assert_clean(w.verify(), procs, 64 * PAGES_PER_MB - 16)
    assert not w.alive()
    assert len(w.reports("exit")) == procs


@pytest.mark.root
def test_corruption_is_detected(memwork, workdir):
    """Damage the memory of a running workload behind its back: verify must
    name exactly the damaged pages (this is what lets the other tests fail)."""
    report = os.path.join(workdir, "report.jsonl")
    pages = 32 * PAGES_PER_MB
    # One page per second: the damaged pages are practically never rewritten
    # (and so repaired) before the verify.
    with Workload.start(32, threads=1, rate=1, report=report) as w:
        assert_clean(w.verify(), 1, pages)

        body = 5000
        w.poke(body, 1024, struct.pack("<Q", 0xDEADBEEFDEADBEEF))
        r = w.verify()[0]
        assert r["bad"] == 1, r
        assert r["first_bad"] == body
        assert r["bad_detail"][0]["page"] == body
        assert r["bad_detail"][0]["kind"] == "body"

        lost = 1234  # a page lost in transfer reads as zeros
        w.poke(lost, 0, bytes(os.sysconf("SC_PAGE_SIZE")))
        r = w.verify()[0]
        assert r["bad"] == 2, r
        assert r["first_bad"] == lost
        assert {(d["page"], d["kind"]) for d in r["bad_detail"]} == {(lost, "zero"), (body, "body")}

        # A zapped page must stay zero: writing into one is caught as well.
        churn = w.churn_verify()[0]
        assert churn["zero_pages"] == 16 and churn["bad"] == 2
        zeroed = churn["churn"]["first"] + 32
        fd = os.open(f"/proc/{w.host_pid}/mem", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x01", churn["churn"]["zeroed_at"] + 100)
        finally:
            os.close(fd)
        r = w.verify()[0]
        assert r["bad"] == 3 and r["zero_pages_bad"] == 1, r
        assert (zeroed, "not-zero") in {(d["page"], d["kind"]) for d in r["bad_detail"]}


@pytest.mark.root
def test_check_writes_reports_a_zeroed_page_at_its_next_rewrite(memwork, workdir):
    """--check-writes: the writer checks each page before rewriting it, so a
    page that reads as zeros (memory a migrated copy does not have) is
    reported without a verify; intact memory is never reported."""
    report = os.path.join(workdir, "report.jsonl")
    # 4 MiB (1024 pages) at 2000 pages/s: every page is rewritten within ~0.5 s
    with Workload.start(4, threads=1, rate=2000, report=report, check_writes=True) as w:
        time.sleep(1.0)  # two laps over every page, all intact
        assert w.reports("corrupt") == []
        lost = 700
        w.poke(lost, 0, bytes(os.sysconf("SC_PAGE_SIZE")))
        deadline = time.monotonic() + 10
        while not w.reports("corrupt") and time.monotonic() < deadline:
            time.sleep(0.02)
        (corrupt,) = w.reports("corrupt")
        assert (corrupt["page"], corrupt["kind"], corrupt["found_gen"]) == (lost, "zero", 0), corrupt


@pytest.mark.root
@pytest.mark.parametrize("procs", [1, 3])
def test_criu_round_trip(memwork, workdir, procs):
    """Plain dump (which kills the source) and restore: every page intact,
    the writers go on, fork and mapping churn work in the restored tree."""
    _need_criu()
    size_mb, threads, pause = 256, 2, 0.5
    pages = size_mb * PAGES_PER_MB
    images = os.path.join(workdir, "images")
    report = os.path.join(workdir, "report.jsonl")

    with Workload.start(size_mb, threads=threads, procs=procs, report=report) as w:
        before = w.verify()
        assert_clean(before, procs, pages)
        criu_dump(w.host_pid, images)
        dumped_at = time.time()
        w.wait_gone()  # CRIU killed the tree; unshare is reaped

    time.sleep(pause)  # a freeze long enough to be seen in max_gap_ms
    root = criu_restore(images)
    with Workload.adopt(root, report, procs=procs) as r:
        assert len(r.pids()) == procs
        assert sorted(r.ns_pids().values()) == list(range(1, procs + 1))
        after = r.verify()
        assert_clean(after, procs, pages)
        for a, b in zip(before, after, strict=False):
            assert a["pid"] == b["pid"]
            # The counters live in the restored memory: they went on.
            assert b["ops"] > a["ops"]
            # The freeze was measured on CLOCK_REALTIME: at least the time
            # between the end of the dump and the restore.
            assert b["max_gap_ms"] >= pause * 1000, b
            assert b["max_gap_at"] > dumped_at
            tl = b["timeline"]
            resumed = [
                n for i, n in enumerate(tl["ops"]) if tl["start"] + i * tl["bucket_ms"] / 1000 > dumped_at + pause
            ]
            assert sum(resumed) > 0, "no writes recorded after the restore"

        assert_clean(r.fork_verify(), procs, pages)
        for c in r.churn_verify():
            assert c["churn"]["done"] and c["bad"] == 0, c
            assert (c["moved"], c["unmapped"], c["zero_pages"]) == (16, 16, 16)
        assert_clean(r.verify(), procs, pages - 16)
    assert not r.alive()
    assert len(r.reports("exit")) == procs
