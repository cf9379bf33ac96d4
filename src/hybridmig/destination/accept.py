"""serve's accept loop: handshakes of many peers at once, none able to hold it.

Each connection gets a thread of its own for its handshake (TLS included),
with a total deadline; the accept thread never reads from a peer. At most
MAX_PENDING connections are in their handshake at once: one more, and the
oldest of them is cut (a real source's handshake takes milliseconds, so
the oldest is the likeliest to be a peer holding a slot). serve migrates one
source at a time: an authenticated source that comes while it is busy is
told so at once."""

import logging
import queue
import socket
import threading
import time

from .. import wire
from ..errors import ProtocolError

log = logging.getLogger("hybridmig.destination.accept")
MAX_PENDING = 64
# How long an authenticated source waits for serve to be done with the
# session before it, rather than being told at once that serve is busy.
BUSY_GRACE_S = 3.0
_TICK_S = 0.25  # how often the accept thread cuts handshakes past their deadline


class Acceptor:
    def __init__(self, lsock, key, tls=None, mode=wire.SEALED, deadline_s=wire.HANDSHAKE_DEADLINE_S, streams=None):
        self.lsock, self.key, self.tls, self.mode, self.deadline_s = lsock, key, tls, mode, deadline_s
        self.streams = streams  # streams.Registry: where page streams (run --streams) go; None: refused
        self._ready: queue.Queue[wire.Channel] = queue.Queue(1)
        self._idle = threading.Event()  # serve waits in next_channel(): no session under way
        self._pending = {}  # socket -> deadline, oldest first
        self._lock = threading.Lock()
        self._closed = False
        lsock.settimeout(_TICK_S)
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()

    def next_channel(self, timeout=None):
        """The next authenticated channel; None if none came within `timeout` s."""
        self._idle.set()
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            self._idle.clear()

    def close(self):
        self._closed = True
        self._thread.join(5)
        with self._lock:
            for sock in list(self._pending):
                self._cut(sock)
        while not self._ready.empty():
            self._ready.get_nowait().close()

    @staticmethod
    def _cut(sock):
        # wakes the handshake thread blocked on it; it then closes the socket
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self):
        while not self._closed:
            self._cut_expired()
            try:
                sock, peer = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError as e:  # out of fds, a reset before accept: try again later
                log.warning("accept failed: %s", e)
                time.sleep(_TICK_S)
                continue
            with self._lock:
                if len(self._pending) >= MAX_PENDING:
                    oldest = next(iter(self._pending))
                    log.warning("%d handshakes under way: cutting the oldest", len(self._pending))
                    self._cut(oldest)
                    del self._pending[oldest]
                self._pending[sock] = time.monotonic() + self.deadline_s
            threading.Thread(target=self._handshake, args=(sock, peer), name="handshake", daemon=True).start()

    def _cut_expired(self):
        now = time.monotonic()
        with self._lock:
            for sock, deadline in list(self._pending.items()):
                if deadline <= now:
                    self._cut(sock)
                    del self._pending[sock]

    def _handshake(self, sock, peer):
        name = "%s:%d" % peer[:2]
        deadline = time.monotonic() + self.deadline_s
        raw = sock
        try:
            wire.tune(sock)
            sock.settimeout(self.deadline_s)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            channel = wire.Channel(sock, name, deadline=deadline)
            channel.server_handshake(self.key, self.mode)
        except (ProtocolError, OSError) as e:  # ssl.SSLError is an OSError
            log.warning("refused %s: %s", name, e)
            sock.close()
            return
        finally:
            with self._lock:
                cut = self._pending.pop(raw, None) is None
        if cut:  # past its deadline or evicted, yet it got through just then
            channel.close()
            return
        if channel.stream:  # a page stream of a session under way: never a session of its own
            if self.streams is None:
                log.warning("refused page stream from %s: this serve takes none", name)
                channel.send_error("page stream refused: this serve takes none")
                channel.close()
                return
            # its STREAM within what is left of the handshake's deadline
            channel.sock.settimeout(max(0.1, deadline - time.monotonic()))
            self.streams.attach(channel)
            return
        try:
            # serve may be just finishing a session (a source asking OUTCOME
            # right after closing one, a run right after another): wait a little
            if not self._idle.wait(BUSY_GRACE_S):
                raise queue.Full
            self._ready.put_nowait(channel)
        except queue.Full:
            log.warning("refused %s: busy with another migration", name)
            channel.send_error("busy with another migration: try again later")
            channel.close()
