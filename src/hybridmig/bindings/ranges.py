"""Interval lists (native/api/ranges.h)."""

from ._ffi import check, ffi, lib


class Ranges:
    """Sorted, disjoint [start, end) address ranges; adjacent ones merge."""

    def __init__(self, ranges=()):
        out = ffi.new("hm_ranges **")
        check(lib.hm_ranges_new(out), "hm_ranges_new")
        self._r = ffi.gc(out[0], lib.hm_ranges_free)
        for start, end in ranges:
            self.add(start, end)

    def add(self, start, end):
        check(lib.hm_ranges_add(self._r, start, end), "hm_ranges_add")

    def remove(self, start, end):
        check(lib.hm_ranges_remove(self._r, start, end), "hm_ranges_remove")

    def move(self, src, dst, length):
        check(lib.hm_ranges_move(self._r, src, dst, length), "hm_ranges_move")

    def __contains__(self, addr):
        return bool(lib.hm_ranges_contains(self._r, addr))

    def next(self, addr):
        """The first part of a range at or after addr, as (start, end), or None."""
        start, end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        if lib.hm_ranges_next(self._r, addr, start, end):
            return start[0], end[0]
        return None

    def total(self):
        return lib.hm_ranges_total(self._r)

    def copy(self):
        other = Ranges()
        check(lib.hm_ranges_copy(self._r, other._r), "hm_ranges_copy")
        return other

    def __len__(self):
        return lib.hm_ranges_count(self._r)

    def __iter__(self):
        start, end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        for i in range(len(self)):
            check(lib.hm_ranges_get(self._r, i, start, end), "hm_ranges_get")
            yield start[0], end[0]

    def __repr__(self):
        return "Ranges({})".format(", ".join("0x{:x}-0x{:x}".format(*r) for r in self))
