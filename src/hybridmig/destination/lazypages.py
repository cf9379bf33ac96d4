"""`hybridmig lazy-pages`: a drop-in for `criu lazy-pages`.

CRIU's side of the protocol (criu/uffd.c): `criu restore --lazy-pages`
connects to lazy-pages.socket in its work dir and sends, for each process of
the pstree in turn, its pid as an int followed by its userfaultfd over
SCM_RIGHTS (a zombie sends -pid and no fd). When the restore is complete, it
sends LAZY_PAGES_RESTORE_FINISHED on the same socket; if it cannot (we closed
the socket), the restore fails and CRIU kills the tasks. See docs/lazy-pages.md.
"""

import array
import errno
import logging
import os
import resource
import select
import socket
import struct
import time

from ..bindings.faultloop import FaultLoop
from ..bindings.pagestore import PageStore
from ..criu import images
from ..errors import HybridmigError, ProtocolError
from . import lazysocket
from .fetcher import Fetcher
from .lazysocket import SOCKET_NAME, listen
from .sources import LocalImages, PageSource

RESTORE_FINISHED = 0x52535446  # "RSTF"
_INT = struct.Struct("=i")
_CREDS = struct.Struct("=iII")  # struct ucred

log = logging.getLogger("hybridmig.lazy-pages")


def _recv_exact(conn, n, what):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ProtocolError(f"criu restore closed the lazy-pages socket while sending {what}")
        data += chunk
    return data


def _recv_uffd(conn, pid):
    """The task's uffd, and its pid as this process sees it: CRIU sends the
    uffd from the restored task itself (setup_uffd), so the sender is the task."""
    fds = array.array("i")
    sender = 0
    msg, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(fds.itemsize) + socket.CMSG_SPACE(_CREDS.size))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            sender = _CREDS.unpack(data[: _CREDS.size])[0]
    if not msg or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("criu restore sent no userfaultfd for pid %d" % pid)
    return fds[0], sender


def summarize_histogram(hist, over_ns=50_000):
    """count, p50/p90/p99/max (µs, lower bounds of their buckets), how many
    over over_ns, and the buckets ({µs: count}) of one histogram."""
    total = sum(hist.values())

    def pct(p):
        seen = 0
        for ns in sorted(hist):
            seen += hist[ns]
            if seen >= p * total:
                return ns / 1e3
        return 0.0

    return {
        "count": total,
        "p50_us": pct(0.5),
        "p90_us": pct(0.9),
        "p99_us": pct(0.99),
        "max_us": max(hist) / 1e3 if hist else 0.0,
        "over_%dus" % (over_ns // 1000): sum(c for ns, c in hist.items() if ns >= over_ns),
        "buckets_us": {"%g" % (ns / 1e3): c for ns, c in sorted(hist.items())},
    }


class LazyPagesDaemon:
    """Serves the lazy pages of one `criu restore --lazy-pages` from a RAM page store."""

    def __init__(self, images_dir, work_dir, source=None, store=None, installers=None, batch_pages=None, guard=None):
        self.images_dir = images_dir
        self.work_dir = work_dir
        self.store = store or PageStore()
        self.source: PageSource = source or LocalImages()
        self.loop = FaultLoop(self.store, installers=installers, batch_pages=batch_pages)
        self.fetcher = Fetcher(self.store, self.loop, self.source)
        self.guard = guard  # guard.Guard: holds a duplicate of each uffd until every page is in
        if guard is not None:
            # the uffds of children forked while pages are owed go to it from the fault loop
            self.loop.set_guard(guard.fileno())
        self.sock = None
        self._images = {}  # pid -> images.TaskImages of the live tasks, read by prepare()
        self._nr_tasks = 0
        self._preloaded = set()  # pids whose pages are all in the store before CRIU connects
        self.tasks = {}  # pid -> lazy pages of the tasks restored
        self.zombies = []
        self.connected_at = None  # monotonic ns: criu restore connected
        self.restore_finished_at = None
        self.completed = False

    def prepare(self):
        """Read and check every task's images before CRIU is let in: a broken
        image fails here, naming the file, before anything is restored."""
        pids = images.task_pids(self.images_dir)
        self._nr_tasks = len(pids)  # CRIU sends one message per pstree entry
        self._images = {
            pid: images.read_task(self.images_dir, pid) for pid in pids if not images.is_zombie(self.images_dir, pid)
        }
        for pid, task in self._images.items():
            self.source.add_task(pid, task)
            if self.source.preload:
                # Local pages images are mapped into the store, not read: a
                # few milliseconds per GiB, spent before CRIU connects, and
                # then no fault ever waits for a loader to reach its page.
                for run in task.runs:
                    self.source.read_into(self.store, pid, run.vaddr, run.npages)
                self.store.populate(pid)
                self._preloaded.add(pid)

    def bind(self):
        """The socket first: a `criu restore` started now waits in its
        backlog while prepare() reads the images (runc's users start the
        daemon and the restore back to back); the one `hybridmig lazy-pages`
        bound at its start if it is there (lazysocket.bind_early)."""
        self.sock = lazysocket.take(self.work_dir) or listen(self.work_dir)

    def listen(self):
        self.bind()
        self.prepare()

    def _accept_criu(self, timeout):
        """CRIU's connection. One that closes before it says anything is no
        restore but a second daemon asking whether this socket is in use
        (listen()): it must not cost this daemon its restore."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                conn, _ = self.sock.accept()
            except TimeoutError as e:
                raise ProtocolError(f"no criu restore connected to {SOCKET_NAME} within {timeout}s") from e
            self.connected_at = time.monotonic_ns()
            conn.settimeout(None)
            if conn.recv(1, socket.MSG_PEEK):
                return conn
            conn.close()

    def _accept_task(self, conn, pid):
        """Register one restored task: its uffd, what it is owed, where the pages come from."""
        uffd, sender = _recv_uffd(conn, pid)
        task = self._images.get(pid)
        if task is None:
            os.close(uffd)
            raise ProtocolError("criu restore sent pid %d, which is not in %s/pstree.img" % (pid, self.images_dir))
        try:
            if self.guard is not None:  # (until now, the socket's queue held the uffd)
                self.guard.hold(sender, uffd)
            self.loop.add_task(uffd, pid, pid, [(run.vaddr, run.npages) for run in task.runs])
        except Exception:
            os.close(uffd)  # the loop owns the fd only once it took the task
            raise
        # The fetcher still serves what the loop asks for (pages of a task
        # forked after restore, pages moved by mremap before they came).
        self.fetcher.add_task(pid, () if pid in self._preloaded else task.runs)
        self.tasks[pid] = task.lazy_pages
        log.info("pid %d: %d lazy pages", pid, task.lazy_pages)

    def serve(self, timeout=None, eager_delay=0.0):
        """Run one restore to the end; returns the stats. Raises on any
        failure before the restore finished, which makes it fail.
        eager_delay: seconds between restore-finished and eager install,
        during which pages go in only when faulted (experiments, tests)."""
        conn = self._accept_criu(timeout)
        self.sock.close()
        self.loop.start()
        self.fetcher.start()
        with conn:
            for _ in range(self._nr_tasks):
                (pid,) = _INT.unpack(self._recv_from_criu(conn, _INT.size, "a pid"))
                if pid < 0:
                    self.zombies.append(-pid)
                    continue
                self._accept_task(conn, pid)
            (fin,) = struct.unpack("=I", self._recv_from_criu(conn, 4, "restore-finished"))
            if fin != RESTORE_FINISHED:
                raise ProtocolError(f"unexpected message 0x{fin:x} instead of restore-finished")
            self.restore_finished_at = time.monotonic_ns()
            if eager_delay:
                self._watch_fetcher(eager_delay)
            self.loop.begin_eager()
            while not self.loop.wait(0.2):
                self._watch_fetcher(0)
            if self.guard is not None:
                self.guard.installed()
        self.completed = True
        return self.stats()

    def fail(self, error):
        """From another thread: fail this restore (its page source is gone);
        a task waiting for pages is ended rather than left waiting."""
        if self.fetcher.error is None:
            self.fetcher.error = error
        self.loop.notify()

    def _recv_from_criu(self, conn, n, what):
        """_recv_exact, failing as soon as the fetcher does: a restored task
        may wait in a fault for a page that will never come, and CRIU with it
        for ever. Raising closes the socket and the uffds; CRIU then fails
        the restore and kills the tasks."""
        while not select.select([conn], [], [], 0.1)[0]:
            if self.fetcher.error is not None:
                raise HybridmigError(
                    f"reading pages failed during the restore: {self.fetcher.error}"
                ) from self.fetcher.error
        return _recv_exact(conn, n, what)

    def _watch_fetcher(self, seconds):
        deadline = time.monotonic() + seconds
        while True:
            if self.fetcher.error is not None:
                raise HybridmigError(
                    f"reading pages failed after restore: {self.fetcher.error}"
                ) from self.fetcher.error
            if time.monotonic() >= deadline:
                return
            time.sleep(min(0.05, deadline - time.monotonic()))

    def stats(self):
        st = self.loop.stats()
        installed = st["done_ns"] - st["eager_ns"] if st["done_ns"] and st["eager_ns"] else None
        return {
            "tasks": len(self.tasks),
            "zombies": len(self.zombies),
            "lazy_pages": sum(self.tasks.values()),
            "pages_fault": st["pages_fault"],
            "pages_prefetch": st["pages_prefetch"],
            "pages_zero": st["pages_zero"],
            "bytes_copied": st["bytes_copied"],
            "faults": st["faults"],
            "faults_during_install": st["faults_during_install"],
            "faults_absent": st["faults_absent"],
            "faults_blocked": st["faults_blocked"],
            "installers": st["installers"],
            "batch_pages": st["batch_pages"],
            "fault_thread_rt": bool(st["fault_thread_rt"]),
            "forks": st["events_fork"],
            "forks_held": st["guard_holds"],
            "events_remap": st["events_remap"],
            "events_remove": st["events_remove"],
            "events_unmap": st["events_unmap"],
            "events_during_install": st["events_during_install"],
            "install_s": installed / 1e9 if installed is not None else None,
            "fault_latency_us": {
                "p50": st["lat_p50_ns"] / 1e3,
                "p99": st["lat_p99_ns"] / 1e3,
                "max": st["lat_max_ns"] / 1e3,
            },
            "gate": {
                k: st[k] for k in ("gate_waits", "gate_same_cpu", "gate_slept", "installers_pinned", "claims_cut")
            },
            "breakdown": {name: summarize_histogram(h) for name, h in self.loop.histograms().items()},
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }

    def close(self):
        self.fetcher.stop()
        if self.fetcher.is_alive():
            self.fetcher.join(5)
        if not self.fetcher.is_alive():
            self.fetcher.close()
        self.loop.close()
        # A source told of failure makes a lazy dump resume the original
        # process rather than end it: it must never be lost.
        if self.completed:
            self.source.close()
        else:
            self.source.abort()
        if self.sock is not None:
            try:
                self.sock.close()
                os.unlink(os.path.join(os.path.abspath(self.work_dir), SOCKET_NAME))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
