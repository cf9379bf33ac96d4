"""The Fetcher: a thread that fills the page store with every lazy page of
every task from a page source, in large batches, the pages that faults are
waiting for first."""
import select
import threading

from .bindings.ranges import Ranges
from .images import PAGE_SIZE

CHUNK = 2 << 20  # the store's chunk: one batch never crosses one
FAULT_WINDOW = 16  # pages fetched for a fault that waits


class Fetcher(threading.Thread):
    def __init__(self, store, loop, source, batch_bytes=CHUNK):
        super().__init__(name="hybridmig-fetcher", daemon=True)
        self.store, self.loop, self.source = store, loop, source
        self.batch_pages = max(batch_bytes // PAGE_SIZE, 1)
        self.error = None
        self.pages_fetched = 0
        self._pending = {}  # key -> Ranges of pages not fetched yet
        self._order = []
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._closed = False
        self._stopping = False

    def add_task(self, key, runs):
        with self._lock:
            self._pending[key] = Ranges((r.vaddr, r.end) for r in runs)
            self._order.append(key)
            self._more.notify()

    def no_more_tasks(self):
        with self._lock:
            self._closed = True
            self._more.notify()

    def stop(self):
        with self._lock:
            self._stopping = True
            self._closed = True
            self._more.notify()

    def _fetch(self, key, start, end):
        npages = (end - start) // PAGE_SIZE
        self.source.read_into(self.store, key, start, npages)
        with self._lock:
            self._pending[key].remove(start, end)
        self.pages_fetched += npages
        self.loop.notify()

    def _serve_misses(self):
        """Fetch the windows faults wait on; the loop re-sends nothing, so
        every miss read here is fetched now."""
        for key, vaddr in self.loop.read_misses():
            pending = self._pending.get(key)
            nxt = pending.next(vaddr) if pending is not None else None
            if nxt and nxt[0] == vaddr:
                self._fetch(key, vaddr, min(nxt[1], vaddr + FAULT_WINDOW * PAGE_SIZE,
                                            (vaddr // CHUNK + 1) * CHUNK))

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
                with self._lock:
                    if self._closed:
                        return
                # all fetched so far: wait for a new task or a miss
                select.select([self.loop.miss_fd], [], [], 0.05)
        except Exception as e:  # surfaced by the daemon, which fails the restore
            self.error = e
            self.loop.notify()
