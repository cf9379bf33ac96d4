"""The RAM page store (native/api/pagestore.h)."""

from typing import Any

from ..errors import StoreError, UsageError
from ._ffi import PAGE_SIZE, check, check_range, ffi, lib

ABSENT, DATA, ZERO = lib.HM_PAGE_ABSENT, lib.HM_PAGE_DATA, lib.HM_PAGE_ZERO


def _check(rc: int, origin: str, pid: int | None = None) -> int:
    return check(rc, origin, pid=pid, exc=StoreError)


class PageStore:
    """Pages of many tasks in native memory, keyed by (task key, address).

    One thread may fill it (put, load_file) while the fault loop installs
    from it; a later put of a page overrides an earlier one. Several
    threads may put at once (page streams): each call locks the task for
    one chunk at a time. Calls release the GIL.
    """

    def __init__(self) -> None:
        out = ffi.new("hm_store **")
        _check(lib.hm_store_new(out), "hm_store_new")
        self._s = ffi.gc(out[0], lib.hm_store_free)

    @property
    def handle(self) -> Any:
        """The native handle, for the other binding modules only."""
        return self._s

    def put(self, key: int, vaddr: int, data: bytes | bytearray | memoryview) -> None:
        """Store len(data) // 4096 pages of `data` (any buffer) at vaddr."""
        if len(data) % PAGE_SIZE:
            raise UsageError("data length %d is not a whole number of pages" % len(data))
        check_range(vaddr, len(data) // PAGE_SIZE)
        with ffi.from_buffer("uint8_t[]", data) as buf:  # (released at once: see tracker.read_pages_into)
            _check(lib.hm_store_put(self._s, key, vaddr, buf, len(data) // PAGE_SIZE), "hm_store_put")

    def put_zero(self, key: int, vaddr: int, npages: int) -> None:
        check_range(vaddr, npages)
        _check(lib.hm_store_put_zero(self._s, key, vaddr, npages), "hm_store_put_zero")

    def put_pages(self, key: int, vaddr: int, npages: int, zero: bytes, data: bytes | bytearray | memoryview) -> int:
        """Store one PAGES extent: npages pages at vaddr, bit i of `zero` set
        for an all-zero page, the others' data in order at the start of
        `data`. Returns the bytes of data used."""
        check_range(vaddr, npages)
        if len(zero) < (npages + 7) // 8:
            raise UsageError("zero bitmap of %d bytes for %d pages" % (len(zero), npages))
        with ffi.from_buffer("uint8_t[]", data) as buf:
            used = _check(
                lib.hm_store_put_pages(self._s, key, vaddr, npages, zero, buf, len(data) // PAGE_SIZE),
                "hm_store_put_pages",
            )
        return used * PAGE_SIZE

    def load_file(self, key: int, vaddr: int, npages: int, fd: int, offset: int) -> None:
        """Read npages pages from file descriptor fd at offset straight into the store."""
        check_range(vaddr, npages)
        if offset % PAGE_SIZE:
            raise UsageError("file offset %d is not page aligned" % offset)
        _check(lib.hm_store_load_fd(self._s, key, vaddr, npages, fd, offset), "hm_store_load_fd")

    def invalidate(self, key: int, vaddr: int, npages: int) -> None:
        check_range(vaddr, npages)
        _check(lib.hm_store_invalidate(self._s, key, vaddr, npages), "hm_store_invalidate")

    def forget(self, key: int, ranges: list[tuple[int, int]]) -> None:
        """Pages of (vaddr, npages) ranges become absent, in one call, their
        memory kept for the pages that replace them (post-copy's STALE).
        Ranges are checked natively (unaligned: StoreError)."""
        pairs = ffi.new("uint64_t[]", [x for r in ranges for x in r])
        _check(lib.hm_store_forget(self._s, key, pairs, len(ranges)), "hm_store_forget")

    def get(self, key: int, vaddr: int) -> tuple[int, bytes | None]:
        """(kind, bytes): kind is ABSENT, DATA or ZERO; bytes only for DATA."""
        check_range(vaddr, 1)
        out = ffi.new("uint8_t[]", PAGE_SIZE)
        kind = _check(lib.hm_store_get(self._s, key, vaddr, out), "hm_store_get")
        return kind, (ffi.buffer(out)[:] if kind == DATA else None)

    def count(self, key: int, vaddr: int, npages: int) -> tuple[int, int]:
        """(pages with data, zero pages) held in the range."""
        check_range(vaddr, npages)
        data, zero = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.hm_store_count(self._s, key, vaddr, npages, data, zero), "hm_store_count")
        return int(data[0]), int(zero[0])

    def clone_task(self, src: int, dst: int) -> None:
        _check(lib.hm_store_clone_task(self._s, src, dst), "hm_store_clone_task")

    def move(self, key: int, src: int, dst: int, npages: int) -> None:
        check_range(src, npages)
        check_range(dst, npages)
        _check(lib.hm_store_move(self._s, key, src, dst, npages), "hm_store_move")

    def populate(self, key: int) -> None:
        """Map every file-mapped page of task `key` into the page tables now,
        so that installing it never faults on the source (see pagestore.c)."""
        _check(lib.hm_store_populate(self._s, key), "hm_store_populate")

    def drop_task(self, key: int) -> None:
        _check(lib.hm_store_drop_task(self._s, key), "hm_store_drop_task")

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct hm_store_stats *")
        lib.hm_store_stats(self._s, st)
        return {f: int(getattr(st, f)) for f, _ in ffi.typeof("struct hm_store_stats").fields}
