"""Post-copy on the destination: the copy runs before the store has every
page, and what it lacks comes from the frozen source.

The source pushes every owed page in address order on its own; a fault on
a page not in the store is asked for at once (FETCH of a few pages from the
faulted one), and the source sends those ahead of the push. Unlike
pre-copy's RemotePages, a FETCH does not wait here: the fetcher thread goes
on with the next fault, and the fault loop retries the waiting faults as
pages arrive (the session's thread stores them and notifies it). Each
FETCH is timed from its send to the arrival of the faulted page (its
first; the source sends the rest of its window only where still owed):
the remote faults' latency in RESULT. docs/design.md, "Post-copy"."""

import logging
import os
import socket
import threading
import time

from .. import wire
from ..bindings import PAGE_SIZE
from ..bindings.pagestore import DATA, ZERO
from ..bindings.ranges import Ranges
from ..errors import ProtocolError
from ..messages import Host, Resume
from ..wire import Msg
from .serve import RemotePages  # (serve imports this module only when a post-copy begins)

log = logging.getLogger("hybridmig.destination.postcopy")
FAULT_PAGES = 16  # pages asked for per fault: the faulted one and those after it
CHUNK = 2 << 20  # a FETCH never crosses a store chunk
ASK_AGAIN_S = 1.0  # a range asked for is not asked again sooner (the push or the answer is on its way)
# The receive buffer in post-copy (the kernel doubles it): a fault's pages
# queue behind what it holds. Autotuned, it grew to megabytes whenever this
# side stored the push slower than the link brought it (its CPU shared with
# the resumed copy): remote faults waited 200-330 ms (p99) at 1 Gbit/s.
RCVBUF = 512 << 10


def bound_backlog(channel):
    """What the session's socket may hold unread, bounded (RCVBUF)."""
    try:
        channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    except OSError as e:
        log.info("cannot bound the receive buffer (%s): faults may wait behind more of the push", e)


def percentiles_ms(samples_s):
    if not samples_s:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(samples_s)
    return {"p50": s[len(s) // 2] * 1000, "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, "max": s[-1] * 1000}


class PostCopyPages(RemotePages):
    """The lazy daemon's page source in post-copy (a PageSource)."""

    arrives_later = True

    def __init__(self, channel, store, timeout=60.0):
        super().__init__(channel, store, timeout)
        bound_backlog(channel)
        self.loop = None  # the daemon's FaultLoop, set once it exists
        self._lock = threading.Lock()
        self._asked = {}  # (key, vaddr) -> monotonic of the FETCH
        self._outstanding = {}  # key -> [(monotonic sent, Ranges not arrived)]
        self.latencies = []
        self._received = {}  # key -> Ranges of the pages that came since RESTORE
        self.fetches = 0
        self.faults = None  # the session's FaultLane (destination/faults.py): FETCHes go there while it lasts
        self.fetches_on_fault_channel = 0
        self.pages_arrived_after = 0  # pages that came after RESTORE (pushed or fetched)
        self.last_arrival = time.monotonic()

    def read_into(self, store, key, vaddr, npages, pid=None, src=None):
        """Asked for, not waited for: the pages of task `pid` (default key)
        at `src` (default vaddr), for task `key` at `vaddr`. Those of a
        forked child's parent, or moved by mremap before they came, are
        copied to where they are wanted as they arrive (_forward)."""
        owner = key if pid is None else pid
        at = vaddr if src is None else src
        npages = min(npages, FAULT_PAGES, ((at // CHUNK + 1) * CHUNK - at) // PAGE_SIZE)
        if (owner, at) != (key, vaddr) and self._complete(owner, at, npages):
            for i in range(npages):  # here already (and not installed and released yet)
                self._copy_page(key, vaddr + i * PAGE_SIZE, *self.store.get(owner, at + i * PAGE_SIZE))
            return
        data, zero = self.store.count(owner, at, npages)
        if (owner, at) == (key, vaddr):
            if data + zero == npages:
                return
            # A task's own pages: up to the first that came already (in the
            # store, or installed and released since): not asked twice.
            with self._lock:
                received = self._received.get(key) or Ranges()
                for i in range(1, npages):
                    if at + i * PAGE_SIZE in received:
                        npages = i
                        break
        now = time.monotonic()
        with self._lock:
            if now - self._asked.get((key, vaddr), -ASK_AGAIN_S) < ASK_AGAIN_S:
                return
            self._asked[(key, vaddr)] = now
            # (sent, where the pages come from, Ranges of them not arrived yet, where they go)
            end = at + npages * PAGE_SIZE
            self._outstanding.setdefault(owner, []).append((now, at, end, Ranges([(at, end)]), key, vaddr))
            self.fetches += 1
        self.remote_pages += npages
        fetch = wire.encode_range(owner, at, npages)
        if self.faults is not None and self.faults.send(Msg.FETCH, fetch):
            self.fetches_on_fault_channel += 1
            return
        try:
            self.channel.send(Msg.FETCH, fetch)
        except ProtocolError as e:  # the link: the faults wait, asked again once the source is back
            log.warning("cannot ask the source for pages: %s", e)

    def _copy_page(self, key, addr, kind, data):
        if kind == DATA:
            self.store.put(key, addr, data)
        elif kind == ZERO:
            self.store.put_zero(key, addr, 1)
        # ABSENT: installed and released meanwhile; asked for again

    def _forward(self, at, end, to_key, to_vaddr, extents, data):
        """Pages of a PAGES body (extents, data) in [at, end), into task
        to_key at to_vaddr: before the owner's installers release them."""
        data = memoryview(data)
        off = 0
        for vaddr, npages, zero in extents:
            for i in range(npages):
                addr = vaddr + i * PAGE_SIZE
                is_zero = zero[i // 8] >> (i % 8) & 1
                if at <= addr < end:
                    page = None if is_zero else data[off : off + PAGE_SIZE]
                    self._copy_page(to_key, to_vaddr + addr - at, ZERO if is_zero else DATA, page)
                off += 0 if is_zero else PAGE_SIZE

    def pages_arrived(self, key=None, extents=(), data=b""):
        now = time.monotonic()
        self.last_arrival = now
        with self._lock:
            received = self._received.setdefault(key, Ranges())
            for vaddr, npages, _ in extents:
                received.add(vaddr, vaddr + npages * PAGE_SIZE)
            waiting = self._outstanding.get(key)
            if waiting:
                for sent, at, end, missing, to_key, to_vaddr in waiting:
                    before = missing.total()
                    for vaddr, npages, _ in extents:
                        missing.remove(vaddr, vaddr + npages * PAGE_SIZE)
                    if (to_key, to_vaddr) != (key, at) and missing.total() < before:
                        self._forward(at, end, to_key, to_vaddr, extents, data)
                    if at not in missing:  # the faulted page came: the rest of its window may not
                        self.latencies.append(now - sent)
                self._outstanding[key] = [w for w in waiting if w[1] in w[3]]
            self.pages_arrived_after += sum(n for _, n, _ in extents)
            if self.loop is not None:  # (under the lock: detach_loop() before the loop is freed)
                self.loop.notify()  # the faults waiting for these pages retry, idle installers wake
        super().pages_arrived()

    def detach_loop(self):
        """Before the daemon frees its fault loop: pages may still come (a
        push or an answer in flight when the last page was installed)."""
        with self._lock:
            self.loop = None

    def reattach(self, channel):
        """The source is back on `channel`: every waiting fault asks again
        (what was asked, or pushed, may have been lost with the link)."""
        bound_backlog(channel)
        with self._lock:
            self.channel = channel
            self._asked.clear()
            self._outstanding.clear()
        self.last_arrival = time.monotonic()
        with self._lock:
            if self.loop is not None:
                self.loop.notify()

    def fault_channel_lost(self):
        """The fault channel broke: FETCHes go on the control channel, and
        every waiting fault asks again there (what it asked may be lost)."""
        with self._lock:
            self.faults = None
            self._asked.clear()
            self._outstanding.clear()
            if self.loop is not None:
                self.loop.notify()

    def idle_s(self):
        """Seconds since the last page came."""
        return time.monotonic() - self.last_arrival

    def stats(self):
        return {
            "remote_faults": self.fetches,
            "fetches_on_fault_channel": self.fetches_on_fault_channel,
            "remote_fault_latency_ms": percentiles_ms(self.latencies),
            "pages_arrived_after_restore": self.pages_arrived_after,
        }


def recover(session, acceptor, outcomes, limits):
    """A post-copy session broke while its copy lacks pages: wait for the
    source to come back (RESUME with this session's id) while the copy's
    faults wait, as long as the source tries (its --timeout), and go on with
    the session on the new connection. Returns its outcome, or None if the
    source did not come back (the copy is then ended). Other sources are
    told that serve is busy; a source asking OUTCOME hears "pending"."""
    from .serve import answer_outcome  # (serve imports this module)

    log.warning("post-copy of session %s: waiting for the source to reconnect", session.id)
    deadline = time.monotonic() + session.reconnect_s
    while session.resumable(ProtocolError("the link")) and time.monotonic() < deadline:
        channel = acceptor.next_channel(timeout=1.0)
        if channel is None:
            continue
        try:
            channel.send(
                Msg.HOST, Host(wire.boot_id(), os.uname().release, session.id, sorted(limits.criu_opts)).encode()
            )
            kind, payload = channel.recv()
            if kind == Msg.OUTCOME:
                answer_outcome(channel, outcomes, payload)
                channel.close()
                continue
            if kind != Msg.RESUME or Resume.decode(payload).session != session.id:
                raise ProtocolError(f"busy: the post-copy of session {session.id} waits for its source")
            old = session.channel
            session.reattach(channel)
            old.close()
            channel.send(Msg.RESUME, Resume(session.id).encode())
            log.warning("post-copy of session %s: the source is back (%s)", session.id, channel.peer)
            return session.run()
        except Exception as e:  # noqa: BLE001 -- that connection failed: wait for another
            log.error("post-copy of session %s: %s", session.id, e)
            channel.send_error(str(e))
            if channel is not session.channel:
                channel.close()
    return None
