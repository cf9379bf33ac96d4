"""Dirty-page tracking of live processes for pre-copy rounds.

A DirtyTracker follows one process (one mm, however many threads): it
tracks every private anonymous writable VMA and, on each scan(), returns
what must travel again since the previous scan:

  - pages written (uffd-wp async + PAGEMAP_SCAN, get-and-reprotect in one
    atomic kernel step; or soft-dirty on kernels without it),
  - VMAs that appeared (mmap, brk growth, mremap moves them), whole,
  - VMAs that disappeared, so the destination can drop them.

Anonymous pages dropped with MADV_DONTNEED count as written: their content
changed to zeros (read_pages() then marks them zero).

Ranges are sorted, merged (start, end) tuples of page addresses. Errors are
NativeError with the errno that says what happened: ProcessGone (ESRCH) the
process does not exist or exited, AccessDenied (EPERM) not permitted, EINVAL
a kernel thread.
TreeTracker follows a process and all its descendants.
"""

import contextlib
import errno
import os
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import psutil

from ..bindings import PAGE_SIZE
from ..bindings import tracker as native
from ..errors import AccessDenied, HybridmigError, NativeError, ProcessGone, native_error

Range = tuple[int, int]

UFFD_WP = "uffd-wp"
SOFT_DIRTY = "soft-dirty"
METHODS = (UFFD_WP, SOFT_DIRTY)

_PF_KTHREAD = 0x00200000  # task flag of kernel threads (include/linux/sched.h)
_NOT_TRACKED = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]")
READ_BATCH_PAGES = 1024  # 4 MiB per read_pages() batch
#: keep_hot: a run of pages written in two scans in a row, at least this
#: long, is hot: left unprotected, not looked at, owed to the final round
HOT_MIN_PAGES = 16
#: keep_hot: each hot page is protected again (probed) about once in this
#: many seconds, a rotating share of the hot set at each scan, and stays hot
#: only if written before the next scan
HOT_PROBE_PERIOD_S = 8.0


# --- ranges -------------------------------------------------------------------


def merge(ranges) -> list[Range]:
    """Sorted, disjoint, non-adjacent union of ranges."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def subtract(ranges, minus) -> list[Range]:
    """merge(ranges) with every address of `minus` taken out (one sweep)."""
    out: list[Range] = []
    cut = merge(minus)
    j = 0
    for start, end in merge(ranges):
        while j < len(cut) and cut[j][1] <= start:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > start:
                out.append((start, cut[k][0]))
            start = max(start, cut[k][1])
            k += 1
        if start < end:
            out.append((start, end))
    return out


def intersect(ranges, other) -> list[Range]:
    return subtract(ranges, subtract(ranges, other))


def clip(vmas, ranges) -> list[Range]:
    """Every non-empty intersection of a VMA (vmas: sorted, disjoint) with
    ranges: ranges cut at VMA boundaries, as the kernel registers per VMA."""
    out: list[Range] = []
    cut = merge(ranges)
    j = 0
    for vs, ve in vmas:
        while j < len(cut) and cut[j][1] <= vs:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < ve:
            s, e = max(vs, cut[k][0]), min(ve, cut[k][1])
            if s < e:
                out.append((s, e))
            k += 1
    return out


def pages_in(ranges) -> int:
    return sum(end - start for start, end in ranges) // PAGE_SIZE


# --- processes ------------------------------------------------------------------


def parse_maps(text) -> list[Range]:
    """The trackable VMAs of a /proc/PID/maps text: private, writable and
    anonymous (no backing file; [heap], [stack], [anon:NAME] count as
    anonymous; [vdso] and friends do not)."""
    out = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        perms, inode = fields[1], fields[4]
        path = fields[5].strip() if len(fields) > 5 else ""
        if len(perms) < 4 or perms[1] != "w" or perms[3] != "p" or inode != "0":
            continue
        if path in _NOT_TRACKED or (path and path != "[heap]" and not path.startswith(("[stack", "[anon:"))):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append((start, end))
    return out


def _gone(pid, why="exited"):
    return ProcessGone(errno.ESRCH, "process %d %s" % (pid, why), pid=pid)


def _stat(pid):
    """(state letter, task flags) of pid, or raise ESRCH."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except FileNotFoundError:
        raise _gone(pid, "does not exist") from None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[6])


def _live_thread(pid) -> int | None:
    """A thread of pid that has not exited: the leader, or another when the
    leader called pthread_exit (a zombie whose threads run on); None if none."""
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))
    except FileNotFoundError:
        return None
    for tid in [pid] + [t for t in tids if t != pid]:
        try:
            with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
                text = f.read()
        except FileNotFoundError:
            continue
        if text[text.rfind(")") + 2 :].split()[0] not in "ZX":
            return tid
    return None


def check_process(pid) -> None:
    """Raise a clear NativeError unless pid is a live user-space process
    other than this one."""
    if not isinstance(pid, int) or pid <= 0:
        raise NativeError(errno.EINVAL, f"bad pid {pid!r}")
    if pid == os.getpid():
        raise NativeError(errno.EINVAL, "process %d is this process: it cannot trace itself" % pid)
    state, flags = _stat(pid)
    if flags & _PF_KTHREAD:
        raise NativeError(errno.EINVAL, "process %d is a kernel thread: it has no user memory to track" % pid)
    if state in "ZX" and _live_thread(pid) is None:
        raise _gone(pid, "has exited (zombie)")
    tgid = _tgid(pid)
    if tgid != pid:
        raise NativeError(errno.EINVAL, "%d is a thread of process %d: track the process" % (pid, tgid))


def _tgid(pid) -> int:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise _gone(pid) from None
    return pid


def _read_maps(pid) -> str:
    """/proc/PID/maps, through a live thread if the leader is a zombie."""
    with open("/proc/%d/maps" % pid) as f:
        text = f.read()
    if not text:
        tid = _live_thread(pid)
        if tid is not None and tid != pid:
            with open("/proc/%d/task/%d/maps" % (pid, tid)) as f:
                text = f.read()
    return text


def read_vmas(pid) -> list[Range]:
    """The trackable VMAs of pid, in address order."""
    try:
        text = _read_maps(pid)
    except FileNotFoundError:
        raise _gone(pid) from None
    except PermissionError as e:
        raise AccessDenied(errno.EPERM, "cannot read /proc/%d/maps: not permitted" % pid, pid=pid) from e
    if not text:
        check_process(pid)  # a kernel thread or a zombie: say which
        raise _gone(pid)
    return parse_maps(text)


class PageBatch(NamedTuple):
    """Pages [vaddr, vaddr + npages * 4096) of a process, as they travel:
    zero pages are only a bit in zero_bitmap (bit i, little-endian within
    each byte, for page i), data holds the other pages in order."""

    vaddr: int
    data: memoryview
    zero_bitmap: bytes
    npages: int
    nzero: int


def read_run(pid, at, end, view) -> tuple[int, bytes, int, int]:
    """Read the pages of [at, end) of pid that fit in view (a writable
    memoryview of whole pages) into it, the data pages packed at its front:
    (pages read, zero bitmap, data pages, where to read next). Pages that
    cannot be read (unmapped meanwhile) are skipped: the next scan reports
    them removed. NativeError ESRCH when the process is gone."""
    npages = min(len(view) // PAGE_SIZE, (end - at) // PAGE_SIZE)
    got, zero, ndata = native.read_pages_into(pid, at, view[: npages * PAGE_SIZE])
    nxt = at + got * PAGE_SIZE
    if got < npages:
        nxt = next_mapped(pid, nxt + PAGE_SIZE, end)
    return got, zero, ndata, nxt


def read_pages(pid, start, end, batch_pages=READ_BATCH_PAGES) -> Iterator[PageBatch]:
    """Yield PageBatch(vaddr, data, zero_bitmap, npages, nzero) for the pages
    of [start, end) of pid, at most batch_pages at a time (read_run)."""
    if start % PAGE_SIZE or end % PAGE_SIZE:
        raise ValueError(f"range 0x{start:x}-0x{end:x} is not page aligned")
    at = start
    while at < end:
        buf = memoryview(bytearray(min(batch_pages, (end - at) // PAGE_SIZE) * PAGE_SIZE))
        got, zero, ndata, nxt = read_run(pid, at, end, buf)
        if got:
            yield PageBatch(at, buf[: ndata * PAGE_SIZE], zero, got, got - ndata)
        at = nxt


def next_mapped(pid, addr, end) -> int:
    """The first mapped address >= addr (end if none before it)."""
    try:
        text = _read_maps(pid)
    except FileNotFoundError:
        raise _gone(pid) from None
    for line in text.splitlines():
        s, e = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
        if e > addr:
            return min(max(s, addr), end)
    return end


# --- one process ------------------------------------------------------------------


@dataclass
class ScanResult:
    """What changed in one process since the previous scan."""

    dirty: list[Range]  # to send now: written + new + untrackable + cooled down
    removed: list[Range]  # no longer mapped (or no longer trackable)
    pages_scanned: int  # pages of the VMAs scanned
    scan_s: float  # wall time of the scan
    new: list[Range] = field(default_factory=list)  # VMAs that appeared, whole (in dirty)
    written: list[Range] = field(default_factory=list)  # pages the scan found written
    stop_s: float = 0.0  # time the target was held (soft-dirty freezes it)
    hot: list[Range] = field(default_factory=list)  # owed but not in dirty: for the final round (keep_hot)

    @property
    def dirty_pages(self) -> int:
        return pages_in(self.dirty)

    @property
    def hot_pages(self) -> int:
        return pages_in(self.hot)

    @property
    def owed(self) -> list[Range]:
        """Everything the destination may lack: dirty and hot (the final,
        frozen round sends this)."""
        return merge(self.dirty + self.hot)

    @property
    def written_pages(self) -> int:
        return pages_in(self.written)


def choose_method(method=None) -> str:
    """The tracking method: `method` if given, else the one the doctor found
    working here (SetupError if none)."""
    if method is None:
        from ..doctor import require_dirty_tracker

        return require_dirty_tracker()
    if method not in METHODS:
        raise ValueError("unknown dirty tracking method {!r} (one of {})".format(method, ", ".join(METHODS)))
    return method


class DirtyTracker:
    """Dirty-page tracking of one process (all its threads share the mm).

    attach() stops one thread for a fraction of a millisecond to take a
    userfaultfd from it (uffd-wp); detach() — or this process dying — leaves
    nothing behind in the target. Use from one thread.

    Every write to a page protected again by a scan costs the target one
    write-protect fault (~1.5 µs here, more than the page write itself).
    keep_hot (uffd-wp only) spares the pages written round after round:
    a run of at least HOT_MIN_PAGES pages written in two scans in a row is
    hot: left unprotected (its rewrites stop faulting), no longer looked at,
    and reported in `hot`, not in `dirty`: pre-copy does not send it round
    after round, the final (frozen) round sends it. Each scan probes a
    rotating share of the hot set (each hot page about once per
    probe_period_s): protects it again, and at the next scan looks at it
    without protecting; pages written meanwhile stay hot, the others have
    cooled down: they are in that scan's dirty and tracked exactly again.
    dirty + hot is always a superset of what the destination lacks;
    drop_hot() ends keep_hot, the hot pages going into the next dirty.
    """

    def __init__(self, pid: int, method: str | None = None, keep_hot: bool = False):
        self.pid = pid
        self.method = choose_method(method)
        self.keep_hot = keep_hot and self.method == UFFD_WP
        self._hot: list[Range] = []  # left unprotected, not looked at, owed (keep_hot)
        self._probation: list[Range] = []  # hot, protected again by the last scan's probe, owed
        self._last_written: list[Range] = []  # runs the previous scan found written (hot candidates)
        self._probe_at = 0  # where in the hot set the next probe starts
        self._probe_credit = 0.0  # hot pages due for a probe
        self._last_scan = 0.0  # time.monotonic() of the last scan (or attach)
        self._release_hot = False  # drop_hot() was called: hot pages go into the next dirty
        self.probe_period_s = HOT_PROBE_PERIOD_S
        self._tracker: native.Tracker | None = None
        self._pidfd: int | None = None
        self._vmas: list[Range] = []
        self._tracked: list[Range] = []  # registered (or untrackable) addresses
        self._untracked: list[Range] = []  # could not be registered: always dirty
        self.attached = False
        #: how long attach() stopped the target, in ms
        self.stop_ms = 0.0

    # --- life cycle ---
    def attach(self) -> float:
        """Start tracking; returns how long the target was stopped, in ms."""
        if self.attached:
            raise HybridmigError("already tracking process %d" % self.pid)
        check_process(self.pid)
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError as e:
            message = "cannot open a pidfd of process %d: %s" % (self.pid, e.strerror)
            raise native_error(e.errno or 0, message, origin="pidfd_open", pid=self.pid) from e
        try:
            vmas = read_vmas(self.pid)
            stop_ns = self._attach_native()
            self._vmas = vmas
            self._tracked = merge(vmas)
            self._untracked = []
            self._hot, self._probation, self._last_written = [], [], []
            self._probe_at, self._probe_credit, self._last_scan = 0, 0.0, time.monotonic()
            self._register(vmas)
            self.attached = True
            self.stop_ms = stop_ns / 1e6
            return self.stop_ms
        except BaseException:
            self._release()
            raise

    def _attach_native(self) -> int:
        try:
            if self.method == UFFD_WP:
                self._tracker = native.Tracker(self.pid)
                return self._tracker.stop_ns
            native.softdirty_clear(self.pid)
            return 0
        except NativeError as e:
            self._raise_if_gone()
            hint = {
                errno.EPERM: " — needs root (CAP_SYS_PTRACE), and no other tracer (debugger, CRIU) attached",
                errno.EOPNOTSUPP: " — the kernel lacks UFFD_FEATURE_WP_ASYNC (6.7+): use soft-dirty",
                errno.ECANCELED: " — it has a seccomp filter, which could kill it for the injected"
                " userfaultfd(), and this process may not suspend it (that needs CAP_SYS_ADMIN and no"
                " seccomp filter of its own); nothing was run in it",
            }
            message = "cannot track process %d: %s%s" % (self.pid, e.strerror, hint.get(e.errno or 0, ""))
            raise native_error(e.errno or 0, message, origin=e.origin, pid=self.pid) from e

    def detach(self) -> None:
        """Stop tracking (idempotent); the target keeps running untouched."""
        self.attached = False
        self._release()

    def _native(self) -> native.Tracker:
        """The userfaultfd tracker (uffd-wp method, attached)."""
        assert self._tracker is not None, "uffd-wp tracker used before attach()"
        return self._tracker

    def refresh(self, start: int, end: int) -> None:
        """[start, end) is about to be read whole and sent: its written pages
        are protected again, what was written there so far forgotten (it
        travels with this read; a write from now on counts in the next
        scan). Without it a page written during a round before the round
        reached it goes again in the next one: 70 % of 1 GiB written at 20000
        pages/s over 1 Gbit/s came back after round 0. Exact tracking only
        (uffd-wp, no hot pages: those are protected and looked at apart).
        Called by the sender's reader thread, never during a scan. A failure
        leaves the pages written: sent again, never lost."""
        if not self.attached or self.method != UFFD_WP or self._hot or self._probation:
            return
        with contextlib.suppress(NativeError):
            self._native().scan(start, end, True)

    def peek(self, ranges) -> int | None:
        """How many pages of ranges (sorted) were written since they were last
        protected, leaving them as they are (auto's early switch-over,
        source/early.py). None where it cannot tell: not uffd-wp, or hot
        pages kept unprotected."""
        if not self.attached or self.method != UFFD_WP or self._hot or self._probation:
            return None
        written = 0
        for start, end in clip(self._vmas, ranges):
            with contextlib.suppress(NativeError):  # (a VMA gone or replaced: the next scan tells)
                written += pages_in(self._native().scan(start, end, False))
        return written

    def _release(self):
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __enter__(self) -> "DirtyTracker":
        if not self.attached:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def alive(self) -> bool:
        """False once the process has exited (even if not yet reaped)."""
        if self._pidfd is None:
            return False
        return not select.select([self._pidfd], [], [], 0)[0]

    def _raise_if_gone(self):
        if not self.alive():
            raise _gone(self.pid)

    # --- tracking ---
    def vmas(self) -> list[Range]:
        """The tracked VMAs as of the last attach() or scan()."""
        return list(self._vmas)

    def _register(self, ranges):
        """Register ranges (pieces of VMAs) for tracking; a piece the kernel
        refuses (another userfaultfd owns it, a VMA kind it cannot track, a
        VMA that went away meanwhile) is sent every round instead."""
        if self.method != UFFD_WP:
            return
        for start, end in ranges:
            try:
                self._native().register(start, end)
            except NativeError:
                self._raise_if_gone()
                self._untracked = merge(self._untracked + [(start, end)])

    def drop_hot(self) -> None:
        """Track exactly from now on: the next scan protects the hot pages
        again and puts them in its dirty (auto-converge slows the process
        down; only exact tracking shows how much less it writes)."""
        self._release_hot = self._release_hot or bool(self._hot or self._probation)
        self.keep_hot = False
        self._last_written = []

    def scan(self) -> ScanResult:
        """What must travel again since the previous scan (or attach)."""
        if not self.attached:
            raise HybridmigError("not tracking process %d: attach() first" % self.pid)
        t0 = time.perf_counter()
        self._raise_if_gone()
        vmas = read_vmas(self.pid)
        current = merge(vmas)
        new = subtract(current, self._tracked)
        removed = subtract(self._tracked, current)
        self._untracked = intersect(self._untracked, current)
        stop_s = 0.0
        released: list[Range] = []
        if self.method == UFFD_WP:
            self._register(clip(vmas, new))
            if self._release_hot:
                released = intersect(self._hot + self._probation, current)
                self._hot, self._probation, self._release_hot = [], [], False
            written, hot, cooled = self._scan_uffd(vmas, current, new)
        else:
            written, stop_s = self._scan_soft_dirty(vmas, new)
            hot, cooled = [], []
        self._raise_if_gone()  # what was read of a dying process means nothing
        dirty = merge(subtract(written, hot) + cooled + new + self._untracked + released)
        self._vmas = vmas
        self._tracked = current
        return ScanResult(
            dirty=dirty,
            removed=removed,
            pages_scanned=pages_in(current),
            scan_s=time.perf_counter() - t0,
            new=new,
            written=written,
            stop_s=stop_s,
            hot=hot,
        )

    def _scan_uffd(self, vmas, current, new):
        """(written, hot, cooled): the pages found written; the hot set after
        this scan (owed, not to be sent now); probed pages that cooled down."""
        hot = intersect(self._hot, current)
        probation = intersect(self._probation, current)
        candidates = subtract(intersect(self._last_written, current), hot)
        probe = self._take_probe(hot)
        todo = subtract(current, merge(new + self._untracked + subtract(hot, probe)))
        # Looked at without protecting: hot candidates (written at the last
        # scan: if written again they stay unprotected, with no second fault)
        # and the pages of the last probe.
        peek = intersect(todo, merge(candidates + probation))
        seen = merge(self._walk(vmas, peek, protect=False))
        written = self._walk(vmas, subtract(todo, peek), protect=True)
        again = [r for r in intersect(seen, candidates) if r[1] - r[0] >= HOT_MIN_PAGES * PAGE_SIZE]
        # the candidates but the hot runs: written pages among them (in runs
        # too short to be hot) are protected again, one walk per piece
        written += self._walk(vmas, subtract(intersect(peek, candidates), again), protect=True)
        written = merge(written + seen)
        cooled = subtract(probation, seen)
        if self.keep_hot:
            self._hot = merge(subtract(hot, probe) + again + intersect(seen, probation))
            self._probation = probe
            owed = merge(self._hot + probe)
        else:
            self._hot, self._probation, owed = [], [], []
        self._last_written = (
            [r for r in subtract(written, owed) if r[1] - r[0] >= HOT_MIN_PAGES * PAGE_SIZE] if self.keep_hot else []
        )
        return written, owed, cooled

    def _take_probe(self, hot) -> list[Range]:
        """The next share of the hot set to protect again, from where the
        last probe ended, wrapping around: each hot page once in about
        probe_period_s, taken once at least HOT_MIN_PAGES pages are due."""
        now = time.monotonic()
        total = pages_in(hot)
        self._probe_credit = min(total, self._probe_credit + total * (now - self._last_scan) / self.probe_period_s)
        self._last_scan = now
        if not total or self._probe_credit < min(total, HOT_MIN_PAGES):
            return []
        want = int(self._probe_credit) * PAGE_SIZE
        self._probe_credit -= want // PAGE_SIZE
        # hot ranges from the cursor on, then those before it
        ordered = [(max(s, self._probe_at), e) for s, e in hot if e > self._probe_at] + [
            (s, min(e, self._probe_at)) for s, e in hot if s < self._probe_at
        ]
        out = []
        for start, end in ordered:
            take = min(end - start, want)
            out.append((start, start + take))
            want -= take
            self._probe_at = start + take
            if not want:
                break
        return merge(out)

    def _walk(self, vmas, ranges, protect) -> list[Range]:
        """The written pages of ranges (of tracked VMAs), protected again if
        protect."""
        written: list[Range] = []
        for start, end in clip(vmas, ranges):
            try:
                written += self._native().scan(start, end, protect)
            except NativeError as e:
                self._raise_if_gone()
                if not isinstance(e, AccessDenied):
                    raise
                # A VMA there was replaced (munmap + mmap at the same place)
                # and is not registered: its content is new. What the scan
                # protected before failing is lost, so all of it goes again.
                self._register([(start, end)])
                written.append((start, end))
        return written

    def _scan_soft_dirty(self, vmas, new):
        """Soft-dirty bits read and cleared with every thread frozen: a write
        between the read and the clear would otherwise be lost. A process
        another tracer already holds stopped (CRIU at post-dump) cannot be
        frozen again, nor does it need to be: it cannot write."""
        tracer = _held_stopped(self.pid)
        if tracer:
            return self._soft_dirty_pass(vmas, new), 0.0
        try:
            frozen = native.Frozen(self.pid)
        except NativeError as e:
            self._raise_if_gone()
            tracer = _tracer(self.pid)
            if not isinstance(e, AccessDenied) or not tracer:
                raise
            raise NativeError(
                errno.EBUSY,
                "cannot scan process %d for soft-dirty pages: it must be frozen for"
                " the scan, and process %d (%s) traces it without holding all its threads stopped"
                % (self.pid, tracer, _comm(tracer)),
            ) from e
        with frozen:
            written = self._soft_dirty_pass(vmas, new)
            stop_ns = frozen.thaw()
        return written, stop_ns / 1e9

    def _soft_dirty_pass(self, vmas, new) -> list[Range]:
        written: list[Range] = []
        for start, end in subtract(merge(vmas), new):
            written += native.softdirty_scan(self.pid, start, end)
        native.softdirty_clear(self.pid)
        return written


# --- a process tree -------------------------------------------------------------------


class TreeScanResult(dict):
    """{pid: ScanResult} of every live process of the tree (new ones sent
    whole), with the pids that appeared (new) and exited since the last scan."""

    def __init__(self, results, new, exited):
        super().__init__(results)
        self.new: list[int] = new
        self.exited: list[int] = exited

    @property
    def results(self) -> dict[int, ScanResult]:
        return dict(self)

    @property
    def dirty_pages(self) -> int:
        return sum(r.dirty_pages for r in self.values())

    @property
    def hot_pages(self) -> int:
        return sum(r.hot_pages for r in self.values())


class TreeTracker:
    """One DirtyTracker per process of the tree rooted at pid.

    Children are found with psutil, recursively, at attach() and at each
    scan(): a new one is attached and its VMAs returned whole; one that
    exited is reported and forgotten. Processes re-parented out of the tree
    stay tracked until they exit. The root exiting raises ESRCH. A new
    child held by another tracer (CRIU freezing the tree) cannot be
    attached: it is returned whole each time instead.
    """

    def __init__(self, pid: int, method: str | None = None, keep_hot: bool = False):
        self.root = pid
        self.method = choose_method(method)
        self.keep_hot = keep_hot
        self.trackers: dict[int, DirtyTracker] = {}
        #: {pid: ms the process was stopped when attached}
        self.stop_ms: dict[int, float] = {}

    def pids(self) -> list[int]:
        return sorted(self.trackers)

    def vmas(self) -> dict[int, list[Range]]:
        """{pid: its tracked VMAs (merged)} as of the last attach() or scan()."""
        return {pid: merge(t.vmas()) for pid, t in self.trackers.items()}

    def attach(self) -> float:
        """Attach to every process of the tree, one at a time; returns the
        longest stop of a process in ms (all of them are in stop_ms)."""
        try:
            root = DirtyTracker(self.root, self.method, self.keep_hot)
            self.stop_ms[self.root] = root.attach()
            self.trackers[self.root] = root
            for _ in self._attach_new({}):
                pass
        except BaseException:
            self.detach()
            raise
        return max(self.stop_ms.values())

    def _descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.root).children(recursive=True)]
        except psutil.NoSuchProcess:
            raise _gone(self.root) from None

    def _attach_new(self, results):
        """Attach to descendants not tracked yet, putting a whole-VMAs
        ScanResult for each in results; those that exit meanwhile are
        skipped. Yields the new pids."""
        for pid in self._descendants():
            if pid in self.trackers:
                continue
            t0 = time.perf_counter()
            tracker = DirtyTracker(pid, self.method, self.keep_hot)
            try:
                stop_ms = tracker.attach()
                self.trackers[pid] = tracker
                whole = merge(tracker.vmas())
            except ProcessGone:
                continue  # exited (or a zombie) before we got to it
            except AccessDenied:
                if not _tracer(pid):
                    raise
                try:
                    stop_ms, whole = 0.0, merge(read_vmas(pid))
                except ProcessGone:
                    continue
            self.stop_ms[pid] = stop_ms
            results[pid] = ScanResult(
                dirty=whole,
                removed=[],
                pages_scanned=0,
                new=whole,
                scan_s=time.perf_counter() - t0,
                stop_s=stop_ms / 1e3,
            )
            yield pid

    def scan(self) -> TreeScanResult:
        results, exited = {}, []
        for pid, tracker in list(self.trackers.items()):
            try:
                results[pid] = tracker.scan()
            except ProcessGone:
                if pid == self.root:
                    raise
                tracker.detach()
                del self.trackers[pid]
                self.stop_ms.pop(pid, None)
                exited.append(pid)
        new = list(self._attach_new(results))
        return TreeScanResult(results, new, exited)

    def refresh(self, pid: int, start: int, end: int) -> None:
        """DirtyTracker.refresh() of process pid, if tracked."""
        tracker = self.trackers.get(pid)
        if tracker is not None:
            tracker.refresh(start, end)

    def peek(self, pid: int, ranges) -> int | None:
        """DirtyTracker.peek() of process pid (0 if no longer tracked)."""
        tracker = self.trackers.get(pid)
        return tracker.peek(ranges) if tracker is not None else 0

    def drop_hot(self) -> None:
        """DirtyTracker.drop_hot() for every process, and no keep_hot for
        the ones that join."""
        self.keep_hot = False
        for tracker in self.trackers.values():
            tracker.drop_hot()

    def detach(self) -> None:
        for tracker in self.trackers.values():
            tracker.detach()
        self.trackers.clear()

    def __enter__(self) -> "TreeTracker":
        if not self.trackers:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _tracer(pid) -> int:
    """The pid of the ptrace tracer holding pid (a debugger, CRIU), or 0."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def _comm(pid) -> str:
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except FileNotFoundError:
        return "gone"


def _held_stopped(pid) -> int:
    """The tracer (not this process) that holds every thread of pid in a
    ptrace stop, as CRIU does while dumping; 0 if there is none."""
    tracer = _tracer(pid)
    if not tracer or tracer == os.getpid():
        return 0
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                text = f.read()
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                held = any(line.startswith("TracerPid:") and int(line.split()[1]) == tracer for line in f)
        except FileNotFoundError:
            continue  # exited meanwhile
        if text[text.rfind(")") + 2 :].split()[0] != "t" or not held:
            return 0
    return tracer
