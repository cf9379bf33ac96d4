"""The Fetcher: a thread that fills the page store with every lazy page of
every task from a page source, in large batches, the pages that faults are
waiting for first."""

import os
import select
import threading

from ..bindings import PAGE_SIZE
from ..bindings.ranges import Ranges
from .sources import PageSource

CHUNK = 2 << 20  # the store's chunk: one batch never crosses one
FAULT_WINDOW = 16  # pages fetched for a fault that waits


class Fetcher(threading.Thread):
    def __init__(self, store, loop, source: PageSource, batch_bytes=CHUNK):
        super().__init__(name="hybridmig-fetcher", daemon=True)
        self.store, self.loop, self.source = store, loop, source
        self.batch_pages = max(batch_bytes // PAGE_SIZE, 1)
        self.prefetch = source.prefetch
        self.error: Exception | None = None
        self.pages_fetched = 0
        self._pending: dict[int, Ranges] = {}  # key -> pages not fetched yet
        self._order: list[int] = []
        self._lock = threading.Lock()
        self._stopping = False
        # stop() wakes the thread from its select at once: the daemon joins
        # it before it exits, and the exit is when a restore counts as done
        self._wake_rd, self._wake_wr = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def add_task(self, key, runs):
        # A source whose pages are all in the store already (hybridmig serve)
        # is only asked for what the fault loop finds missing.
        if not self.prefetch:
            runs = ()
        with self._lock:
            self._pending[key] = Ranges((r.vaddr, r.end) for r in runs)
            self._order.append(key)

    def stop(self):
        with self._lock:
            self._stopping = True
        try:
            os.write(self._wake_wr, b"x")
        except BlockingIOError:
            pass  # already woken

    def close(self):
        """After stop() and the thread's end."""
        for fd in (self._wake_rd, self._wake_wr):
            os.close(fd)

    def _fetch(self, key, start, end):
        npages = (end - start) // PAGE_SIZE
        self.source.read_into(self.store, key, start, npages)
        with self._lock:
            self._pending[key].remove(start, end)
        self.pages_fetched += npages
        self.loop.notify()

    def _serve_misses(self):
        """Fetch what the fault loop asks for now. A key the fetcher does not
        know is a task forked after restore (it owes what its parent, the
        images' pid, owed); a src that is not vaddr, pages mremap moved before
        their data came. Those get only what they ask for."""
        for key, vaddr, npages, pid, src in self.loop.read_misses():
            pending = self._pending.get(key)
            if pending is None or src != vaddr or not self.prefetch:
                # the rest of the chunk: faults come in runs
                n = (
                    min(npages, ((vaddr // CHUNK + 1) * CHUNK - vaddr) // PAGE_SIZE)
                    if src != vaddr
                    else ((vaddr // CHUNK + 1) * CHUNK - vaddr) // PAGE_SIZE
                )
                self.source.read_into(self.store, key, vaddr, n, pid, src)
                self.pages_fetched += n
                if not self.source.arrives_later:  # (else its pages notify the loop as they come)
                    self.loop.notify()
                continue
            nxt = pending.next(vaddr)
            if nxt and nxt[0] == vaddr:
                self._fetch(
                    key, vaddr, min(nxt[1], vaddr + max(npages, FAULT_WINDOW) * PAGE_SIZE, (vaddr // CHUNK + 1) * CHUNK)
                )

    def _next_batch(self):
        with self._lock:
            for key in self._order:
                nxt = self._pending[key].next(0)
                if nxt:
                    start = nxt[0]
                    end = min(nxt[1], start + self.batch_pages * PAGE_SIZE, (start // CHUNK + 1) * CHUNK)
                    return key, start, end
        return None

    def run(self):
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                if select.select([self.loop.miss_fd], [], [], 0)[0]:
                    self._serve_misses()
                batch = self._next_batch()
                if batch:
                    self._fetch(*batch)
                    continue
                # All fetched so far: wait for a new task, or for a miss (a
                # task forked after restore asks for its pages until the end).
                select.select([self.loop.miss_fd, self._wake_rd], [], [], 0.05)
        except Exception as e:  # surfaced by the daemon, which fails the restore
            self.error = e
            self.loop.notify()
