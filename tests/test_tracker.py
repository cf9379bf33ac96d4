"""The dirty tracker against real processes.

dirtyset (tests/workload/dirtyset.c) dirties exactly the pages it is told
to, by plain stores, from several threads, by read(2), in fresh and moved
mappings, and names them; the tracker must report exactly those pages in
the test regions (the program's own stack, heap and libc data are real
dirty pages too, so only the test regions are compared). memwork
(hybridmig.testing.workload) checks that a target survives being tracked.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hybridmig import doctor
from hybridmig.bindings import tracker as native
from hybridmig.errors import NativeError
from hybridmig.source import tracker as trk
from hybridmig.testing.workload import Workload, build_program

PAGE = 4096
DIRTYSET_SRC = Path(__file__).resolve().parent / "workload" / "dirtyset.c"
HYBRIDMIG = os.path.join(os.path.dirname(sys.executable), "hybridmig")
SYS_getpid = 39  # x86_64


# --- set-up ---------------------------------------------------------------------


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: ptrace and userfaultfd of other processes")
    if not shutil.which(os.environ.get("CC", "cc")):
        pytest.skip("needs a C compiler (cc) to build the test programs")


def _need_uffd_wp():
    _need_root()
    if os.uname().machine != "x86_64":
        pytest.skip("syscall injection is implemented for x86_64 only")
    if doctor.dirty_tracker() != trk.UFFD_WP:
        pytest.skip(f"the uffd-wp tracker does not work here: {doctor.uffd_wp_path().reason}")


def build_dirtyset() -> str:
    return build_program(DIRTYSET_SRC, "dirtyset")


class DirtySet:
    """A running dirtyset, stepped one command at a time."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [build_dirtyset()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = self.proc.pid
        assert self.cmd("pid") == [str(self.pid)]

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer and answer[0] == "ok", f"dirtyset: {line!r} -> {answer!r}"
        return answer[1:]

    def map(self, pages):
        """(id, (start, end)) of a new region."""
        rid, addr = self.cmd("map %d" % pages)
        return int(rid), (int(addr, 16), int(addr, 16) + pages * PAGE)

    def pages(self, line):
        """Run a page-dirtying command: the set of page addresses it names."""
        return {int(a, 16) for a in self.cmd(line)}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def page_set(ranges, within):
    """The page addresses of ranges that fall in the ranges `within`."""
    return {a for s, e in trk.intersect(ranges, within) for a in range(s, e, PAGE)}


def uffd_fds(pid):
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:[userfaultfd]":
                out.append(fd)
        except FileNotFoundError:
            pass
    return out


def uffd_vmflags(pid):
    """VmFlags mnemonics of userfaultfd registrations (um missing, uw
    write-protect, ui minor) found in /proc/PID/smaps, with their counts."""
    found = {}
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            if line.startswith("VmFlags:"):
                for flag in line.split()[1:]:
                    if flag in ("um", "uw", "ui"):
                        found[flag] = found.get(flag, 0) + 1
    return found


def assert_clean(pid):
    assert uffd_fds(pid) == [], "a userfaultfd was left in the target's fd table"
    assert uffd_vmflags(pid) == {}, "userfaultfd registrations were left in the target"


def wait_clean(pid, timeout=10):
    """The kernel drops registrations when the last uffd reference goes,
    which for a killed process may happen a moment after it is reaped."""
    deadline = time.monotonic() + timeout
    while uffd_vmflags(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert_clean(pid)


def verified(wl):
    for report in wl.verify():
        assert report["bad"] == 0, report


# --- exactness ---------------------------------------------------------------------


@pytest.mark.root
def test_scan_reports_exactly_the_pages_written():
    _need_uffd_wp()
    payload = tempfile.NamedTemporaryFile(prefix="dirtyset-", delete=False)
    payload.write(os.urandom(4 * PAGE))
    payload.close()
    try:
        with DirtySet() as ds, trk.DirtyTracker(ds.pid) as tracker:
            _exactness_rounds(ds, tracker, payload.name)
    finally:
        os.unlink(payload.name)


def _exactness_rounds(ds, tracker, payload):
    # Region a is mapped before attaching: half populated, half never touched.
    tracker.detach()
    a_id, a = ds.map(64)
    ds.pages("touch %d %s" % (a_id, ",".join(map(str, range(0, 64, 2)))))
    tracker.attach()
    assert trk.intersect(tracker.vmas(), [a]) == [a], "the test region is not tracked"
    regions = [a]

    def scan(expect, why):
        result = tracker.scan()
        got = page_set(result.dirty, regions)
        assert got == expect, f"{why}: missing {sorted(map(hex, expect - got))}, extra {sorted(map(hex, got - expect))}"
        assert page_set(result.written, regions) <= got
        return result

    scan(set(), "first scan after attach: nothing written since registering")
    scan(ds.pages("touch %d 1,2,3,10,63" % a_id), "plain stores (populated and unpopulated pages)")
    scan(set(), "a second scan with no writes")
    scan(ds.pages("threads %d 4 5,6,7,20,21,40,41,42" % a_id), "stores from 4 threads")
    scan(ds.pages("read %d 30 4 %s" % (a_id, payload)), "read(2) into the region (kernel-mode writes)")
    scan(ds.pages("zap %d 1,11" % a_id), "MADV_DONTNEED'd pages (content now zeros)")
    scan(set(), "nothing after the zap")

    # A fresh mapping is new: sent whole, then tracked like the others.
    b_id, b = ds.map(16)
    ds.pages("touch %d 3" % b_id)
    result = tracker.scan()
    assert trk.intersect(result.new, [b]) == [b] and trk.intersect(result.dirty, [b]) == [b]
    regions = [a, b]
    scan(set(), "after the new region was sent whole")
    scan(ds.pages("touch %d 0,15" % b_id) | ds.pages("touch %d 12" % a_id), "two regions")

    # mremap moves the region: new at its new place, removed at the old.
    old, new = (int(x, 16) for x in ds.cmd("mremap %d" % a_id))
    assert old == a[0]
    moved = (new, new + 64 * PAGE)
    result = tracker.scan()
    assert trk.intersect(result.removed, [a]) == [a], "the old place of a moved region is not reported removed"
    assert trk.intersect(result.new, [moved]) == [moved], "a moved region is not sent whole"
    regions = [moved, b]
    scan(ds.pages("touch %d 9,50" % a_id), "stores in the moved region")

    # Replaced at the same address (munmap + mmap, as malloc does): the
    # address range looks unchanged, the content is all new.
    assert ds.cmd("renew %d" % b_id) == [f"{b[0]:x}"]
    result = tracker.scan()
    assert trk.intersect(result.dirty, [b]) == [b], "a VMA replaced in place is not sent whole"
    scan(set(), "after the replaced region was sent whole")
    scan(ds.pages("touch %d 4" % b_id), "stores in the replaced region")

    ds.cmd("unmap %d" % b_id)
    result = tracker.scan()
    assert trk.intersect(result.removed, [b]) == [b]
    assert page_set(result.dirty, [b]) == set()


@pytest.mark.root
def test_peek_counts_written_pages_and_leaves_them_to_the_scan():
    """peek (auto's early switch-over, source/early.py) counts the pages
    written since they were last protected, within the ranges asked, and
    protects nothing: the next scan still finds every one of them."""
    _need_uffd_wp()
    with DirtySet() as ds:
        a_id, a = ds.map(64)
        ds.pages("touch %d %s" % (a_id, ",".join(map(str, range(64)))))
        with trk.DirtyTracker(ds.pid) as tracker:
            tracker.scan()
            written = ds.pages("touch %d 1,2,3,40,63" % a_id)
            assert tracker.peek([a]) == 5
            assert tracker.peek([(a[0], a[0] + 32 * PAGE)]) == 3
            assert tracker.peek([a]) == 5, "a peek protected what it looked at"
            assert page_set(tracker.scan().dirty, [a]) == written
            assert tracker.peek([a]) == 0


def _minflt(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.root
def test_keep_hot_spares_pages_written_round_after_round():
    """keep_hot: a run written in two scans in a row is hot: left
    unprotected (later writes do not fault), not looked at, reported in
    hot and not in dirty. A probe protects it again; written before the
    next scan it stays hot, unprotected; once cold it is in dirty once and
    tracked exactly again. drop_hot() puts the hot pages in the next dirty
    and tracks exactly from then on. Short runs are never hot."""
    _need_uffd_wp()
    assert trk.HOT_MIN_PAGES == 16
    never, now = 1e9, 1e-9  # probe periods: no probe; the whole hot set at the next scan
    with DirtySet() as ds:
        rid, region = ds.map(192)
        hot_line = "touch %d %s" % (rid, ",".join(map(str, range(128))))  # one run of 128 pages
        short_line = "touch %d 140,141,150" % rid  # runs of 2 and 1
        ds.pages("touch %d %s" % (rid, ",".join(map(str, range(192)))))  # all populated
        with trk.DirtyTracker(ds.pid, trk.UFFD_WP, keep_hot=True) as tracker:
            tracker.probe_period_s = never

            def touch(line, faults):
                before = _minflt(ds.pid)
                pages = ds.pages(line)
                took = _minflt(ds.pid) - before
                # (the command's own stack and buffers fault a little too)
                assert (took >= len(pages)) if faults else (took < 32), (line, took)
                return pages

            def scan(number, dirty, written, kept, probe=never):
                tracker.probe_period_s = probe
                result = tracker.scan()
                tracker.probe_period_s = never
                for name, got, want in (
                    ("dirty", result.dirty, dirty),
                    ("written", result.written, written),
                    ("hot", result.hot, kept),
                ):
                    assert page_set(got, [region]) == want, "scan %d %s: %s" % (
                        number,
                        name,
                        sorted((a - region[0]) // PAGE for a in page_set(got, [region]) ^ want),
                    )

            hot = touch(hot_line, faults=True)
            short = touch(short_line, faults=True)
            scan(1, hot | short, hot | short, set())
            touch(hot_line, faults=True)
            touch(short_line, faults=True)
            scan(2, short, hot | short, hot)  # written twice in a row: hot, not protected again
            touch(hot_line, faults=False)
            touch(short_line, faults=True)
            scan(3, short, short, hot)  # hot: not looked at, owed
            touch(hot_line, faults=False)
            scan(4, set(), hot, hot, probe=now)  # the probe protects it again (still owed)
            touch(hot_line, faults=True)
            scan(5, set(), hot, hot)  # written since the probe: hot, left unprotected
            touch(hot_line, faults=False)
            scan(6, set(), set(), hot)
            scan(7, set(), hot, hot, probe=now)
            scan(8, hot, set(), set())  # not written since the probe: cooled, sent once
            touch(hot_line, faults=True)
            scan(9, hot, hot, set())  # tracked exactly
            touch(hot_line, faults=True)
            scan(10, set(), hot, hot)  # hot again
            tracker.drop_hot()
            touch(hot_line, faults=False)
            scan(11, hot, hot, set())  # dropped: in dirty, protected again
            touch(hot_line, faults=True)
            scan(12, hot, hot, set())
            touch(hot_line, faults=True)
            scan(13, hot, hot, set())  # and never hot again


@pytest.mark.root
def test_hot_probe_rotates_through_the_hot_set():
    """Each scan probes the share of the hot set due since the last one,
    from where the previous probe ended: over the period every hot page is
    probed, none twice, and a cooled page is found by its probe."""
    _need_uffd_wp()
    with DirtySet() as ds:
        rid, region = ds.map(256)
        line = "touch %d %s" % (rid, ",".join(map(str, range(256))))
        ds.pages(line)
        with trk.DirtyTracker(ds.pid, trk.UFFD_WP, keep_hot=True) as tracker:
            tracker.probe_period_s = 1e9
            tracker.scan()
            ds.pages(line)
            tracker.scan()
            ds.pages(line)
            assert page_set(tracker.scan().hot, [region]) == page_set([region], [region])
            tracker.probe_period_s = 1.0
            probed, t0 = [], time.monotonic()
            while time.monotonic() - t0 < 1.0:
                time.sleep(0.1)
                ds.pages("touch %d %s" % (rid, ",".join(map(str, range(128)))))  # the first half stays hot
                result = tracker.scan()
                probed.append(page_set(tracker._probation, [region]))
            assert all(not (a & b) for i, a in enumerate(probed) for b in probed[i + 1 :]), "a page probed twice"
            assert 4 <= sum(1 for p in probed if p) <= 12, [len(p) for p in probed]
            covered = set().union(*probed)
            assert len(covered) >= 256 * 0.6, len(covered)
            tracker.probe_period_s = 1e9
            result = tracker.scan()  # the last probe is looked at
            cold = page_set([(region[0] + 128 * PAGE, region[1])], [region])
            hot_half = page_set([(region[0], region[0] + 128 * PAGE)], [region])
            # probed in the cold half: sent (in some scan's dirty) and no longer hot
            assert not (page_set(result.hot, [region]) & cold & covered)
            assert page_set(result.hot, [region]) >= hot_half - covered


@pytest.mark.root
def test_scan_resumes_when_the_region_buffer_fills():
    """More separate dirty regions than one PAGEMAP_SCAN call returns: the
    scan resumes at walk_end and loses nothing."""
    _need_uffd_wp()
    pages = 3 * native.SCAN_BATCH
    with DirtySet() as ds, trk.DirtyTracker(ds.pid) as tracker:
        rid, region = ds.map(2 * pages)
        tracker.scan()  # the new region, whole
        ds.cmd("stride %d 0 2 %d" % (rid, pages))
        result = tracker.scan()
        assert page_set(result.dirty, [region]) == {region[0] + 2 * i * PAGE for i in range(pages)}
        assert len(trk.intersect(result.dirty, [region])) == pages
        assert page_set(tracker.scan().dirty, [region]) == set()


@pytest.mark.root
def test_read_pages_and_zero_bitmap():
    """Batches as they travel: zero pages only as bits, the others in order."""
    _need_root()
    with DirtySet() as ds:
        rid, (start, end) = ds.map(40)
        written = ds.pages("touch %d 0,5,6,17,39" % rid)
        with open("/proc/%d/mem" % ds.pid, "rb", buffering=0) as mem:
            mem.seek(start)
            memory = mem.read(end - start)
        batches = list(trk.read_pages(ds.pid, start, end, batch_pages=16))
        assert [(b.vaddr, b.npages) for b in batches] == [(start, 16), (start + 16 * PAGE, 16), (start + 32 * PAGE, 8)]
        for b in batches:
            zero = {b.vaddr + i * PAGE for i in range(b.npages) if b.zero_bitmap[i // 8] >> (i % 8) & 1}
            pages = {b.vaddr + i * PAGE for i in range(b.npages)}
            assert zero == pages - written and b.nzero == len(zero)
            expect = b"".join(memory[a - start : a - start + PAGE] for a in sorted(pages - zero))
            assert bytes(b.data) == expect
        # A batch without zero pages is the memory as it is.
        (full,) = trk.read_pages(ds.pid, start + 5 * PAGE, start + 7 * PAGE)
        assert full.nzero == 0 and bytes(full.data) == memory[5 * PAGE : 7 * PAGE]
        # Pages unmapped meanwhile are skipped; the rest is still read.
        hole = int(ds.cmd("punch %d 10 4" % rid)[0], 16)
        assert hole == start + 10 * PAGE
        batches = list(trk.read_pages(ds.pid, start, end))
        assert [(b.vaddr, b.npages) for b in batches] == [(start, 10), (start + 14 * PAGE, 26)]
        with pytest.raises(NativeError) as exc:
            native.read_pages_into(_unused_pid(), start, bytearray(PAGE))
        assert exc.value.errno == errno.ESRCH


# --- injection ------------------------------------------------------------------------


@pytest.mark.root
def test_injection_restarts_interrupted_syscalls():
    """A thread blocked in read(2) or nanosleep(2) gets its syscall back
    exactly: the read still reads, the sleep still lasts its full time."""
    _need_uffd_wp()
    with DirtySet() as ds:
        for _ in range(5):  # blocked in read(2) on its stdin pipe
            ret, stop_ns = native.remote_syscall(ds.pid, SYS_getpid)
            assert ret == ds.pid and 0 < stop_ns < 1e9
        assert ds.cmd("pid") == [str(ds.pid)]
        ds.proc.stdin.write("sleep 600\n")
        ds.proc.stdin.flush()
        t0 = time.monotonic()
        time.sleep(0.05)
        for _ in range(5):  # in nanosleep: -ERESTART_RESTARTBLOCK
            assert native.remote_syscall(ds.pid, SYS_getpid)[0] == ds.pid
            time.sleep(0.05)
        assert ds.proc.stdout.readline().split() == ["ok"]
        assert 0.55 < time.monotonic() - t0 < 5, "the interrupted sleep was cut short or lost"
        assert ds.cmd("pid") == [str(ds.pid)]


@pytest.mark.root
def test_target_whose_leader_exited():
    """The leader called pthread_exit (a zombie) and another thread runs on:
    injection borrows that thread, the fd comes through it, pages are read
    through it."""
    _need_uffd_wp()
    with DirtySet() as ds:
        rid, region = ds.map(8)
        ds.cmd("orphan")
        _wait_state(ds.pid, "Z")
        with trk.DirtyTracker(ds.pid) as tracker:
            assert trk.intersect(tracker.vmas(), [region]) == [region]
            written = ds.pages("touch %d 2,7" % rid)
            assert page_set(tracker.scan().dirty, [region]) == written
            batches = list(trk.read_pages(ds.pid, *region))
            assert sum(b.npages for b in batches) == 8 and sum(b.nzero for b in batches) == 6
        assert uffd_vmflags(ds.pid) == {}
        assert ds.cmd("pid") == [str(ds.pid)]


@pytest.mark.root
def test_stopped_target_stays_stopped():
    _need_uffd_wp()
    with DirtySet() as ds:
        os.kill(ds.pid, signal.SIGSTOP)
        _wait_state(ds.pid, "T")
        with trk.DirtyTracker(ds.pid) as tracker:
            tracker.scan()
        _wait_state(ds.pid, "T")
        os.kill(ds.pid, signal.SIGCONT)
        assert ds.cmd("pid") == [str(ds.pid)]
        assert_clean(ds.pid)


def _wait_state(pid, want, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == want:
            return
        assert time.monotonic() < deadline, "process %d is %s, not %s" % (pid, state, want)
        time.sleep(0.01)


@pytest.mark.root
def test_attach_detach_100_times_leaves_target_intact():
    _need_uffd_wp()
    stops = []
    with Workload.start(64, threads=2) as wl:
        pid = wl.host_pid
        with trk.DirtyTracker(pid) as tracker:
            assert uffd_vmflags(pid).get("uw"), "tracking shows no uffd-wp VMAs: the check below proves nothing"
            assert uffd_fds(pid) == [], "the target's own copy of the userfaultfd was not closed"
            stops.append(tracker.stop_ms)
            # the writers run (a busy machine may not schedule them at once)
            deadline = time.monotonic() + 10
            while tracker.scan().written_pages == 0:
                assert time.monotonic() < deadline, "no page written in 10 s after the attach"
                time.sleep(0.05)
        assert_clean(pid)
        for _ in range(99):
            tracker = trk.DirtyTracker(pid)
            stops.append(tracker.attach())
            tracker.scan()
            tracker.detach()
            assert_clean(pid)
        verified(wl)
        assert wl.alive()
    assert all(0 < s < 1000 for s in stops), stops
    print(
        "\ninjection stop time over %d attaches: median %.3f ms, max %.3f ms"
        % (len(stops), statistics.median(stops), max(stops))
    )


@pytest.mark.root
def test_killed_tracker_leaves_nothing_behind():
    _need_uffd_wp()
    script = (
        "import sys, time\n"
        "from hybridmig.source.tracker import DirtyTracker\n"
        "t = DirtyTracker(int(sys.argv[1])); t.attach(); t.scan()\n"
        "print('attached', flush=True); time.sleep(600)\n"
    )
    with Workload.start(32, threads=2) as wl:
        child = subprocess.Popen([sys.executable, "-c", script, str(wl.host_pid)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "attached"
            assert uffd_vmflags(wl.host_pid).get("uw"), "the child tracker registered nothing"
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        wait_clean(wl.host_pid)
        time.sleep(0.2)  # the writers go on
        verified(wl)
        assert wl.alive()


@pytest.mark.root
def test_multi_process_tree_and_children_coming_and_going():
    _need_uffd_wp()
    with Workload.start(16, threads=1, procs=3) as wl:
        tree = trk.TreeTracker(wl.host_pid)
        longest = tree.attach()
        with tree:
            assert tree.pids() == sorted(wl.pids()) == sorted(tree.stop_ms)
            assert longest == max(tree.stop_ms.values()) and 0 < longest < 1000
            assert set(tree.vmas()) == set(wl.pids())
            time.sleep(0.1)
            result = tree.scan()
            assert set(result) == set(wl.pids()) and not result.new and not result.exited
            assert all(r.written_pages > 0 for r in result.values())
        for pid in wl.pids():
            assert_clean(pid)
        verified(wl)
    with DirtySet() as ds, trk.TreeTracker(ds.pid) as tree:
        assert tree.pids() == [ds.pid]
        (child,) = (int(x) for x in ds.cmd("fork"))
        result = tree.scan()
        assert result.new == [child] and result.exited == []
        whole = result.results[child]
        assert whole.dirty == trk.merge(trk.read_vmas(child)) and whole.new == whole.dirty
        assert uffd_vmflags(child).get("uw")
        assert tree.scan().new == []
        ds.cmd("reap %d" % child)
        result = tree.scan()
        assert result.exited == [child] and child not in result.results and tree.pids() == [ds.pid]


# --- errors -------------------------------------------------------------------------------


def _unused_pid():
    """A pid no process can have: above pid_max."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


@pytest.mark.root
def test_bad_targets_give_clear_errors():
    _need_uffd_wp()
    cases = [
        (_unused_pid(), errno.ESRCH, "does not exist"),
        (2, errno.EINVAL, "kernel thread"),
        (os.getpid(), errno.EINVAL, "this process"),
    ]
    with Workload.start(8, threads=2) as wl:
        tid = max(int(t) for t in os.listdir("/proc/%d/task" % wl.host_pid))
        cases.append((tid, errno.EINVAL, "is a thread of process %d" % wl.host_pid))
        for pid, code, words in cases:
            with pytest.raises(NativeError) as exc:
                trk.DirtyTracker(pid).attach()
            assert exc.value.errno == code and words in str(exc.value), str(exc.value)
        assert_clean(wl.host_pid)
    with pytest.raises(NativeError) as exc:
        native.Tracker(_unused_pid())
    assert exc.value.errno == errno.ESRCH and "originated from hm_tracker_attach" in str(exc.value)


@pytest.mark.root
def test_not_permitted_is_clear_and_harmless():
    """An unprivileged user may not track a root process."""
    _need_uffd_wp()
    with DirtySet() as ds:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # drop to nobody and try, at both layers
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                out = []
                for attach in (lambda: trk.DirtyTracker(ds.pid, trk.UFFD_WP).attach(), lambda: native.Tracker(ds.pid)):
                    try:
                        attach()
                        out.append("attached")
                    except NativeError as e:
                        out.append("%d %s" % (e.errno, e.strerror))
                    except BaseException as e:
                        out.append(f"unexpected {e!r}")
                os.write(write, "\n".join(out).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            answers = f.read().splitlines()
        os.waitpid(child, 0)
        assert len(answers) == 2, answers
        for answer in answers:
            code, _, message = answer.partition(" ")
            assert code.isdigit() and int(code) in (errno.EPERM, errno.EACCES), answers
            assert "not permitted" in message or "Permission denied" in message, answers
        assert ds.cmd("pid") == [str(ds.pid)]
        assert_clean(ds.pid)


def _status(pid, key):
    """An integer field of /proc/PID/status (0 if absent)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _seccomp_mode(pid):
    return _status(pid, "Seccomp")


def _traced_by(pid):
    return _status(pid, "TracerPid")


def _in_child_under_seccomp(fn):
    """fn() run in a forked child that has a seccomp filter of its own (one
    that allows everything): such a tracer may not suspend its target's
    seccomp. Returns what fn returned (a str), or the error it raised."""
    import ctypes

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read)
            libc = ctypes.CDLL(None, use_errno=True)

            class SockFilter(ctypes.Structure):
                _fields_ = [
                    ("code", ctypes.c_uint16),
                    ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32),
                ]

            class SockFprog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

            allow = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K, SECCOMP_RET_ALLOW
            prog = SockFprog(1, allow)
            assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
            assert libc.syscall(317, 1, 0, ctypes.byref(prog)) == 0  # seccomp(SET_MODE_FILTER)
            assert _seccomp_mode(os.getpid()) == 2
            try:
                out = "ok " + fn()
            except NativeError as e:
                out = "%d %s" % (e.errno, e)
            except BaseException as e:  # noqa: BLE001
                out = f"unexpected {e!r}"
            os.write(write, out.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(child, 0)
    return answer


@pytest.mark.root
def test_seccomp_filtered_target_is_tracked_with_its_filter_suspended():
    """A target whose filter kills it at userfaultfd(2) survives tracking:
    the injection suspends its seccomp (PTRACE_O_SUSPEND_SECCOMP). The filter
    is real: the target's own userfaultfd() kills it at the end."""
    _need_uffd_wp()
    with DirtySet() as ds:
        rid, region = ds.map(16)
        assert ds.cmd("seccomp") == []
        assert _seccomp_mode(ds.pid) == 2
        with trk.DirtyTracker(ds.pid, trk.UFFD_WP) as tracker:
            tracker.scan()
            written = ds.pages("touch %d 1,5,9" % rid)
            assert page_set(tracker.scan().dirty, [region]) == written
        assert ds.cmd("pid") == [str(ds.pid)]
        assert_clean(ds.pid)
        assert _traced_by(ds.pid) == 0 and _seccomp_mode(ds.pid) == 2
        ds.proc.stdin.write("uffd\n")
        ds.proc.stdin.flush()
        assert ds.proc.wait(10) == -signal.SIGSYS


@pytest.mark.root
def test_seccomp_filtered_target_is_refused_when_seccomp_cannot_be_suspended():
    """A tracker that may not suspend the target's seccomp (it has a filter
    itself) refuses with a clear error and runs nothing in the target, which
    carries on; a target without seccomp is still tracked by it."""
    _need_uffd_wp()
    with DirtySet() as filtered, DirtySet() as plain:
        rid, region = filtered.map(4)
        assert filtered.cmd("seccomp") == []

        def attach_filtered():
            trk.DirtyTracker(filtered.pid, trk.UFFD_WP).attach()
            return "attached"

        answer = _in_child_under_seccomp(attach_filtered)
        assert answer.startswith("%d " % errno.ECANCELED), answer
        assert "seccomp filter" in answer and "CAP_SYS_ADMIN" in answer and "nothing was run" in answer, answer
        answer = _in_child_under_seccomp(lambda: "%d" % native.remote_syscall(filtered.pid, SYS_getpid)[0])
        assert answer.startswith("%d " % errno.ECANCELED), answer
        # Untouched: still filtered, not traced, no userfaultfd; it runs on.
        assert filtered.cmd("pid") == [str(filtered.pid)]
        assert filtered.pages("touch %d 0" % rid) == {region[0]}
        assert _traced_by(filtered.pid) == 0 and _seccomp_mode(filtered.pid) == 2
        assert_clean(filtered.pid)

        def track_plain():
            rid, region = plain.map(8)
            with trk.DirtyTracker(plain.pid, trk.UFFD_WP) as tracker:
                tracker.scan()
                written = plain.pages("touch %d 2,3" % rid)
                found = page_set(tracker.scan().dirty, [region])
                return "exact" if found == written and len(found) == 2 else f"{found} != {written}"

        assert _in_child_under_seccomp(track_plain) == "ok exact"
        assert_clean(plain.pid)


@pytest.mark.root
def test_target_exiting_mid_round():
    _need_uffd_wp()
    # Exits between scans: a zombie first (not reaped), then gone.
    with DirtySet() as ds:
        tracker = trk.DirtyTracker(ds.pid)
        tracker.attach()
        tracker.scan()
        ds.proc.kill()
        _wait_state(ds.pid, "Z")
        with pytest.raises(NativeError) as exc:
            tracker.scan()
        assert exc.value.errno == errno.ESRCH and "exited" in str(exc.value)
        ds.proc.wait()
        with pytest.raises(NativeError) as exc:
            tracker.scan()
        assert exc.value.errno == errno.ESRCH
        tracker.detach()
        tracker.detach()  # idempotent
    # Exits while a scan is under way (told to exit, scanned until it shows).
    for _ in range(5):
        with DirtySet() as ds, trk.DirtyTracker(ds.pid) as tracker:
            ds.proc.stdin.write("exit\n")
            ds.proc.stdin.flush()
            with pytest.raises(NativeError) as exc:
                for _ in range(100000):
                    tracker.scan()
            assert exc.value.errno == errno.ESRCH, str(exc.value)
    # The root of a tree exiting is an error too.
    with DirtySet() as ds, trk.TreeTracker(ds.pid) as tree:
        ds.proc.kill()
        ds.proc.wait()
        with pytest.raises(NativeError) as exc:
            tree.scan()
        assert exc.value.errno == errno.ESRCH


# --- soft-dirty fallback ----------------------------------------------------------------------


def test_pagemap_parser_on_synthetic_entries():
    sd, present = native.SOFT_DIRTY, 1 << 63
    base = 0x7F0000000000
    entries = [present | sd, present | sd, present, 0, sd, present | sd, sd, 0, 0, present | sd]
    assert native.pagemap_ranges(entries, base) == [
        (base, base + 2 * PAGE),
        (base + 4 * PAGE, base + 7 * PAGE),
        (base + 9 * PAGE, base + 10 * PAGE),
    ]
    # A one-region buffer: the parser stops at each new region, the caller resumes.
    assert native.pagemap_ranges(entries, base, max_regions=1) == native.pagemap_ranges(entries, base)
    assert native.pagemap_ranges([present] * 100, base) == []
    assert native.pagemap_ranges([sd] * 100, base) == [(base, base + 100 * PAGE)]
    assert native.pagemap_ranges(entries, base, mask=present) == [
        (base, base + 3 * PAGE),
        (base + 5 * PAGE, base + 6 * PAGE),
        (base + 9 * PAGE, base + 10 * PAGE),
    ]


def test_parse_maps_picks_private_anonymous_writable():
    maps = "\n".join(
        [
            "55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234 /usr/bin/prog",
            "55d0c0003000-55d0c0004000 rw-p 00003000 08:01 1234 /usr/bin/prog",
            "55d0c0004000-55d0c0005000 rw-p 00000000 00:00 0 ",
            "55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]",
            "7f0000000000-7f0000100000 rw-s 00000000 00:01 99 /dev/zero (deleted)",
            "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 [anon:arena]",
            "7f0000300000-7f0000400000 ---p 00000000 00:00 0 ",
            "7f0000400000-7f0000500000 r--p 00000000 00:00 0 ",
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]",
            "7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]",
            "7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]",
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
        ]
    )
    assert trk.parse_maps(maps) == [
        (0x55D0C0004000, 0x55D0C0005000),
        (0x55D0C1000000, 0x55D0C1021000),
        (0x7F0000200000, 0x7F0000300000),
        (0x7FFD00000000, 0x7FFD00021000),
    ]


def test_range_arithmetic():
    assert trk.merge([(5, 8), (0, 2), (2, 3), (7, 9)]) == [(0, 3), (5, 9)]
    assert trk.subtract([(0, 10), (20, 30)], [(2, 4), (8, 22), (29, 40)]) == [(0, 2), (4, 8), (22, 29)]
    assert trk.intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert trk.clip([(0, 4), (4, 8), (10, 12)], [(2, 11)]) == [(2, 4), (4, 8), (10, 11)]


@pytest.mark.root
def test_doctor_picks_only_a_working_tracker():
    _need_root()
    chosen = doctor.dirty_tracker()
    assert trk.choose_method() == chosen
    if not doctor.check_soft_dirty().ok:
        assert chosen != trk.SOFT_DIRTY
    if not doctor.uffd_wp_path().ok:
        assert chosen != trk.UFFD_WP


@pytest.mark.root
def test_soft_dirty_plumbing_freezes_and_thaws():
    """What can run without CONFIG_MEM_SOFT_DIRTY: freezing every thread,
    clearing, scanning (which then finds nothing written), thawing."""
    _need_root()
    with Workload.start(16, threads=2) as wl:
        pid = wl.host_pid
        with native.Frozen(pid) as frozen:
            assert frozen.threads == 3
            states = {}
            for tid in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                    states[tid] = f.read().rsplit(")", 1)[1].split()[0]
            assert set(states.values()) == {"t"}, states
            assert frozen.thaw() > 0
        tracker = trk.DirtyTracker(pid, trk.SOFT_DIRTY)
        assert tracker.attach() == 0.0
        result = tracker.scan()
        assert result.removed == [] and result.stop_s > 0
        if not doctor.check_soft_dirty().ok:
            assert result.written == []  # bit 55 is never set on this kernel
        tracker.detach()
        verified(wl)


def _held_by_child(pid, freeze):
    """A forked child that traces pid, every thread frozen (as CRIU holds a
    tree it dumps) or only the leader seized and running; it lets go when
    the returned function is called."""
    import ctypes

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            if freeze:
                held = native.Frozen(pid)
            else:
                assert ctypes.CDLL(None).ptrace(0x4206, pid, 0, 0) == 0  # PTRACE_SEIZE
            os.write(ready_w, b"x")
            os.read(go_r, 1)
            if freeze:
                held.thaw()
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)

    def release():
        os.write(go_w, b"x")
        os.close(go_w)
        os.waitpid(child, 0)

    return child, release


@pytest.mark.root
def test_soft_dirty_scan_of_a_process_another_tracer_holds():
    """The final scan runs while CRIU holds the tree frozen: no second
    freeze (impossible, and needless). A tracer that holds the process
    without stopping it makes the scan fail, saying so."""
    _need_root()
    with Workload.start(16, threads=2) as wl:
        pid = wl.host_pid
        tracker = trk.DirtyTracker(pid, trk.SOFT_DIRTY)
        tracker.attach()
        tracer, release = _held_by_child(pid, freeze=True)
        try:
            assert _traced_by(pid) == tracer
            result = tracker.scan()
            assert result.removed == [] and result.stop_s == 0.0
        finally:
            release()
        assert tracker.scan().stop_s > 0  # frozen by the tracker itself again
        tracer, release = _held_by_child(pid, freeze=False)
        try:
            with pytest.raises(NativeError) as exc:
                tracker.scan()
            assert exc.value.errno == errno.EBUSY, exc.value
            assert "must be frozen" in str(exc.value) and "process %d" % tracer in str(exc.value), exc.value
        finally:
            release()
        tracker.detach()
        verified(wl)


# --- the command ----------------------------------------------------------------------------


@pytest.mark.root
def test_dirty_rate_command_json():
    _need_uffd_wp()
    with Workload.start(64, rate=500) as wl:
        proc = subprocess.run(
            [HYBRIDMIG, "dirty-rate", str(wl.host_pid), "--interval", "0.2", "--count", "3", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        assert len(rows) == 3
        for row in rows:
            assert {"pages", "pages_per_s", "mib_per_s", "interval_s"} <= set(row)
            # One writer at 500 pages/s (plus a few stack and bookkeeping pages).
            assert 250 <= row["pages_per_s"] <= 1500, rows
            assert row["mib_per_s"] == pytest.approx(row["pages_per_s"] * PAGE / (1 << 20))
        verified(wl)
        assert_clean(wl.host_pid)
        proc = subprocess.run(
            [HYBRIDMIG, "dirty-rate", str(wl.host_pid), "--interval", "0.1", "--count", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and "pages/s" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([HYBRIDMIG, "dirty-rate", "2", "--count", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "kernel thread" in proc.stderr and "Traceback" not in proc.stderr
