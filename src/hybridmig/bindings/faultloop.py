"""The native userfaultfd fault loop (native/api/faultloop.h)."""

import os
import struct
from collections.abc import Iterable

from ..errors import UffdError
from ._ffi import check, check_range, ffi, lib
from .pagestore import PageStore

_MISS = struct.Struct("=QQQqQ")
#: the fields of struct hm_loop_stats, in its order (the header is the one definition)
_STATS = tuple(name for name, _ in ffi.typeof("struct hm_loop_stats").fields)
#: what a fatal error names (stats "error_op"), HM_LOOP_OP_*
OPERATIONS = {
    lib.HM_LOOP_OP_NONE: "the fault loop",
    lib.HM_LOOP_OP_COPY: "UFFDIO_COPY",
    lib.HM_LOOP_OP_ZEROPAGE: "UFFDIO_ZEROPAGE",
    lib.HM_LOOP_OP_READ: "reading the uffd",
    lib.HM_LOOP_OP_EPOLL: "epoll_wait",
    lib.HM_LOOP_OP_FAULT: "serving a page fault",
    lib.HM_LOOP_OP_FORK: "a FORK event",
    lib.HM_LOOP_OP_REMAP: "a REMAP event",
    lib.HM_LOOP_OP_REMOVE: "a REMOVE/UNMAP event",
    lib.HM_LOOP_OP_SETTLE: "owing again an installer's rest",
    lib.HM_LOOP_OP_GUARD: "handing a forked child's uffd to the guard",
}
# hm_loop_histogram's histograms, by the names the stats give them
HISTOGRAMS = {
    "latency": lib.HM_HIST_LATENCY,
    "gate": lib.HM_HIST_GATE,
    "fault_copy": lib.HM_HIST_FAULT_COPY,
    "installer_copy": lib.HM_HIST_INSTALLER_COPY,
    "wake_lock": lib.HM_HIST_LOCK,
}


def _check(rc: int, origin: str, pid: int | None = None) -> int:
    return check(rc, origin, pid=pid, exc=UffdError)


class FaultLoop:
    """A native thread serving the faults of every registered uffd from a PageStore."""

    def __init__(self, store: PageStore, installers: int | None = None, batch_pages: int | None = None) -> None:
        """installers: threads installing pages eagerly (default 2, or fewer
        CPUs); batch_pages: pages per installer ioctl (default 8)."""
        self._store = store  # the loop reads the store: keep it alive as long
        out = ffi.new("hm_loop **")
        _check(lib.hm_loop_new(store.handle, out), "hm_loop_new")
        self._l = ffi.gc(out[0], lib.hm_loop_free)
        if installers is not None or batch_pages is not None:
            st = self.stats()
            _check(
                lib.hm_loop_configure(self._l, installers or st["installers"], batch_pages or st["batch_pages"]),
                "hm_loop_configure",
            )

    def add_task(self, uffd: int, key: int, pid: int, runs: Iterable[tuple[int, int]]) -> None:
        """Serve uffd (the loop owns and closes the fd from now on) for store
        task `key`, which is owed `runs`: (vaddr, npages) pairs."""
        runs = list(runs)
        flat: list[int] = []
        for vaddr, npages in runs:
            check_range(vaddr, npages)
            flat += (vaddr, npages)
        _check(
            lib.hm_loop_add_task(self._l, uffd, key, pid, ffi.new("uint64_t[]", flat), len(runs)),
            "hm_loop_add_task",
            pid,
        )

    def set_guard(self, sockfd: int) -> None:
        """Before start: the guard's socket (destination/guard.py), of which
        the loop keeps a duplicate; the uffd of a child forked while its
        parent owes pages goes there before the child is served."""
        _check(lib.hm_loop_set_guard(self._l, sockfd), "hm_loop_set_guard")

    def start(self) -> None:
        _check(lib.hm_loop_start(self._l), "hm_loop_start")

    def begin_eager(self) -> None:
        """Restore has finished: install every owed page, faults first."""
        _check(lib.hm_loop_begin_eager(self._l), "hm_loop_begin_eager")

    def notify(self) -> None:
        """New pages are in the store: retry the faults waiting for them."""
        _check(lib.hm_loop_notify(self._l), "hm_loop_notify")

    @property
    def miss_fd(self) -> int:
        """Readable when a fault needs a page the store lacks (see read_misses)."""
        return int(lib.hm_loop_miss_fd(self._l))

    def read_misses(self) -> list[tuple[int, ...]]:
        """[(key, vaddr, npages, pid, src), ...]: pages wanted that the store
        lacks: those of images task pid at src, for store task key at vaddr."""
        try:
            data = os.read(self.miss_fd, _MISS.size * 256)
        except BlockingIOError:
            return []
        return [_MISS.unpack_from(data, i) for i in range(0, len(data) - len(data) % _MISS.size, _MISS.size)]

    def wait(self, timeout: float) -> bool:
        """True once every owed page is installed or its task exited; False on
        timeout. A fatal error of the loop is raised naming what failed: the
        operation, the task (`.pid`) and the address."""
        rc = lib.hm_loop_wait(self._l, int(timeout * 1000))
        if rc < 0:
            st = self.stats()
            where = " at 0x%x" % st["error_addr"] if st["error_addr"] else ""
            task = " of pid %d" % st["error_pid"] if st["error_pid"] else ""
            origin = OPERATIONS.get(st["error_op"], "operation %d" % st["error_op"]) + where + task
            _check(rc, origin, st["error_pid"] or None)
        return bool(rc)

    def stop(self) -> None:
        _check(lib.hm_loop_stop(self._l), "hm_loop_stop")

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct hm_loop_stats *")
        lib.hm_loop_get_stats(self._l, st)
        return {f: int(getattr(st, f)) for f in _STATS}

    def histograms(self) -> dict[str, dict[int, int]]:
        """{name: {lower bound of a bucket in ns: count}} of HISTOGRAMS, empty buckets left out."""
        counts = ffi.new("uint64_t[]", lib.HM_HIST_BUCKETS)
        out: dict[str, dict[int, int]] = {}
        for name, which in HISTOGRAMS.items():
            _check(lib.hm_loop_histogram(self._l, which, counts, lib.HM_HIST_BUCKETS), "hm_loop_histogram")
            out[name] = {int(lib.hm_loop_bucket_ns(b)): int(counts[b]) for b in range(lib.HM_HIST_BUCKETS) if counts[b]}
        return out

    def close(self) -> None:
        """Stop the thread and close every uffd; the tasks keep what was installed."""
        if self._l is not None:
            lib.hm_loop_stop(self._l)
            ffi.release(self._l)
            self._l = None
