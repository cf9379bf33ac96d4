"""Where lazy pages come from after `criu dump --lazy-pages`: the dump
side's page server.

`criu dump --lazy-pages --address A --port P` dumps everything but the lazy
pages (private anonymous memory), keeps the dumped tasks frozen with those
pages in page pipes, and then runs a page server on A:P (cr_lazy_mem_dump()
-> cr_page_server(), criu/cr-dump.c) that accepts exactly one connection and
serves it until that connection is closed. When the session ends well the
dump exits 0 and kills the dumped tasks; when it ends in error the dump
fails and the tasks resume.

The wire protocol, as CRIU 4.2.1 speaks it with `criu lazy-pages
--page-server` (criu/page-xfer.c, criu/pagemap.c, criu/uffd.c):

* No handshake: the client connects (connect_to_page_server_to_recv) and
  sends requests; there is no PS_IOV_OPEN/OPEN2/PARENT on this path, no
  feature negotiation, no TLS unless --tls (not supported here).
* Every message starts with `struct page_server_iov` {u32 cmd; u64 nr_pages;
  u64 vaddr; u64 dst_id}, in host byte order and natural alignment (32
  bytes on x86_64, 4 bytes of padding after cmd).
* A request is PS_IOV_GET (7) with nr_pages and vaddr of the pages wanted
  and dst_id = the task's pid as in the images, *not* encode_pm()'d
  (request_remote_pages() gets pr->img_id, which open_page_read() set to the
  pid; page_server_get_pages() looks it up with pstree_item_by_virt()).
* The server (page_server_get_pages) answers each request in turn,
  synchronously, with the same header turned into PS_IOV_ADD_F | PE_PRESENT
  << 16 (the 16 upper bits of cmd are pagemap flags), vaddr and dst_id
  unchanged and nr_pages clamped to the end of the page-pipe iovec holding
  vaddr (it "may return less pages than we asked for", page_server_read()),
  followed by exactly nr_pages * 4096 bytes of page data. It never sends
  zero pages or holes: pages that were zero at dump time are in no pagemap
  entry, so nobody asks for them.
* A request the server cannot answer (an address in none of its lazy
  iovecs) ends the session with an error: it logs "no iovs found" and
  closes the socket; an unknown pid would crash it (pstree_item_by_virt()
  returns NULL), so only pids and pages of the images are ever asked for.
* The end: PS_IOV_CLOSE (0x1023, other fields 0); the server answers an
  int32 status (0) and waits for the client to close the socket
  (disconnect_from_page_server / page_server_serve). A plain EOF instead of
  PS_IOV_CLOSE also counts as a good end for the dump side; any unknown
  command or a reset connection makes it fail, which resumes the dumped
  tasks (see abort()).

CRIU's own client sends its requests with MSG_DONTWAIT and reads replies
from epoll; here the Fetcher thread does blocking I/O instead, and several
requests (one per lazy run of a batch) are sent at once and their replies
read in order, since the server answers strictly in turn.
"""

import bisect
import logging
import socket
import struct
import threading

from ..errors import ProtocolError
from .images import PAGE_SIZE, PE_PRESENT

# criu/page-xfer.c
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_CMD_BITS = 16
PS_CMD_MASK = (1 << PS_CMD_BITS) - 1
# Not a CRIU command: page_server_serve() rejects it ("Unknown command 0"),
# which fails the dump instead of completing it.
PS_ABORT = 0

_PSI = struct.Struct("@IQQQ")  # struct page_server_iov, native layout (32 bytes on 64-bit)
_STATUS = struct.Struct("@i")
MAX_INFLIGHT = 64  # requests sent before their replies are read

log = logging.getLogger("hybridmig.criu.pageserver")


class PageServerSource:
    """Lazy pages read from a remote CRIU page server (`criu dump --lazy-pages`).

    The connection is made by connect(), or by the first add_task(); one
    thread (the Fetcher) calls read_into(); close() or abort() ends the
    session, from another thread once the Fetcher is done.
    """

    preload = False  # a PageSource (destination/sources.py)
    prefetch = True
    arrives_later = False

    def __init__(self, address, port, connect_timeout=10.0, io_timeout=60.0):
        self.address, self.port = address, int(port)
        self.connect_timeout, self.io_timeout = connect_timeout, io_timeout
        self._sock = None
        self._tasks = {}  # key -> (pid, [LazyRun] sorted, [vaddr])
        self._lock = threading.Lock()  # held for every exchange on the socket
        self._buf = bytearray()
        self._broken = None  # why the stream cannot be used any more
        self._done = False
        self.requests = 0
        self.short_replies = 0
        self.bytes_received = 0

    @property
    def where(self):
        return "CRIU page server at %s:%d" % (self.address, self.port)

    # --- session ------------------------------------------------------------
    def connect(self):
        """Connect now (idempotent): fails fast on a wrong address or port."""
        if self._sock is not None:
            return
        if self._done:
            raise ProtocolError(f"{self.where}: the session is already closed")
        try:
            sock = socket.create_connection((self.address, self.port), timeout=self.connect_timeout)
        except TimeoutError as e:
            raise ProtocolError(f"cannot connect to the {self.where}: no answer within {self.connect_timeout}s") from e
        except socket.gaierror as e:
            raise ProtocolError(f"cannot connect to the {self.where}: bad address ({e.strerror})") from e
        except OSError as e:
            raise ProtocolError(
                "cannot connect to the %s: %s (is `criu dump --lazy-pages --address %s "
                "--port %d` running and not yet served?)" % (self.where, e.strerror or e, self.address, self.port)
            ) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.io_timeout)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        log.info("connected to the %s", self.where)

    def add_task(self, key, task):
        self.connect()
        runs = sorted((r for r in task.runs if r.npages > 0), key=lambda r: r.vaddr)
        self._tasks[key] = (task.pid, runs, [r.vaddr for r in runs])

    def _fail(self, what, cause=None):
        self._broken = what
        err = ProtocolError(f"{self.where}: {what}")
        if cause is not None:
            raise err from cause
        raise err

    def _send(self, data, what):
        try:
            self._sock.sendall(data)
        except TimeoutError as e:
            self._fail(f"sending {what} timed out after {self.io_timeout}s", e)
        except (BrokenPipeError, ConnectionResetError) as e:
            self._fail(f"the page server closed the connection before we could send {what}", e)
        except OSError as e:
            self._fail(f"sending {what} failed: {e.strerror or e}", e)

    def _recv_into(self, view, what):
        got, n = 0, len(view)
        while got < n:
            try:
                r = self._sock.recv_into(view[got:], n - got)
            except TimeoutError as e:
                self._fail(f"no {what} within {self.io_timeout}s", e)
            except ConnectionResetError as e:
                # a page server that closes with requests of ours unread resets
                self._fail(f"the page server closed the connection (reset) while we waited for {what}", e)
            except OSError as e:
                self._fail(f"receiving {what} failed: {e.strerror or e}", e)
            if r == 0:  # (ProtocolError is an OSError: raised outside the try)
                self._fail(
                    "the page server closed the connection while we waited for %s "
                    "(%d of %d bytes received; its log, e.g. dump.log, says why)" % (what, got, n)
                )
            got += r

    def _recv_reply(self, pid, vaddr, npages):
        """The header answering PS_IOV_GET(pid, vaddr, npages): pages it brings."""
        hdr = bytearray(_PSI.size)
        what = "the answer to PS_IOV_GET of %d pages at 0x%x of pid %d" % (npages, vaddr, pid)
        self._recv_into(memoryview(hdr), what)
        cmd, nr, addr, dst = _PSI.unpack(hdr)
        if (
            cmd & PS_CMD_MASK != PS_IOV_ADD_F
            or not (cmd >> PS_CMD_BITS) & PE_PRESENT
            or addr != vaddr
            or dst != pid
            or not 0 < nr <= npages
        ):
            self._fail(
                "protocol mismatch: %s is {cmd 0x%x, nr_pages %d, vaddr 0x%x, dst_id %d}, expected "
                "{cmd 0x%x, nr_pages 1..%d, vaddr 0x%x, dst_id %d} (not a CRIU 4.x page server "
                "of a lazy dump?)"
                % (what, cmd, nr, addr, dst, PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS, npages, vaddr, pid)
            )
        return nr

    def _usable(self):
        if self._broken is not None:
            raise ProtocolError(f"{self.where}: the connection is unusable: {self._broken}")
        if self._sock is None:
            raise ProtocolError(f"{self.where}: not connected")

    # --- pages ----------------------------------------------------------------
    def read_into(self, store, key, vaddr, npages, pid=None, src=None):
        """Task `pid`'s (default: key) lazy pages at `src` (default: vaddr),
        into store task `key` at `vaddr`."""
        pid, runs, starts = self._tasks[key if pid is None else pid]
        src = vaddr if src is None else src
        end = src + npages * PAGE_SIZE
        pieces = []  # (vaddr, npages): the lazy pages of the range, never anything else
        i = max(bisect.bisect_right(starts, src) - 1, 0)
        while i < len(runs) and runs[i].vaddr < end:
            lo, hi = max(src, runs[i].vaddr), min(end, runs[i].end)
            if lo < hi:
                pieces.append((lo, (hi - lo) // PAGE_SIZE))
            i += 1
        if not pieces:
            return
        with self._lock:
            self._usable()
            if len(self._buf) < npages * PAGE_SIZE:
                self._buf = bytearray(npages * PAGE_SIZE)
            view = memoryview(self._buf)
            got = []
            todo = pieces
            while todo:
                batch, todo = todo[:MAX_INFLIGHT], todo[MAX_INFLIGHT:]
                self._send(
                    b"".join(_PSI.pack(PS_IOV_GET, n, lo, pid) for lo, n in batch), "PS_IOV_GET for pid %d" % pid
                )
                self.requests += len(batch)
                for lo, n in batch:
                    nr = self._recv_reply(pid, lo, n)
                    off = lo - src
                    self._recv_into(view[off : off + nr * PAGE_SIZE], "%d pages at 0x%x of pid %d" % (nr, lo, pid))
                    self.bytes_received += nr * PAGE_SIZE
                    got.append((lo, lo + nr * PAGE_SIZE))
                    if nr < n:  # clamped at the end of the server's iovec: ask for the rest
                        self.short_replies += 1
                        todo.append((lo + nr * PAGE_SIZE, n - nr))
            got.sort()
            span_lo, span_hi = got[0]
            for lo, hi in got[1:] + [(None, None)]:
                if lo == span_hi:
                    span_hi = hi
                    continue
                store.put(key, vaddr + (span_lo - src), view[span_lo - src : span_hi - src])
                span_lo, span_hi = lo, hi

    # --- the end ------------------------------------------------------------
    def _acquire_for_end(self):
        """Take the socket from a Fetcher that may still be blocked in it."""
        if self._lock.acquire(timeout=2):
            return True
        self._broken = self._broken or "closed while a read was in flight"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return self._lock.acquire(timeout=self.io_timeout)

    def close(self):
        """End the session well (once): PS_IOV_CLOSE, which completes the
        dump (and kills the dumped tasks). On a connection that broke, ends
        it as abort() does instead. Raises ProtocolError if the page server
        does not acknowledge."""
        self._end(self._send_close)

    def abort(self):
        """End the session as a failure (once): the dump then fails and the
        dumped tasks resume where they were, rather than being killed. For a
        restore that did not finish."""
        self._end(self._send_abort)

    def _end(self, how):
        if self._done:
            return
        self._done = True
        if self._sock is None:
            return
        locked = self._acquire_for_end()
        try:
            how()
        finally:
            self._sock.close()
            if locked:
                self._lock.release()

    def _send_close(self):
        if self._broken is not None:
            self._send_abort()
            return
        self._send(_PSI.pack(PS_IOV_CLOSE, 0, 0, 0), "PS_IOV_CLOSE")
        status = bytearray(_STATUS.size)
        self._recv_into(memoryview(status), "the status answering PS_IOV_CLOSE")
        (st,) = _STATUS.unpack(status)
        if st != 0:
            raise ProtocolError("%s: PS_IOV_CLOSE answered with status %d" % (self.where, st))
        log.info(
            "closed the %s: %d requests, %d short replies, %d bytes",
            self.where,
            self.requests,
            self.short_replies,
            self.bytes_received,
        )

    def _send_abort(self):
        # An unknown command fails page_server_serve(); if the server is
        # blocked writing to us instead, closing with unread data resets
        # the connection, which fails it too. (A bare EOF would not: the
        # dump side takes it for a good end.)
        try:
            self._sock.settimeout(1)
            self._sock.sendall(_PSI.pack(PS_ABORT, 0, 0, 0))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        log.warning("aborted the session with the %s: the dump fails and its tasks resume", self.where)
