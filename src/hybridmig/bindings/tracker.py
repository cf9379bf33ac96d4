"""Dirty-page tracking and page reading of another process (native/api/tracker.h).

Plain wrappers: ranges are (start, end) tuples of page-aligned addresses,
errors are NativeError carrying the kernel's errno (ProcessGone, AccessDenied
by errno, with the pid). Calls release the GIL.
"""

import errno
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from ._ffi import PAGE_SIZE, check, check_range, ffi, lib

#: regions fetched per PAGEMAP_SCAN / pagemap pass; the scan goes on from
#: where a full buffer stopped it.
SCAN_BATCH = 4096
#: soft-dirty bit of a /proc/PID/pagemap entry
SOFT_DIRTY = 1 << lib.HM_PAGEMAP_SOFT_DIRTY_BIT


def _check_pid(pid: object) -> None:
    if not isinstance(pid, int) or pid <= 0:
        raise UsageError(f"bad pid {pid!r}")


def _check_span(start: int, end: int) -> None:
    check_range(start, 0)
    check_range(end, 0)
    if end <= start:
        raise UsageError(f"empty range 0x{start:x}-0x{end:x}")


_REGION = struct.Struct("=QQQ")  # struct hm_page_region


def _append(out: list[tuple[int, int]], regions: Any, n: int) -> None:
    """Append n native regions to out, merging with out[-1] when adjacent."""
    for start, end, _ in _REGION.iter_unpack(ffi.buffer(regions, n * _REGION.size)):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))


def _progress(at: int, nxt: int, origin: str) -> int:
    """Where a scan resumes; an error rather than a silently partial answer
    if it did not advance."""
    if nxt <= at:
        check(-errno.EIO, origin)
    return nxt


class Tracker:
    """A userfaultfd taken from process `pid` (uffd-wp async tracking).

    Attaching stops one thread of the target briefly (stop_ns); closing, or
    this object's collection, or this process's death, drops every
    registration in the kernel.
    """

    def __init__(self, pid: int) -> None:
        _check_pid(pid)
        out, stop = ffi.new("hm_tracker **"), ffi.new("uint64_t *")
        check(lib.hm_tracker_attach(pid, out, stop), "hm_tracker_attach", pid=pid)
        self._t = ffi.gc(out[0], lib.hm_tracker_detach)
        self._regions = ffi.new("struct hm_page_region[]", SCAN_BATCH)
        self.pid = pid
        #: how long attaching held the target's thread, in ns
        self.stop_ns = int(stop[0])

    def _handle(self) -> Any:
        if self._t is None:
            raise UsageError("tracker of pid %d is closed" % self.pid)
        return self._t

    def register(self, start: int, end: int) -> None:
        """Track [start, end) (whole VMAs), write-protected from now on."""
        _check_span(start, end)
        check(lib.hm_tracker_register(self._handle(), start, end - start), "hm_tracker_register", pid=self.pid)

    def unregister(self, start: int, end: int) -> None:
        _check_span(start, end)
        check(lib.hm_tracker_unregister(self._handle(), start, end - start), "hm_tracker_unregister", pid=self.pid)

    def scan(self, start: int, end: int, protect: bool = True) -> list[tuple[int, int]]:
        """[(start, end)] of the pages of [start, end) written since they
        were last protected, each protected again in the same step (unless
        not protect). NativeError EPERM: part of the range is no longer
        registered."""
        _check_span(start, end)
        t = self._handle()
        n, nxt = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        out: list[tuple[int, int]] = []
        at = start
        while at < end:
            check(
                lib.hm_tracker_scan(t, at, end, int(protect), self._regions, SCAN_BATCH, n, nxt),
                "hm_tracker_scan",
                pid=self.pid,
            )
            _append(out, self._regions, n[0])
            at = _progress(at, nxt[0], "hm_tracker_scan")
        return out

    def close(self) -> None:
        if self._t is not None:
            ffi.release(self._t)  # runs hm_tracker_detach now
            self._t = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remote_syscall(pid: int, nr: int, *args: int) -> tuple[int, int]:
    """(return value, stop ns) of system call nr(*args) run inside pid."""
    _check_pid(pid)
    if len(args) > 6:
        raise UsageError("a system call takes at most 6 arguments")
    argv = ffi.new("int64_t[6]", list(args) + [0] * (6 - len(args)))
    ret, stop = ffi.new("int64_t *"), ffi.new("uint64_t *")
    check(lib.hm_remote_syscall(pid, nr, argv, ret, stop), "hm_remote_syscall", pid=pid)
    return int(ret[0]), int(stop[0])


def read_pages_into(pid: int, vaddr: int, buf: bytearray | memoryview) -> tuple[int, bytes, int]:
    """Read len(buf) // 4096 pages of pid at vaddr into the writable buffer
    buf: (pages read, zero bitmap bytes, bit i = page i is all zeros, data
    pages). The pages that are not all zeros are packed to the front of buf,
    in order: buf then starts with a PAGES body's data. Fewer pages than
    asked means the next page could not be read."""
    _check_pid(pid)
    view = memoryview(buf)
    if view.readonly:
        raise UsageError("buffer is read-only")
    npages = view.nbytes // PAGE_SIZE
    check_range(vaddr, npages)
    bitmap = ffi.new("uint8_t[]", (npages + 7) // 8)
    ndata = ffi.new("uint64_t *")
    # released before an error propagates: a traceback kept in a reference
    # cycle (an error handed to another thread) would otherwise hold the
    # export, and the collector clearing the cycle crashed on it
    with ffi.from_buffer("uint8_t[]", buf, require_writable=True) as data:
        got = check(lib.hm_read_pages(pid, vaddr, npages, data, bitmap, ndata), "hm_read_pages", pid=pid)
    return got, bytes(ffi.buffer(bitmap, (got + 7) // 8)), int(ndata[0])


def softdirty_clear(pid: int) -> None:
    _check_pid(pid)
    check(lib.hm_softdirty_clear(pid), "hm_softdirty_clear", pid=pid)


def softdirty_scan(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """[(start, end)] of the pages of [start, end) with the soft-dirty bit."""
    _check_pid(pid)
    _check_span(start, end)
    regions = ffi.new("struct hm_page_region[]", SCAN_BATCH)
    n, nxt = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    out: list[tuple[int, int]] = []
    at = start
    while at < end:
        check(lib.hm_softdirty_scan(pid, at, end, regions, SCAN_BATCH, n, nxt), "hm_softdirty_scan", pid=pid)
        _append(out, regions, n[0])
        at = _progress(at, nxt[0], "hm_softdirty_scan")
    return out


def pagemap_ranges(
    entries: Sequence[int], base: int, mask: int = SOFT_DIRTY, max_regions: int = SCAN_BATCH
) -> list[tuple[int, int]]:
    """[(start, end)] of the pages whose pagemap entry (a sequence of ints,
    the first for the page at base) has a bit of mask; the native parser."""
    check_range(base, len(entries))
    arr = ffi.new("uint64_t[]", list(entries))
    regions = ffi.new("struct hm_page_region[]", max(1, max_regions))
    n, consumed = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    out: list[tuple[int, int]] = []
    done = 0
    while done < len(entries):
        n[0] = 0
        check(
            lib.hm_pagemap_ranges(
                arr + done,
                len(entries) - done,
                base + done * PAGE_SIZE,
                mask,
                regions,
                max(1, max_regions),
                n,
                consumed,
            ),
            "hm_pagemap_ranges",
        )
        _append(out, regions, n[0])
        done += consumed[0]
    return out


class Frozen:
    """Every thread of pid held in a ptrace stop until thaw()."""

    def __init__(self, pid: int) -> None:
        _check_pid(pid)
        out, threads = ffi.new("hm_frozen **"), ffi.new("uint32_t *")
        check(lib.hm_freeze_process(pid, out, threads), "hm_freeze_process", pid=pid)
        self._f = out[0]
        self.pid = pid
        self.threads = int(threads[0])

    def thaw(self) -> int:
        """Let the process run again: how long it was frozen, in ns."""
        if self._f is None:
            return 0
        stop = ffi.new("uint64_t *")
        f, self._f = self._f, None
        check(lib.hm_thaw_process(f, stop), "hm_thaw_process", pid=self.pid)
        return int(stop[0])

    def __enter__(self) -> "Frozen":
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()

    def __del__(self) -> None:
        if getattr(self, "_f", None) is not None:
            self.thaw()
