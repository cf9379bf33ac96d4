"""Where lazy pages come from: what a page source is, and the local pages
images of a CRIU dump.

A page source fills the page store for a range of one task's lazy pages;
the Fetcher decides the order. (The others: CRIU's page server in
criu/pageserver.py, the frozen source of `run` in serve.py's RemotePages.)"""

import bisect
import os
from typing import Protocol

from ..bindings import PAGE_SIZE
from ..bindings.pagestore import PageStore
from ..criu.images import TaskImages
from ..errors import ImageError


class PageSource(Protocol):
    """What the lazy-pages daemon and its Fetcher need of a page source."""

    #: every page is mapped into the store before restore starts (no fetching)
    preload: bool
    #: the Fetcher reads ahead of the faults (False: the store holds the pages
    #: already, fetch only what a fault asks for)
    prefetch: bool
    #: read_into only asks for the pages; whoever stores them as they come
    #: notifies the fault loop (post-copy: destination/postcopy.py)
    arrives_later: bool

    def add_task(self, key: int, task: TaskImages) -> None:
        """Serve task `key`, whose lazy pages the images describe."""

    def read_into(
        self, store: PageStore, key: int, vaddr: int, npages: int, pid: int | None = None, src: int | None = None
    ) -> None:
        """The images' pages of task `pid` (default: key) at `src` (default:
        vaddr), into store task `key` at `vaddr`."""

    def abort(self) -> None:
        """End after a failure (the source's peer, if any, is told)."""

    def close(self) -> None:
        """End after success."""


class LocalImages:
    """Pages read straight from pages-N.img into the store (no Python copy).

    preload: the daemon maps every page into the store before restore starts
    (store.load_file maps the file, so that costs no copy and no memory)."""

    preload = True
    prefetch = True
    arrives_later = False

    def __init__(self):
        self._tasks = {}  # key -> (fd, [LazyRun] sorted, [vaddr])

    def add_task(self, key, task):
        missing = [r for r in task.runs if r.offset is None]
        if missing:
            raise ImageError(
                "%s: pid %d has %d lazy pages that are not in the images (a lazy dump?): "
                "serve them with --page-server" % (task.pages_path, task.pid, sum(r.npages for r in missing))
            )
        try:
            fd = os.open(task.pages_path, os.O_RDONLY | os.O_CLOEXEC) if task.runs else -1
        except OSError as e:
            raise ImageError(f"{task.pages_path}: cannot open ({e.strerror})") from e
        runs = sorted(task.runs, key=lambda r: r.vaddr)
        self._tasks[key] = (fd, runs, [r.vaddr for r in runs])

    def read_into(self, store, key, vaddr, npages, pid=None, src=None):
        """The images' pages of task `pid` (default: key) at `src` (default:
        vaddr), into store task `key` at `vaddr`."""
        fd, runs, starts = self._tasks[key if pid is None else pid]
        src = vaddr if src is None else src
        end = src + npages * PAGE_SIZE
        i = max(bisect.bisect_right(starts, src) - 1, 0)
        while i < len(runs) and runs[i].vaddr < end:
            run = runs[i]
            lo, hi = max(src, run.vaddr), min(end, run.end)
            if lo < hi:
                store.load_file(key, vaddr + (lo - src), (hi - lo) // PAGE_SIZE, fd, run.offset + (lo - run.vaddr))
            i += 1

    def abort(self):
        """End after a failure; local images need no one told."""
        self.close()

    def close(self):
        for fd, _, _ in self._tasks.values():
            if fd >= 0:
                os.close(fd)
        self._tasks.clear()
