"""Page streams on the destination (run --streams N, docs/design.md "Page
streams").

A session whose source announced N streams (STREAMS on the control
channel) takes N more connections, each authenticated like the control
channel (same key, mode, TLS) and proving with STREAM that it belongs to
that session (wire.stream_proof, under the control channel's binding key).
Each stream has a thread that stores its PAGES frames (the store's puts
release the GIL), one frame at a time: a slow store stalls the stream's
TCP window, and so the source; nothing queues here.

Ordering: a stream applies frames of round r only between the control
channel's ROUND_START r and ROUND r, and ROUND r is acknowledged only once
every stream has applied its frames of round r (its STREAM_ROUND r came).
So between rounds no stream writes the store: what the control channel
orders there (INVALIDATE, the final round's PAGES, STALE, RESTORE) comes
after every stream page of the rounds before it, and before the next's."""

import hmac
import logging
import socket
import threading
import time
from typing import Any

from .. import wire
from ..bindings import PAGE_SIZE
from ..errors import ProtocolError
from ..messages import Stream
from ..wire import Msg

log = logging.getLogger("hybridmig.destination.streams")
MAX_STREAMS = 8  # page streams one session may have (serve's cap)
JOIN_WAIT_S = 10.0  # ROUND_START 0 waits this long for streams still in their handshake
IDLE_S = 600  # a stream silent this long in a round fails (serve's SESSION_IDLE_S)


def check_proof(binding_key, session_id, channel, body, what):
    """STREAM's proof, or ProtocolError: a MAC under the control channel's
    binding key over the session, the index and this connection's own
    handshake (wire.stream_proof)."""
    try:
        proof = bytes.fromhex(body.proof)
    except ValueError:
        proof = b""
    expect = wire.stream_proof(binding_key, session_id, body.index, channel.transcript)
    if not hmac.compare_digest(proof, expect):
        raise ProtocolError(f"{what} failed its session proof")


class Registry:
    """Sessions that take page streams, by session id: the acceptor hands
    each stream connection here (Acceptor.streams)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id = {}
        self._faults = {}  # session id -> its FaultLane

    def add(self, session_id, streams):
        with self._lock:
            self._by_id[session_id] = streams

    def add_faults(self, session_id, lane):
        """The session's fault channel (destination/faults.py) joins here,
        as a page stream of index wire.FAULT_LANE."""
        with self._lock:
            self._faults[session_id] = lane

    def remove(self, session_id):
        with self._lock:
            self._by_id.pop(session_id, None)
            self._faults.pop(session_id, None)

    def attach(self, channel):
        """An authenticated stream connection (in the acceptor's handshake
        thread): its STREAM, checked, joins its session; anything else is
        refused (ERROR, logged, closed) and never touches a store."""
        try:
            kind, payload = channel.recv()
            if kind != Msg.STREAM:
                raise ProtocolError(f"a page stream that starts with {kind.name}, not STREAM")
            body = Stream.decode(payload)
            with self._lock:
                by_id = self._faults if body.index == wire.FAULT_LANE else self._by_id
                target = by_id.get(body.session)
            if target is None:
                raise ProtocolError(
                    "a %s for an unknown or finished session"
                    % ("fault channel" if body.index == wire.FAULT_LANE else "page stream")
                )
            target.attach(channel, body)
        except ProtocolError as e:
            log.warning("refused page stream from %s: %s", channel.peer, e)
            channel.send_error(f"page stream refused: {e}")
            channel.close()


class StreamSet:
    """The page streams of one session. `store(key, extents, data)` puts a
    PAGES body into the session's store (thread-safe); `broken(why)` ends
    the session (a stream failed)."""

    def __init__(self, session_id, count, binding_key, store, broken):
        self.session_id, self.count, self.binding_key = session_id, count, binding_key
        self._store, self._broken = store, broken
        self.cond = threading.Condition()
        self.channels: list[Any] = [None] * count
        self.threads = []
        self.started = -1  # the round whose stream pages may be applied (ROUND_START)
        self.acked = -1  # the last round the control channel ended (ROUND)
        self.done = [-1] * count  # the last round each stream finished (STREAM_ROUND)
        self.closed = False  # the rounds are over: streams apply nothing more
        self.error = None
        self._stats = dict(frames=0, recv_s=0.0, store_s=0.0)

    # --- the acceptor's side -------------------------------------------------

    def attach(self, channel, body):
        if not 0 <= body.index < self.count:
            raise ProtocolError(f"stream {body.index} beyond the {self.count} announced")
        check_proof(self.binding_key, self.session_id, channel, body, f"stream {body.index}")
        with self.cond:
            if self.closed or self.error is not None:
                raise ProtocolError("a page stream for a session whose rounds are over")
            if self.channels[body.index] is not None:
                raise ProtocolError(f"stream {body.index} has joined already")
            self.channels[body.index] = channel
            channel.send(Msg.STREAM, body.encode())
            channel.sock.settimeout(IDLE_S)
            th = threading.Thread(target=self._read, args=(body.index, channel), name="stream-%d" % body.index)
            th.daemon = True
            self.threads.append(th)
            th.start()
            self.cond.notify_all()
        log.info("page stream %d of %d joined from %s", body.index + 1, self.count, channel.peer)

    # --- each stream's thread ------------------------------------------------

    def _read(self, index, channel):
        rnd = 0
        try:
            while True:
                with self.cond:
                    while self.started < rnd and not self.closed and self.error is None:
                        self.cond.wait()
                    if self.closed or self.error is not None:
                        return
                t = time.perf_counter()
                kind, payload = channel.recv(transient=True)
                t_got = time.perf_counter()
                if kind == Msg.PAGES:
                    key, extents, data = wire.decode_pages(payload)
                    for vaddr, npages, _zero in extents:
                        self._check_owner(index, vaddr, npages)
                    self._store(key, extents, data)
                    with self.cond:
                        self._stats["frames"] += 1
                        self._stats["recv_s"] += t_got - t
                        self._stats["store_s"] += time.perf_counter() - t_got
                elif kind == Msg.STREAM_ROUND:
                    if wire.decode_round_number(payload) != rnd:
                        raise ProtocolError(f"STREAM_ROUND {wire.decode_round_number(payload)} where {rnd} was due")
                    with self.cond:
                        self.done[index] = rnd
                        self.cond.notify_all()
                    rnd += 1
                else:
                    raise ProtocolError(f"unexpected {kind.name} on a page stream")
        except Exception as e:  # noqa: BLE001 -- the session breaks, with the reason
            with self.cond:
                if self.closed or self.error is not None:
                    return
                self.error = f"page stream {index} failed: {e}"
                self.cond.notify_all()
            log.error("%s", self.error)
            self._cut_all()  # the source's stream threads, blocked in their sends, fail now
            self._broken(self.error)

    def _check_owner(self, index, vaddr, npages):
        """A page always comes on the same stream (its block's): no two
        streams ever race on one page."""
        block, last = vaddr // wire.STREAM_BLOCK, (vaddr + npages * PAGE_SIZE - 1) // wire.STREAM_BLOCK
        if npages and (block != last or wire.stream_of(vaddr, self.count) != index):
            raise ProtocolError("%d pages at 0x%x are not stream %d's" % (npages, vaddr, index))

    # --- the control channel's side ------------------------------------------

    def start_round(self, number):
        """ROUND_START: the streams may apply round `number`'s pages now."""
        with self.cond:
            if self.closed:
                raise ProtocolError("ROUND_START after the rounds ended")
            if number != self.acked + 1 or self.started != self.acked:
                raise ProtocolError(f"ROUND_START {number} out of turn (round {self.acked} was the last ended)")
            deadline = time.monotonic() + JOIN_WAIT_S
            while None in self.channels and self.error is None and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            if None in self.channels:
                joined = self.count - self.channels.count(None)
                raise ProtocolError(f"round {number} starts with {joined} of {self.count} page streams joined")
            self.started = number
            self.cond.notify_all()

    def end_round(self, number, timeout):
        """ROUND: once every stream has applied its pages of the round (or
        ProtocolError: a stream failed, or stayed silent for `timeout`).
        Returns the streams' stats since the last round."""
        with self.cond:
            if self.started != number or self.acked == number:
                raise ProtocolError(f"ROUND {number} without its ROUND_START")
            deadline = time.monotonic() + timeout
            while min(self.done) < number and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(f"page streams silent for {timeout:.0f}s in round {number}")
                self.cond.wait(left)
            if self.error is not None:
                raise ProtocolError(self.error)
            self.acked = number
            stats, self._stats = self._stats, dict(frames=0, recv_s=0.0, store_s=0.0)
            stats["open_s"] = sum(ch.open_s for ch in self.channels)  # (cumulative: the caller takes deltas)
            return stats

    def in_round(self):
        with self.cond:
            return self.started > self.acked

    def finish(self):
        """The rounds are over (the final round, images, RESTORE): streams
        apply nothing more."""
        with self.cond:
            if self.started > self.acked:
                raise ProtocolError(f"round {self.started} still open on the page streams")
            self.closed = True
            self.cond.notify_all()

    def _cut_all(self):
        with self.cond:
            channels = [ch for ch in self.channels if ch is not None]
        for ch in channels:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread out of recv()
            except OSError:
                pass
            ch.close()

    def close(self):
        """The session's end: every stream closed, its thread gone."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._cut_all()
        for th in self.threads:
            th.join(10)
