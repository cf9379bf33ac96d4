"""Interval lists (native/api/ranges.h)."""

from collections.abc import Iterable, Iterator

from ._ffi import check, ffi, lib


class Ranges:
    """Sorted, disjoint [start, end) address ranges; adjacent ones merge."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        out = ffi.new("hm_ranges **")
        check(lib.hm_ranges_new(out), "hm_ranges_new")
        self._r = ffi.gc(out[0], lib.hm_ranges_free)
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        check(lib.hm_ranges_add(self._r, start, end), "hm_ranges_add")

    def remove(self, start: int, end: int) -> None:
        check(lib.hm_ranges_remove(self._r, start, end), "hm_ranges_remove")

    def move(self, src: int, dst: int, length: int) -> None:
        check(lib.hm_ranges_move(self._r, src, dst, length), "hm_ranges_move")

    def __contains__(self, addr: int) -> bool:
        return bool(lib.hm_ranges_contains(self._r, addr))

    def next(self, addr: int) -> tuple[int, int] | None:
        """The first part of a range at or after addr, as (start, end), or None."""
        start, end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        if lib.hm_ranges_next(self._r, addr, start, end):
            return int(start[0]), int(end[0])
        return None

    def total(self) -> int:
        return int(lib.hm_ranges_total(self._r))

    def copy(self) -> "Ranges":
        other = Ranges()
        check(lib.hm_ranges_copy(self._r, other._r), "hm_ranges_copy")
        return other

    def __len__(self) -> int:
        return int(lib.hm_ranges_count(self._r))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        for i in range(len(self)):
            check(lib.hm_ranges_get(self._r, i, start, end), "hm_ranges_get")
            yield int(start[0]), int(end[0])

    def __repr__(self) -> str:
        return "Ranges({})".format(", ".join("0x{:x}-0x{:x}".format(*r) for r in self))
