"""The fault channel on the destination (docs/design.md, "The fault
channel"): post-copy's FETCHes and their pages on a connection of their
own, so that a fault's pages never queue behind the background push (the
source's unsent bytes, the frame it is sending, this side's receive
buffer).

A session whose source announced it (FAULTS on the control channel) takes
one more connection, authenticated like the control channel and joined as
a page stream joins (STREAM, index wire.FAULT_LANE, the session proof:
streams.Registry). Nothing reads it until the copy is restored in
post-copy; then a thread stores the PAGES that come on it, exactly as the
session's thread stores those of the control channel (the quota, the task
cap, PostCopyPages.pages_arrived). Anything else on it, or the connection
breaking, ends the fault channel only: FETCHes go on the control channel,
as without one, and the faults waiting ask again there."""

import logging
import socket
import threading

from .. import wire
from ..errors import ProtocolError
from ..wire import Msg
from .streams import check_proof

log = logging.getLogger("hybridmig.destination.faults")
IDLE_S = 600  # the fault channel may stay silent this long (serve's SESSION_IDLE_S)


class FaultLane:
    """One session's fault channel: joined at most once, used in post-copy."""

    def __init__(self, session_id, binding_key):
        self.session_id, self.binding_key = session_id, binding_key
        self._lock = threading.Lock()
        self.channel = None
        self.joined = False  # ever: a second join is refused, even after a cut
        self.closed = False
        self.thread = None
        self.error = None  # why it ended, if it broke

    # --- the acceptor's side -------------------------------------------------

    def attach(self, channel, body):
        # (the registry gave it here for its index, FAULT_LANE: bound into the proof)
        check_proof(self.binding_key, self.session_id, channel, body, "the fault channel")
        with self._lock:
            if self.closed:
                raise ProtocolError("a fault channel for a session that is over")
            if self.joined:
                raise ProtocolError("the fault channel has joined already")
            self.joined = True
            self.channel = channel
            channel.send(Msg.STREAM, body.encode())
            channel.sock.settimeout(IDLE_S)
        log.info("fault channel joined from %s", channel.peer)

    # --- post-copy -------------------------------------------------------------

    def start(self, store, remote, over=lambda: False):
        """The copy is restored in post-copy: PAGES on this channel go into
        the store (`store(key, extents, data)`, the session's quota) and to
        `remote` (PostCopyPages), whose FETCHes go out here (send()).
        `over()`: the copy has every page (the source closing the channel
        then is no break)."""
        with self._lock:
            if self.channel is None or self.closed:
                return False
            self.thread = threading.Thread(target=self._read, args=(store, remote, over), name="faults", daemon=True)
            self.thread.start()
        return True

    def send(self, kind, payload):
        """A FETCH on the fault channel; False if there is none (any more)."""
        with self._lock:
            channel = self.channel
        if channel is None:
            return False
        try:
            channel.send(kind, payload)
            return True
        except ProtocolError as e:
            self._lost(f"cannot send on it: {e}")
            return False

    def _read(self, store, remote, over):
        channel = self.channel
        try:
            if channel is None:
                raise ProtocolError("cut before the copy ran")
            while True:
                kind, payload = channel.recv(transient=True)
                if kind != Msg.PAGES:
                    raise ProtocolError(f"unexpected {kind.name} on the fault channel")
                key, extents, data = wire.decode_pages(payload)
                store(key, extents, data)
                remote.pages_arrived(key, extents, data)
        except Exception as e:  # noqa: BLE001 -- only this channel ends: FETCHes go on the control channel
            if over():
                self.close()
            elif self._lost(str(e)):
                remote.fault_channel_lost()

    def _lost(self, why):
        """Ends the channel; True the first time (not on close())."""
        with self._lock:
            channel, self.channel = self.channel, None
            first = channel is not None and not self.closed
            if first:
                self.error = why
        if channel is not None:
            _cut(channel)
        if first:
            log.warning("the fault channel broke (%s): faults go on the control channel", why)
        return first

    def close(self):
        """The session's end."""
        with self._lock:
            self.closed = True
            channel, self.channel = self.channel, None
        if channel is not None:
            _cut(channel)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)


def _cut(channel):
    try:
        channel.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread out of recv()
    except OSError:
        pass
    channel.close()
