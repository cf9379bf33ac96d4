"""The RAM page store (hybridmig.bindings.pagestore.PageStore, native/src/pagestore.c)."""

import errno
import os
import random
import threading
import time

import pytest

from hybridmig.bindings.pagestore import ABSENT, DATA, ZERO, PageStore
from hybridmig.errors import StoreError

P = 4096
CHUNK = 2 << 20
CHUNK_PAGES = CHUNK // P
BASE = 0x7F00_0000_0000  # chunk aligned, like a real mmap area
ZEROPAGE = bytes(P)


def page(tag, i=0):
    """A page whose bytes say which (tag, i) it is, different at every offset."""
    head = b"%d:%d:" % (tag, i)
    body = (head * (P // len(head) + 1))[:P]
    return body


def pages(tag, first, n):
    return b"".join(page(tag, first + i) for i in range(n))


def assert_data(s, key, vaddr, expect):
    for i in range(len(expect) // P):
        kind, got = s.get(key, vaddr + i * P)
        assert kind == DATA, "page %d at 0x%x is %d" % (i, vaddr + i * P, kind)
        assert got == expect[i * P : (i + 1) * P], "page %d at 0x%x differs" % (i, vaddr + i * P)


def kind_of(s, key, vaddr):
    return s.get(key, vaddr)[0]


@pytest.fixture
def s():
    return PageStore()


# --- put / get ------------------------------------------------------------------


def test_empty_store(s):
    assert s.get(1, BASE) == (ABSENT, None)
    assert s.count(1, BASE, 1000) == (0, 0)
    assert s.stats() == {"tasks": 0, "chunks": 0, "pages_data": 0, "pages_zero": 0, "bytes_mapped": 0}


def test_put_get_single_page(s):
    s.put(1, BASE, page(1))
    assert s.get(1, BASE) == (DATA, page(1))
    assert s.get(1, BASE + P) == (ABSENT, None)
    assert s.get(1, BASE - P) == (ABSENT, None)
    assert s.count(1, BASE, 1) == (1, 0)


@pytest.mark.parametrize(
    "offset_pages, npages",
    [
        (0, 1),
        (0, CHUNK_PAGES),  # exactly one chunk
        (CHUNK_PAGES - 1, 2),  # straddles one boundary
        (CHUNK_PAGES - 3, CHUNK_PAGES + 7),  # straddles two boundaries
        (5, 3 * CHUNK_PAGES + 11),  # several whole chunks inside
        (17, 333),  # odd size inside one chunk
        (CHUNK_PAGES - 1, 1),  # last page of a chunk
    ],
)
def test_put_get_roundtrip_across_chunks(s, offset_pages, npages):
    vaddr = BASE + offset_pages * P
    data = pages(7, 0, npages)
    s.put(3, vaddr, data)
    assert_data(s, 3, vaddr, data)
    assert kind_of(s, 3, vaddr - P) == ABSENT
    assert kind_of(s, 3, vaddr + npages * P) == ABSENT
    assert s.count(3, vaddr - 10 * P, npages + 20) == (npages, 0)
    st = s.stats()
    first_chunk = vaddr // CHUNK
    last_chunk = (vaddr + npages * P - 1) // CHUNK
    assert st["chunks"] == last_chunk - first_chunk + 1
    assert st["pages_data"] == npages
    assert st["bytes_mapped"] == st["chunks"] * CHUNK


def test_put_accepts_any_buffer(s):
    s.put(1, BASE, bytearray(page(1)))
    s.put(1, BASE + P, memoryview(page(2)))
    s.put(1, BASE + 2 * P, pages(3, 0, 2)[P:])  # a slice
    assert s.get(1, BASE)[1] == page(1)
    assert s.get(1, BASE + P)[1] == page(2)
    assert s.get(1, BASE + 2 * P)[1] == page(3, 1)


def test_put_empty_buffer_is_noop(s):
    s.put(1, BASE, b"")
    assert s.get(1, BASE) == (ABSENT, None)
    assert s.stats()["pages_data"] == 0


def test_put_copies_the_buffer(s):
    buf = bytearray(page(1))
    s.put(1, BASE, buf)
    buf[:] = page(2)
    assert s.get(1, BASE)[1] == page(1)


def test_get_returns_a_copy(s):
    s.put(1, BASE, page(1))
    got = s.get(1, BASE)[1]
    assert isinstance(got, bytes)
    s.put(1, BASE, page(2))
    assert got == page(1)


def test_later_put_overrides(s):
    s.put(1, BASE, pages(1, 0, CHUNK_PAGES + 10))
    s.put(1, BASE + (CHUNK_PAGES - 5) * P, pages(2, 0, 10))
    expect = pages(1, 0, CHUNK_PAGES - 5) + pages(2, 0, 10) + pages(1, CHUNK_PAGES + 5, 5)
    assert_data(s, 1, BASE, expect)
    assert s.stats()["pages_data"] == CHUNK_PAGES + 10


def test_put_zero_then_put_and_back(s):
    s.put_zero(1, BASE, 4)
    assert s.get(1, BASE) == (ZERO, None)
    assert s.count(1, BASE, 4) == (0, 4)
    assert s.stats()["bytes_mapped"] == 0  # zero pages need no buffer
    s.put(1, BASE + P, page(1))
    assert s.get(1, BASE + P) == (DATA, page(1))
    assert s.count(1, BASE, 4) == (1, 3)
    s.put_zero(1, BASE + P, 1)
    assert s.get(1, BASE + P) == (ZERO, None)
    assert s.count(1, BASE, 4) == (0, 4)
    # The chunk holds no data any more: its buffer is gone.
    assert s.stats()["bytes_mapped"] == 0
    s.put(1, BASE + P, page(2))
    assert s.get(1, BASE + P) == (DATA, page(2))


def test_put_zero_over_data_across_chunks(s):
    n = 2 * CHUNK_PAGES
    s.put(1, BASE, pages(1, 0, n))
    s.put_zero(1, BASE + (CHUNK_PAGES - 2) * P, 4)
    for i in range(n):
        want = ZERO if CHUNK_PAGES - 2 <= i < CHUNK_PAGES + 2 else DATA
        assert kind_of(s, 1, BASE + i * P) == want
    assert s.count(1, BASE, n) == (n - 4, 4)
    st = s.stats()
    assert (st["pages_data"], st["pages_zero"]) == (n - 4, 4)


def test_data_page_that_is_all_zeros_stays_data(s):
    s.put(1, BASE, ZEROPAGE)
    assert s.get(1, BASE) == (DATA, ZEROPAGE)


def test_pages_never_written_in_a_mapped_chunk_are_absent(s):
    s.put(1, BASE + 10 * P, page(1))
    for i in (0, 9, 11, CHUNK_PAGES - 1):
        assert s.get(1, BASE + i * P) == (ABSENT, None)


# --- argument checking ------------------------------------------------------------


def test_unaligned_and_bad_arguments(s):
    with pytest.raises(ValueError):
        s.put(1, BASE, b"x" * (P + 1))
    with pytest.raises(ValueError):
        s.put(1, BASE, b"x" * 100)
    with pytest.raises(ValueError):
        s.put(1, BASE + 1, page(1))
    with pytest.raises(ValueError):
        s.put_zero(1, BASE + 8, 1)
    with pytest.raises(ValueError):
        s.put_zero(1, BASE, -1)
    with pytest.raises(ValueError):
        s.get(1, BASE + 100)
    with pytest.raises(ValueError):
        s.invalidate(1, BASE + 1, 1)
    with pytest.raises(ValueError):
        s.count(1, BASE + 1, 1)
    with pytest.raises(ValueError):
        s.move(1, BASE + 1, BASE, 1)
    with pytest.raises(ValueError):
        s.move(1, BASE, BASE + 1, 1)
    with pytest.raises(ValueError):
        s.get(1, -P)
    assert s.stats()["tasks"] == 0


def test_range_past_the_top_of_the_address_space_is_refused(s):
    high = 2**64 - 2 * P
    with pytest.raises(StoreError) as ei:
        s.put_zero(1, high, 2)  # would end at 2**64
    assert ei.value.errno == errno.ERANGE
    with pytest.raises(StoreError):
        s.count(1, high, 2**60)
    assert s.stats()["tasks"] == 0
    s.put(1, high, page(1))
    assert s.get(1, high) == (DATA, page(1))


# --- invalidate, memory ------------------------------------------------------------


def test_invalidate_makes_pages_absent_and_returns_memory(s):
    n = CHUNK_PAGES + 20
    s.put(1, BASE, pages(1, 0, n))
    assert s.stats()["bytes_mapped"] == 2 * CHUNK
    s.invalidate(1, BASE + 5 * P, 3)
    for i in range(4, 9):
        assert kind_of(s, 1, BASE + i * P) == (ABSENT if 5 <= i < 8 else DATA)
    assert s.count(1, BASE, n) == (n - 3, 0)
    assert s.stats()["bytes_mapped"] == 2 * CHUNK
    # empty the second chunk
    s.invalidate(1, BASE + CHUNK, 20)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"]) == (1, CHUNK)
    # empty the first chunk too
    s.invalidate(1, BASE, CHUNK_PAGES)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"], st["pages_data"], st["pages_zero"]) == (0, 0, 0, 0)
    assert st["tasks"] == 1
    assert s.get(1, BASE) == (ABSENT, None)
    # and it can be filled again
    s.put(1, BASE + 6 * P, page(9))
    assert s.get(1, BASE + 6 * P) == (DATA, page(9))
    assert s.get(1, BASE + 5 * P) == (ABSENT, None)


def test_forget_makes_scattered_runs_absent_keeping_the_memory(s):
    """Post-copy's STALE: many runs in one call, data and zero pages alike;
    the chunk keeps its memory until it holds no page, and a page put again
    reads back new."""
    n = CHUNK_PAGES + 20
    s.put(1, BASE, pages(1, 0, n))
    s.put_zero(1, BASE + 10 * P, 2)
    s.forget(1, [(BASE + 1 * P, 1), (BASE + 10 * P, 3), (BASE + CHUNK_PAGES * P, 20)])
    for i in range(14):
        assert kind_of(s, 1, BASE + i * P) == (ABSENT if i in (1, 10, 11, 12) else DATA), i
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"]) == (1, CHUNK)  # the second chunk emptied: gone
    assert s.count(1, BASE, n) == (CHUNK_PAGES - 4, 0)
    s.put(1, BASE + 11 * P, page(7))
    assert s.get(1, BASE + 11 * P) == (DATA, page(7))
    with pytest.raises(StoreError):
        s.forget(1, [(BASE + 1, 1)])  # not page-aligned


def test_invalidate_after_partial_invalidate_then_put_gives_new_contents(s):
    s.put(1, BASE, pages(1, 0, 8))
    s.invalidate(1, BASE + 2 * P, 2)  # MADV_DONTNEED of part of a live buffer
    s.put(1, BASE + 3 * P, page(5))
    assert s.get(1, BASE + 2 * P) == (ABSENT, None)
    assert s.get(1, BASE + 3 * P) == (DATA, page(5))
    assert_data(s, 1, BASE + 4 * P, pages(1, 4, 4))


def test_invalidate_zero_pages(s):
    s.put_zero(1, BASE, 10)
    s.put(1, BASE + 10 * P, page(1))
    s.invalidate(1, BASE, 5)
    assert s.count(1, BASE, 11) == (1, 5)
    s.invalidate(1, BASE, 11)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"], st["pages_zero"]) == (0, 0, 0)


def test_chunk_with_only_zero_pages_left_drops_its_buffer(s):
    s.put_zero(1, BASE, 10)
    s.put(1, BASE + 10 * P, pages(1, 0, 3))
    assert s.stats()["bytes_mapped"] == CHUNK
    s.invalidate(1, BASE + 10 * P, 3)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"], st["pages_zero"]) == (1, 0, 10)


def test_invalidate_unknown_task_or_range_is_harmless(s):
    s.invalidate(99, BASE, 100)
    s.put(1, BASE, page(1))
    s.invalidate(1, BASE + 10 * CHUNK, 100)
    s.invalidate(1, BASE, 0)
    assert s.get(1, BASE) == (DATA, page(1))
    assert s.stats()["tasks"] == 1  # invalidate creates no task


def test_count_partial_ranges(s):
    s.put(1, BASE, pages(1, 0, 10))
    s.put_zero(1, BASE + CHUNK - 5 * P, 10)
    assert s.count(1, BASE, 0) == (0, 0)
    assert s.count(1, BASE + 3 * P, 4) == (4, 0)
    assert s.count(1, BASE + 8 * P, CHUNK_PAGES) == (2, 10)
    assert s.count(1, BASE + 8 * P, CHUNK_PAGES - 8) == (2, 5)
    assert s.count(1, BASE + CHUNK, 100) == (0, 5)
    assert s.count(1, BASE, 2 * CHUNK_PAGES) == (10, 10)
    assert s.count(2, BASE, 2 * CHUNK_PAGES) == (0, 0)


# --- tasks -------------------------------------------------------------------------


def test_tasks_are_independent(s):
    s.put(1, BASE, page(1))
    s.put(2, BASE, page(2))
    s.put_zero(3, BASE, 1)
    assert s.get(1, BASE) == (DATA, page(1))
    assert s.get(2, BASE) == (DATA, page(2))
    assert s.get(3, BASE) == (ZERO, None)
    assert s.get(4, BASE) == (ABSENT, None)
    s.invalidate(1, BASE, 1)
    assert s.get(1, BASE) == (ABSENT, None)
    assert s.get(2, BASE) == (DATA, page(2))
    assert s.stats()["tasks"] == 3


def test_keys_are_full_64_bit(s):
    s.put(0, BASE, page(0))
    s.put(2**64 - 1, BASE, page(1))
    s.put(2**32, BASE, page(2))
    assert s.get(0, BASE)[1] == page(0)
    assert s.get(2**64 - 1, BASE)[1] == page(1)
    assert s.get(2**32, BASE)[1] == page(2)
    assert s.get(2**32 + 0, BASE + P)[0] == ABSENT


def test_clone_task_gives_independent_copy(s):
    n = CHUNK_PAGES + 4
    s.put(1, BASE, pages(1, 0, n))
    s.put_zero(1, BASE + 3 * CHUNK, 3)
    s.clone_task(1, 2)
    assert_data(s, 2, BASE, pages(1, 0, n))
    assert s.get(2, BASE + 3 * CHUNK) == (ZERO, None)
    assert s.count(2, BASE, 4 * CHUNK_PAGES) == (n, 3)
    # changing either leaves the other alone
    s.put(2, BASE, page(2))
    s.invalidate(1, BASE + P, 1)
    s.put_zero(2, BASE + 2 * P, 1)
    assert s.get(1, BASE) == (DATA, page(1, 0))
    assert s.get(2, BASE + P) == (DATA, page(1, 1))
    assert s.get(1, BASE + 2 * P) == (DATA, page(1, 2))
    s.drop_task(1)
    assert s.get(1, BASE) == (ABSENT, None)
    assert s.get(2, BASE) == (DATA, page(2))
    assert_data(s, 2, BASE + 3 * P, pages(1, 3, n - 3))


def test_clone_task_replaces_destination(s):
    s.put(1, BASE, page(1))
    s.put(2, BASE + P, page(2))
    s.put(2, BASE + 5 * CHUNK, page(2))
    s.clone_task(1, 2)
    assert s.get(2, BASE) == (DATA, page(1))
    assert s.get(2, BASE + P) == (ABSENT, None)
    assert s.get(2, BASE + 5 * CHUNK) == (ABSENT, None)
    assert s.stats()["chunks"] == 2


def test_clone_task_of_unknown_task_creates_an_empty_one(s):
    s.clone_task(5, 6)
    assert s.stats()["tasks"] == 1
    assert s.get(6, BASE) == (ABSENT, None)
    s.drop_task(6)


def test_clone_task_onto_itself_is_refused(s):
    s.put(1, BASE, page(1))
    with pytest.raises(StoreError) as ei:
        s.clone_task(1, 1)
    assert ei.value.errno == errno.EINVAL
    assert s.get(1, BASE) == (DATA, page(1))


def test_drop_task(s):
    s.put(1, BASE, pages(1, 0, CHUNK_PAGES + 1))
    s.put_zero(1, BASE + 4 * CHUNK, 2)
    s.put(2, BASE, page(2))
    s.drop_task(1)
    st = s.stats()
    assert st == {"tasks": 1, "chunks": 1, "pages_data": 1, "pages_zero": 0, "bytes_mapped": CHUNK}
    assert s.get(1, BASE) == (ABSENT, None)
    assert s.get(2, BASE) == (DATA, page(2))
    with pytest.raises(StoreError) as ei:
        s.drop_task(1)
    assert ei.value.errno == errno.ENOENT
    assert isinstance(ei.value, OSError)
    # a dropped key can be used again
    s.put(1, BASE, page(3))
    assert s.get(1, BASE) == (DATA, page(3))


# --- move (mremap) -------------------------------------------------------------------


def model_of(s, key, vaddr, npages):
    out = {}
    for i in range(npages):
        kind, data = s.get(key, vaddr + i * P)
        if kind != ABSENT:
            out[vaddr + i * P] = (kind, data)
    return out


def model_move(model, src, dst, n):
    snap = {a: model.pop(a) for a in list(model) if src <= a < src + n * P}
    for i in range(n):
        model.pop(dst + i * P, None)
        if src + i * P in snap:
            model[dst + i * P] = snap[src + i * P]


@pytest.mark.parametrize(
    "src_pages, dst_pages, n",
    [
        (0, 3 * CHUNK_PAGES, 20),  # disjoint, forward, other chunk
        (3 * CHUNK_PAGES, 0, 20),  # disjoint, backward
        (CHUNK_PAGES - 10, 5 * CHUNK_PAGES + 7, 20),  # crossing boundaries at both ends
        (0, 5, 40),  # overlapping forward, same chunk
        (5, 0, 40),  # overlapping backward, same chunk
        (CHUNK_PAGES - 30, CHUNK_PAGES - 10, 60),  # overlapping forward across a boundary
        (CHUNK_PAGES - 10, CHUNK_PAGES - 30, 60),  # overlapping backward across a boundary
        (0, 1, CHUNK_PAGES + 3),  # shift by one page, longer than a chunk
        (1, 0, CHUNK_PAGES + 3),
        (10, 10, 30),  # onto itself
    ],
)
def test_move_carries_contents(s, src_pages, dst_pages, n):
    # a mix of data, zero and absent pages in and around the source
    span = 6 * CHUNK_PAGES
    rng = random.Random(src_pages * 1000 + dst_pages)
    for i in range(0, max(src_pages, dst_pages) + n + 5):
        r = rng.random()
        if r < 0.5:
            s.put(1, BASE + i * P, page(1, i))
        elif r < 0.7:
            s.put_zero(1, BASE + i * P, 1)
    before = model_of(s, 1, BASE, span)
    s.move(1, BASE + src_pages * P, BASE + dst_pages * P, n)
    model_move(before, BASE + src_pages * P, BASE + dst_pages * P, n)
    assert model_of(s, 1, BASE, span) == before
    st = s.stats()
    assert st["pages_data"] == sum(1 for k, _ in before.values() if k == DATA)
    assert st["pages_zero"] == sum(1 for k, _ in before.values() if k == ZERO)


def test_move_whole_chunks_returns_source_memory(s):
    s.put(1, BASE, pages(1, 0, 2 * CHUNK_PAGES))
    s.move(1, BASE, BASE + 10 * CHUNK, 2 * CHUNK_PAGES)
    assert_data(s, 1, BASE + 10 * CHUNK, pages(1, 0, 2 * CHUNK_PAGES))
    assert s.count(1, BASE, 2 * CHUNK_PAGES) == (0, 0)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"]) == (2, 2 * CHUNK)


def test_move_of_absent_source_clears_destination(s):
    s.put(1, BASE + CHUNK, pages(2, 0, 4))
    s.move(1, BASE, BASE + CHUNK, 4)
    assert s.count(1, BASE, 2 * CHUNK_PAGES) == (0, 0)
    assert s.stats()["bytes_mapped"] == 0


def test_move_of_unknown_task_is_harmless(s):
    s.move(9, BASE, BASE + CHUNK, 10)
    assert s.stats()["tasks"] == 0


def test_move_only_touches_its_task(s):
    s.put(1, BASE, page(1))
    s.put(2, BASE, page(2))
    s.move(1, BASE, BASE + P, 1)
    assert s.get(2, BASE) == (DATA, page(2))
    assert s.get(2, BASE + P) == (ABSENT, None)
    assert s.get(1, BASE + P) == (DATA, page(1))


def test_random_operations_against_model(s):
    rng = random.Random(1234)
    span = 3 * CHUNK_PAGES
    model = {}
    clones = []
    for step in range(400):
        op = rng.random()
        first = rng.randrange(span)
        n = rng.randrange(1, min(40, span - first) + 1)
        addr = BASE + first * P
        if op < 0.35:
            tag = step
            s.put(1, addr, pages(tag, first, n))
            for i in range(n):
                model[addr + i * P] = (DATA, page(tag, first + i))
        elif op < 0.5:
            s.put_zero(1, addr, n)
            for i in range(n):
                model[addr + i * P] = (ZERO, None)
        elif op < 0.65:
            s.invalidate(1, addr, n)
            for i in range(n):
                model.pop(addr + i * P, None)
        elif op < 0.95:
            dst_first = rng.randrange(span - n + 1)
            s.move(1, addr, BASE + dst_first * P, n)
            model_move(model, addr, BASE + dst_first * P, n)
        else:
            key = 100 + len(clones)
            s.clone_task(1, key)
            clones.append((key, dict(model)))
        st = s.stats()
        assert st["pages_data"] == sum(1 for k, _ in model.values() if k == DATA) + sum(
            1 for _, m in clones for k, _ in m.values() if k == DATA
        )
        for _ in range(4):
            a = BASE + rng.randrange(span) * P
            assert s.get(1, a) == model.get(a, (ABSENT, None))
        if step % 50 == 49:
            assert model_of(s, 1, BASE, span) == model
    assert model_of(s, 1, BASE, span) == model
    for key, snap in clones:
        assert model_of(s, key, BASE, span) == snap
    # emptying everything returns all memory
    s.invalidate(1, BASE, span)
    for key, _ in clones:
        s.drop_task(key)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"], st["pages_data"], st["pages_zero"]) == (0, 0, 0, 0)


# --- load_file -----------------------------------------------------------------------


@pytest.fixture
def image(tmp_path):
    """A file of 3 chunks + 5 pages, page i holding page(50, i)."""
    path = tmp_path / "pages.img"
    n = 3 * CHUNK_PAGES + 5
    path.write_bytes(pages(50, 0, n))
    fd = os.open(path, os.O_RDONLY)
    yield path, fd, n
    os.close(fd)


def test_load_file_maps_pages_at_offsets(s, image):
    path, fd, n = image
    contents = path.read_bytes()
    # whole file, unaligned to chunks on the store side
    vaddr = BASE + (CHUNK_PAGES - 7) * P
    s.load_file(1, vaddr, n, fd, 0)
    assert_data(s, 1, vaddr, contents)
    assert s.count(1, vaddr, n) == (n, 0)
    # part of the file from an offset, to a place across one chunk boundary
    off = (CHUNK_PAGES + 3) * P
    vaddr2 = BASE + 20 * CHUNK - 4 * P
    s.load_file(2, vaddr2, 10, fd, off)
    assert_data(s, 2, vaddr2, contents[off : off + 10 * P])
    assert kind_of(s, 2, vaddr2 - P) == ABSENT
    assert kind_of(s, 2, vaddr2 + 10 * P) == ABSENT
    # reading the last pages exactly to the end of the file
    s.load_file(3, BASE, 5, fd, (n - 5) * P)
    assert_data(s, 3, BASE, contents[-5 * P :])


def test_load_file_survives_closing_the_fd(s, tmp_path):
    path = tmp_path / "f.img"
    path.write_bytes(pages(3, 0, 4))
    fd = os.open(path, os.O_RDONLY)
    s.load_file(1, BASE, 4, fd, 0)
    os.close(fd)
    assert_data(s, 1, BASE, pages(3, 0, 4))


def test_load_file_overrides_and_is_overridden(s, image):
    path, fd, n = image
    s.put(1, BASE, pages(1, 0, 8))
    s.put_zero(1, BASE + 8 * P, 2)
    s.load_file(1, BASE + 2 * P, 7, fd, P)  # pages 2..8 from file pages 1..7
    expect = pages(1, 0, 2) + pages(50, 1, 7)
    assert_data(s, 1, BASE, expect)
    assert s.get(1, BASE + 9 * P) == (ZERO, None)
    # a later put copies on write and leaves the file alone
    s.put(1, BASE + 3 * P, page(9))
    assert s.get(1, BASE + 3 * P) == (DATA, page(9))
    assert path.read_bytes() == pages(50, 0, n)
    s.put_zero(1, BASE + 4 * P, 1)
    assert s.get(1, BASE + 4 * P) == (ZERO, None)


def test_loaded_pages_move_clone_and_invalidate(s, image):
    path, fd, n = image
    vaddr = BASE + (CHUNK_PAGES - 2) * P
    s.load_file(1, vaddr, 6, fd, 10 * P)
    s.clone_task(1, 2)
    s.move(1, vaddr, BASE + 7 * CHUNK, 6)
    assert_data(s, 1, BASE + 7 * CHUNK, pages(50, 10, 6))
    assert_data(s, 2, vaddr, pages(50, 10, 6))
    assert s.count(1, vaddr, 6) == (0, 0)
    s.invalidate(1, BASE + 7 * CHUNK, 6)
    s.drop_task(2)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"]) == (0, 0)
    assert path.read_bytes() == pages(50, 0, n)


def test_populate_keeps_contents(s, image):
    path, fd, n = image
    s.load_file(1, BASE, n, fd, 0)
    s.put(1, BASE + P, page(7))
    s.populate(1)
    s.populate(99)  # an unknown task: nothing to do
    assert_data(s, 1, BASE, page(50, 0) + page(7) + pages(50, 2, n - 2))
    assert path.read_bytes() == pages(50, 0, n)


def test_load_file_invalidate_returns_memory(s, image):
    path, fd, n = image
    s.load_file(1, BASE, n, fd, 0)
    assert s.stats()["bytes_mapped"] == 4 * CHUNK
    s.invalidate(1, BASE + 3 * CHUNK, 5)
    assert s.stats()["bytes_mapped"] == 3 * CHUNK
    s.invalidate(1, BASE, n)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"], st["pages_data"]) == (0, 0, 0)
    # the addresses are reusable for ordinary data afterwards
    s.put(1, BASE, pages(4, 0, 3))
    assert_data(s, 1, BASE, pages(4, 0, 3))


def test_load_file_too_short_is_an_error(s, tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(pages(1, 0, 3))
    fd = os.open(path, os.O_RDONLY)
    try:
        for npages, off in ((4, 0), (3, P), (1, 3 * P), (1, 10 * P)):
            with pytest.raises(StoreError) as ei:
                s.load_file(1, BASE, npages, fd, off)
            assert isinstance(ei.value, OSError)
            assert ei.value.errno == errno.ENODATA
        assert s.get(1, BASE) == (ABSENT, None)
        assert s.stats()["pages_data"] == 0
        s.load_file(1, BASE, 3, fd, 0)  # exactly fits
        s.load_file(1, BASE, 0, fd, 3 * P)  # nothing, at the end
        assert_data(s, 1, BASE, pages(1, 0, 3))
    finally:
        os.close(fd)


def test_load_file_partial_last_page_is_an_error(s, tmp_path):
    path = tmp_path / "ragged.img"
    path.write_bytes(pages(1, 0, 3) + b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(StoreError):
            s.load_file(1, BASE, 4, fd, 0)
        s.load_file(1, BASE, 3, fd, 0)
        assert_data(s, 1, BASE, pages(1, 0, 3))
    finally:
        os.close(fd)


def test_load_file_bad_arguments(s, image):
    path, fd, n = image
    with pytest.raises(ValueError):
        s.load_file(1, BASE, 1, fd, 100)
    with pytest.raises(ValueError):
        s.load_file(1, BASE + 1, 1, fd, 0)
    with pytest.raises(ValueError):
        s.load_file(1, BASE, -1, fd, 0)
    assert s.stats()["tasks"] == 0


def test_load_file_bad_descriptors(s, tmp_path):
    with pytest.raises(StoreError) as ei:
        s.load_file(1, BASE, 1, 987654, 0)
    assert ei.value.errno == errno.EBADF
    r, w = os.pipe()
    try:
        os.write(w, b"x" * P)
        with pytest.raises(StoreError):
            s.load_file(1, BASE, 1, r, 0)
    finally:
        os.close(r)
        os.close(w)
    path = tmp_path / "wo.img"
    path.write_bytes(pages(1, 0, 2))
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(StoreError) as ei:
            s.load_file(1, BASE, 2, fd, 0)
        assert ei.value.errno == errno.EACCES
    finally:
        os.close(fd)
    assert s.get(1, BASE) == (ABSENT, None)
    assert s.stats()["pages_data"] == 0


def test_failed_load_leaves_no_chunk_behind(s, tmp_path):
    path = tmp_path / "wo.img"
    path.write_bytes(pages(1, 0, 2))
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(StoreError):
            s.load_file(1, BASE, 2, fd, 0)
    finally:
        os.close(fd)
    st = s.stats()
    assert (st["chunks"], st["bytes_mapped"]) == (0, 0)


# --- concurrency -----------------------------------------------------------------------

REGION_PAGES = 256  # 1 MiB, across a chunk boundary
PASSES = 64  # 64 x 1 MiB = 64 MiB put in total, in about 4000 batches
MAX_BATCH = 32


@pytest.mark.timeout(60)
def test_concurrent_put_and_get_never_tears_a_page():
    s = PageStore()
    vaddr = BASE + CHUNK - REGION_PAGES // 2 * P
    errors = []
    done = threading.Event()
    # Made up front, so that the writer spends its time in native code
    # (without the GIL), concurrently with the reader.
    versions = [None] + [memoryview(bytes([v]) * (MAX_BATCH * P)) for v in range(1, PASSES + 1)]

    def writer():
        try:
            rng = random.Random(7)
            for version in range(1, PASSES + 1):
                i = 0
                while i < REGION_PAGES:
                    n = min(REGION_PAGES - i, rng.randrange(1, MAX_BATCH + 1))
                    s.put(1, vaddr + i * P, versions[version][: n * P])
                    i += n
                time.sleep(0)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer, daemon=True)
    deadline = time.monotonic() + 30
    last_seen = [0] * REGION_PAGES
    gets = datas = 0
    rng = random.Random(8)
    t.start()
    while not done.is_set():
        assert time.monotonic() < deadline, "writer did not finish: deadlock?"
        i = rng.randrange(REGION_PAGES)
        kind, data = s.get(1, vaddr + i * P)
        gets += 1
        if kind == DATA:
            datas += 1
            v = data[0]
            assert data == bytes([v]) * P, "torn page %d: %r" % (i, sorted(set(data)))
            assert 1 <= v <= PASSES
            assert v >= last_seen[i], "page %d went back from version %d to %d" % (i, last_seen[i], v)
            last_seen[i] = v
        else:
            assert kind == ABSENT and last_seen[i] == 0
        if gets % 64 == 0:
            st = s.stats()
            assert st["pages_data"] <= REGION_PAGES
            d, z = s.count(1, vaddr, REGION_PAGES)
            assert z == 0 and d <= REGION_PAGES
    t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not t.is_alive(), "writer thread hung"
    assert not errors, errors
    assert gets > 100 and datas > 0
    for i in range(REGION_PAGES):
        assert s.get(1, vaddr + i * P) == (DATA, bytes([PASSES]) * P)
    assert s.stats()["pages_data"] == REGION_PAGES


@pytest.mark.timeout(60)
def test_concurrent_tasks_and_invalidate_do_not_deadlock():
    """A writer filling and emptying task 1 while the reader clones, moves, counts and reads."""
    s = PageStore()
    stop = threading.Event()
    errors = []

    def writer():
        try:
            n = 0
            while not stop.is_set():
                v = n % 250 + 1
                s.put(1, BASE, bytes([v]) * (CHUNK + 8 * P))
                s.put_zero(1, BASE + CHUNK + 8 * P, 8)
                s.invalidate(1, BASE, CHUNK_PAGES + 16)
                n += 1
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            s.clone_task(1, 2)
            kind, data = s.get(2, BASE + CHUNK)
            if kind == DATA:
                assert data == bytes([data[0]]) * P
            s.move(2, BASE, BASE + 3 * CHUNK, CHUNK_PAGES + 16)
            s.count(1, BASE, 2 * CHUNK_PAGES)
            s.stats()
            kind, data = s.get(1, BASE + 5 * P)
            if kind == DATA:
                assert data == bytes([data[0]]) * P
            s.drop_task(2)
    finally:
        stop.set()
        t.join(timeout=20)
    assert not t.is_alive(), "writer thread hung"
    assert not errors, errors
