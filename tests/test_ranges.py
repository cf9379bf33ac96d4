"""Interval lists (hybridmig.bindings.ranges.Ranges, native/src/ranges.c)."""

import random

import pytest

from hybridmig.bindings.ranges import Ranges
from hybridmig.errors import NativeError

P = 4096


def pages(*spans):
    """Ranges from (first page, end page) pairs."""
    return Ranges((a * P, b * P) for a, b in spans)


def spans(r):
    return [(a // P, b // P) for a, b in r]


# --- construction, iteration, len, total, repr ---------------------------------


def test_empty():
    r = Ranges()
    assert len(r) == 0
    assert list(r) == []
    assert r.total() == 0
    assert 0 not in r
    assert r.next(0) is None
    assert repr(r) == "Ranges()"


def test_constructor_sorts_and_iterates_in_order():
    r = Ranges([(50, 60), (10, 20), (30, 40)])
    assert list(r) == [(10, 20), (30, 40), (50, 60)]
    assert len(r) == 3
    assert r.total() == 30
    assert repr(r) == "Ranges(0xa-0x14, 0x1e-0x28, 0x32-0x3c)"


def test_iteration_is_repeatable():
    r = Ranges([(0, 1), (2, 3)])
    assert list(r) == list(r) == [(0, 1), (2, 3)]


def test_huge_addresses():
    top = 2**64 - P
    r = Ranges([(top - 2 * P, top)])
    assert list(r) == [(top - 2 * P, top)]
    assert top - 1 in r and top not in r
    r.add(top, 2**64 - 1)
    assert list(r) == [(top - 2 * P, 2**64 - 1)]
    assert r.total() == 2 * P + P - 1


# --- add ------------------------------------------------------------------------


def test_add_empty_range_is_noop():
    r = Ranges([(10, 20)])
    r.add(30, 30)
    r.add(15, 15)
    assert list(r) == [(10, 20)]


def test_add_inverted_range_is_an_error():
    r = Ranges([(10, 20)])
    with pytest.raises(NativeError) as ei:
        r.add(20, 10)
    assert ei.value.errno == 22  # EINVAL
    assert isinstance(ei.value, OSError)
    assert list(r) == [(10, 20)]


@pytest.mark.parametrize(
    "existing, new, expected",
    [
        # disjoint: before, between, after
        ([(10, 20)], (0, 5), [(0, 5), (10, 20)]),
        ([(10, 20)], (25, 30), [(10, 20), (25, 30)]),
        ([(10, 20), (40, 50)], (25, 30), [(10, 20), (25, 30), (40, 50)]),
        # adjacent ranges merge on either side, and both at once
        ([(10, 20)], (20, 30), [(10, 30)]),
        ([(10, 20)], (0, 10), [(0, 20)]),
        ([(10, 20), (30, 40)], (20, 30), [(10, 40)]),
        # adjacency at 0
        ([(1, 5)], (0, 1), [(0, 5)]),
        ([(0, 5)], (5, 6), [(0, 6)]),
        # overlapping
        ([(10, 20)], (15, 25), [(10, 25)]),
        ([(10, 20)], (5, 15), [(5, 20)]),
        ([(10, 20)], (12, 18), [(10, 20)]),
        ([(10, 20)], (10, 20), [(10, 20)]),
        ([(10, 20)], (0, 30), [(0, 30)]),
        # swallowing many ranges, with partial overlap at the ends
        ([(0, 2), (10, 20), (30, 40), (50, 60), (70, 80)], (15, 55), [(0, 2), (10, 60), (70, 80)]),
        ([(0, 2), (10, 20), (30, 40), (50, 60), (70, 80)], (20, 50), [(0, 2), (10, 60), (70, 80)]),
        ([(0, 2), (10, 20), (30, 40), (50, 60), (70, 80)], (21, 49), [(0, 2), (10, 20), (21, 49), (50, 60), (70, 80)]),
        ([(0, 2), (10, 20), (30, 40), (50, 60), (70, 80)], (0, 100), [(0, 100)]),
        ([(0, 2), (10, 20), (30, 40), (50, 60), (70, 80)], (1, 71), [(0, 80)]),
    ],
)
def test_add_merges(existing, new, expected):
    r = Ranges(existing)
    r.add(*new)
    assert list(r) == expected
    assert r.total() == sum(b - a for a, b in expected)
    assert len(r) == len(expected)


def test_add_many_in_reverse_then_fill_gaps():
    r = Ranges()
    for i in reversed(range(200)):
        r.add(i * 10, i * 10 + 5)
    assert len(r) == 200
    assert list(r) == [(i * 10, i * 10 + 5) for i in range(200)]
    for i in range(199):
        r.add(i * 10 + 5, i * 10 + 10)
    assert list(r) == [(0, 1995)]


# --- remove ---------------------------------------------------------------------


def test_remove_empty_range_is_noop():
    r = Ranges([(10, 20)])
    r.remove(15, 15)
    assert list(r) == [(10, 20)]


def test_remove_inverted_range_is_an_error():
    r = Ranges([(10, 20)])
    with pytest.raises(NativeError) as ei:
        r.remove(18, 12)
    assert ei.value.errno == 22
    assert list(r) == [(10, 20)]


@pytest.mark.parametrize(
    "existing, hole, expected",
    [
        # nothing to remove
        ([(10, 20)], (0, 10), [(10, 20)]),
        ([(10, 20)], (20, 30), [(10, 20)]),
        ([(10, 20), (30, 40)], (20, 30), [(10, 20), (30, 40)]),
        ([], (0, 100), []),
        # split
        ([(10, 20)], (12, 18), [(10, 12), (18, 20)]),
        ([(0, 10), (10 + 5, 30), (40, 50)], (20, 25), [(0, 10), (15, 20), (25, 30), (40, 50)]),
        # trim either end
        ([(10, 20)], (5, 15), [(15, 20)]),
        ([(10, 20)], (15, 25), [(10, 15)]),
        ([(10, 20)], (10, 15), [(15, 20)]),
        ([(10, 20)], (15, 20), [(10, 15)]),
        # whole
        ([(10, 20)], (10, 20), []),
        ([(10, 20)], (0, 30), []),
        # across several
        ([(0, 10), (20, 30), (40, 50), (60, 70)], (5, 65), [(0, 5), (65, 70)]),
        ([(0, 10), (20, 30), (40, 50), (60, 70)], (10, 60), [(0, 10), (60, 70)]),
        ([(0, 10), (20, 30), (40, 50), (60, 70)], (25, 45), [(0, 10), (20, 25), (45, 50), (60, 70)]),
        ([(0, 10), (20, 30), (40, 50), (60, 70)], (15, 55), [(0, 10), (60, 70)]),
        ([(0, 10), (20, 30), (40, 50), (60, 70)], (0, 70), []),
        ([(0, 10), (20, 30), (40, 50), (60, 70)], (30, 40), [(0, 10), (20, 30), (40, 50), (60, 70)]),
    ],
)
def test_remove(existing, hole, expected):
    r = Ranges(existing)
    r.remove(*hole)
    assert list(r) == expected
    assert r.total() == sum(b - a for a, b in expected)


def test_remove_punching_many_holes_then_refill():
    r = Ranges([(0, 1000)])
    for a in range(1, 1000, 2):
        r.remove(a, a + 1)
    assert len(r) == 500
    assert r.total() == 500
    assert list(r) == [(a, a + 1) for a in range(0, 1000, 2)]
    r.add(0, 1000)
    assert list(r) == [(0, 1000)]


# --- contains, next -------------------------------------------------------------


def test_contains_boundaries():
    r = Ranges([(10, 20), (30, 40)])
    inside = {a for a in range(50) if a in r}
    assert inside == set(range(10, 20)) | set(range(30, 40))
    assert 2**64 - 1 not in r


def test_next():
    r = Ranges([(10, 20), (30, 40)])
    assert r.next(0) == (10, 20)
    assert r.next(10) == (10, 20)
    assert r.next(15) == (15, 20)
    assert r.next(19) == (19, 20)
    assert r.next(20) == (30, 40)
    assert r.next(25) == (30, 40)
    assert r.next(39) == (39, 40)
    assert r.next(40) is None
    assert r.next(2**64 - 1) is None


def test_next_walks_every_range():
    r = pages((0, 3), (5, 6), (100, 200), (4000, 4096))
    seen, addr = [], 0
    while (nxt := r.next(addr)) is not None:
        seen.append(nxt)
        addr = nxt[1]
    assert seen == list(r)


# --- copy -----------------------------------------------------------------------


def test_copy_is_independent():
    r = Ranges([(0, 10), (20, 30)])
    c = r.copy()
    assert list(c) == list(r)
    c.add(10, 20)
    r.remove(0, 5)
    assert list(c) == [(0, 30)]
    assert list(r) == [(5, 10), (20, 30)]


def test_copy_of_empty_and_large():
    assert list(Ranges().copy()) == []
    big = Ranges((i * 3, i * 3 + 1) for i in range(1000))
    c = big.copy()
    assert list(c) == list(big)
    assert len(c) == 1000


# --- move (mremap) --------------------------------------------------------------


def test_move_to_free_space():
    r = pages((0, 2), (4, 6), (10, 12))
    r.move(0, 100 * P, 8 * P)  # [0, 8) -> [100, 108): carries (0,2) and (4,6)
    assert spans(r) == [(10, 12), (100, 102), (104, 106)]


def test_move_clips_ranges_at_the_source_edges():
    r = pages((0, 10), (20, 30))
    r.move(5 * P, 100 * P, 20 * P)  # src [5, 25) holds [5,10) and [20,25)
    assert spans(r) == [(0, 5), (25, 30), (100, 105), (115, 120)]


def test_move_source_without_owed_pages_changes_nothing():
    r = pages((0, 10))
    r.move(20 * P, 40 * P, 5 * P)
    assert spans(r) == [(0, 10)]


def test_move_zero_length_changes_nothing():
    r = pages((0, 10))
    r.move(5 * P, 40 * P, 0)
    assert spans(r) == [(0, 10)]


def test_move_to_same_place_changes_nothing():
    r = pages((0, 10), (12, 14))
    r.move(0, 0, 20 * P)
    assert spans(r) == [(0, 10), (12, 14)]


def test_move_merges_with_neighbours_at_destination():
    r = pages((0, 5), (10, 15))
    r.move(10 * P, 5 * P, 5 * P)  # lands right after (0, 5)
    assert spans(r) == [(0, 10)]
    r = pages((0, 5), (50, 55))
    r.move(0, 55 * P, 5 * P)  # lands right after (50, 55)
    assert spans(r) == [(50, 60)]


def test_move_overlapping_forward():
    # src [0, 10) -> dst [4, 14): owed [0,2) and [6,8) become [4,6) and [10,12)
    r = pages((0, 2), (6, 8), (20, 30))
    r.move(0, 4 * P, 10 * P)
    assert spans(r) == [(4, 6), (10, 12), (20, 30)]


def test_move_overlapping_backward():
    # src [4, 14) -> dst [0, 10): owed [4,6) and [10,12) become [0,2) and [6,8)
    r = pages((4, 6), (10, 12), (20, 30))
    r.move(4 * P, 0, 10 * P)
    assert spans(r) == [(0, 2), (6, 8), (20, 30)]


def test_move_overlapping_whole_range_shifts_by_one_page():
    r = pages((0, 100))
    r.move(0, P, 100 * P)
    assert spans(r) == [(1, 101)]
    r.move(P, 0, 100 * P)
    assert spans(r) == [(0, 100)]


def test_move_many_fragments():
    r = Ranges((i * 2 * P, (i * 2 + 1) * P) for i in range(300))  # every other page of [0, 600)
    r.move(100 * P, 10000 * P, 200 * P)  # pages 100..299
    expect = {i * 2 for i in range(300) if not 100 <= i * 2 < 300}
    expect |= {p - 100 + 10000 for p in range(100, 300, 2)}
    assert set_of(r) == expect
    assert len(r) == 300


def test_move_replaces_destination_like_mremap():
    r = pages((20, 30))
    r.move(0, 20 * P, 10 * P)  # nothing owed at src: the old dst mapping is gone
    assert spans(r) == []


# --- model-based randomized test -------------------------------------------------

NPAGES = 4096


def set_of(r):
    out = set()
    for a, b in r:
        assert a % P == 0 and b % P == 0
        out.update(range(a // P, b // P))
    return out


def intervals_of(model):
    out = []
    for p in sorted(model):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [(a * P, b * P) for a, b in out]


def check_full(r, model):
    got = list(r)
    assert got == intervals_of(model)
    # the invariant: sorted, disjoint, non-adjacent, non-empty
    for (a, b), (c, d) in zip(got, got[1:], strict=False):
        assert a < b < c < d
    assert len(r) == len(got)


def test_random_against_set_model():
    rng = random.Random(0x5EED)
    r, model = Ranges(), set()
    copies = []

    def span():
        a = rng.randrange(NPAGES + 1)
        if rng.random() < 0.7:
            b = min(NPAGES, a + rng.randrange(1, 64))
        else:
            b = rng.randrange(a, NPAGES + 1)
        return a, b

    for step in range(4000):
        op = rng.random()
        if op < 0.35:
            a, b = span()
            r.add(a * P, b * P)
            model.update(range(a, b))
        elif op < 0.65:
            a, b = span()
            r.remove(a * P, b * P)
            model.difference_update(range(a, b))
        elif op < 0.85:
            n = rng.randrange(0, 200)
            src = rng.randrange(0, NPAGES - n + 1)
            dst = (
                rng.randrange(0, NPAGES - n + 1)
                if rng.random() < 0.5
                else max(0, min(NPAGES - n, src + rng.randrange(-n - 2, n + 3)))
            )
            # As the kernel reports the UNMAP of the destination first,
            # clear whatever of it lies outside the source.
            for a, b in ((dst, min(dst + n, src)), (max(dst, src + n), dst + n)):
                if a < b:
                    r.remove(a * P, b * P)
                    model.difference_update(range(a, b))
            r.move(src * P, dst * P, n * P)
            moved = {p - src + dst for p in model if src <= p < src + n}
            model.difference_update(range(src, src + n))
            model |= moved
        elif op < 0.87:
            copies.append((r.copy(), set(model)))
        else:
            # queries only
            pass
        # cheap checks every step
        assert r.total() == len(model) * P
        for _ in range(3):
            p = rng.randrange(NPAGES + 1)
            addr = p * P + rng.choice((0, 1, P - 1))
            assert (addr in r) == (p in model)
            nxt = r.next(addr)
            following = [q for q in range(p, min(NPAGES, p + 300)) if q in model]
            if following:
                start = following[0]
                end = start
                while end in model:
                    end += 1
                assert nxt == (max(addr, start * P), end * P)
            elif max(model, default=-1) < p:
                assert nxt is None
        if step % 16 == 0:
            check_full(r, model)
    check_full(r, model)
    # earlier copies were not disturbed by later operations on the original
    for c, snap in copies:
        check_full(c, snap)
