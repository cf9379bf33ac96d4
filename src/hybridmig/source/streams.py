"""Page streams on the source (run --streams N, docs/design.md "Page
streams"): the pre-copy rounds' pages over N connections of their own,
beside the control channel, which keeps everything else in order.

A page always goes on stream (vaddr // wire.STREAM_BLOCK) % N. The caller's
thread reads pages into frames, one open frame per stream, and hands full
ones to that stream's thread, which compresses (where it pays), seals and
sends them (both outside the GIL). Frame buffers come from one pool of
FRAME_BUFFERS per stream: a stream whose destination stores slowly fills
its TCP window, its thread blocks in send, the pool runs dry and the reader
waits; memory stays bounded on this side too. A round ends with
STREAM_ROUND on every stream, then ROUND on the control channel (PreCopy).

A stream that breaks fails the migration (the source resumes untouched, as
on any failure before the destination confirmed): no retry."""

import logging
import queue
import socket
import threading
import time
import types

from .. import wire
from ..bindings import PAGE_SIZE
from ..bindings.ranges import Ranges
from ..errors import ProtocolError
from ..messages import Stream
from ..wire import Msg
from .precopy import FRAME_BUFFERS, Sender

log = logging.getLogger("hybridmig.source.streams")
_STOP_POLL_S = 0.1  # how often a thread blocked on a queue looks for a failure


def open_streams(control, session, count, connect):
    """`count` page streams joined to the control channel's session:
    connect() gives a new authenticated channel flagged as a stream."""
    channels = []
    try:
        for index in range(count):
            channels.append(join_session(control, session, index, connect))
    except BaseException:
        for ch in channels:
            ch.close()
        raise
    return channels


def join_session(control, session, index, connect):
    """A new connection (connect()) joined to the control channel's session
    as stream `index` (wire.FAULT_LANE: the fault channel), with its proof."""
    ch = connect()
    try:
        proof = wire.stream_proof(control.binding_key, session, index, ch.transcript)
        ch.send(Msg.STREAM, Stream(session, index, proof.hex()).encode())
        kind, payload = ch.recv()
        if kind != Msg.STREAM or Stream.decode(payload).index != index:
            raise ProtocolError(f"{ch.peer} answered stream {index} with {kind.name}")
    except BaseException:
        ch.close()
        raise
    return ch


class _Lane:
    """One stream: its channel, the frames queued for it, its thread."""

    def __init__(self, index, channel):
        self.index, self.channel = index, channel
        self.queue: queue.Queue = queue.Queue()
        self.thread = None


class StreamSender(Sender):
    """A Sender whose rounds go over page streams (use_streams()); after
    rounds_over() it sends on the control channel as a Sender does (the
    final round, post-copy)."""

    def use_streams(self, channels):
        self.lanes = [_Lane(i, ch) for i, ch in enumerate(channels)]
        n = len(channels)
        # [scratch byte][head][data], as Sender's: FRAME_BUFFERS per stream
        self._pool: queue.Queue[bytearray] = queue.Queue()
        for _ in range(FRAME_BUFFERS * n):
            self._pool.put(bytearray(self._data_at + self.frame_pages * PAGE_SIZE))
        self._lock = threading.Lock()  # the round's stats, from every stream's thread
        self._error = None  # why a stream failed: raised in the caller's thread
        self._closing = False
        self._rnd = None
        self.streaming = True
        for lane in self.lanes:
            lane.thread = threading.Thread(target=self._lane_loop, args=(lane,), name="stream-%d" % lane.index)
            lane.thread.daemon = True
            lane.thread.start()

    streaming = False
    lanes: list = []

    def start_round(self, rnd):
        """ROUND_START on the control channel: what it sent before (the
        scan's INVALIDATEs) is applied before any stream page of the round."""
        super().start_round(rnd)
        if not self.streaming:
            return
        self._rnd = rnd
        self.channel.send(Msg.ROUND_START, wire.encode_round_number(rnd.number))

    def end_round(self, rnd):
        """STREAM_ROUND on every stream, once its frames are sent."""
        if not self.streaming:
            self._raise_failed()
            return
        done = self._ended = threading.Event()
        self._ending = len(self.lanes)
        for lane in self.lanes:
            lane.queue.put(("end", rnd.number))
        t = time.perf_counter()
        while not done.wait(_STOP_POLL_S):
            self._raise_failed()
        self._raise_failed()
        with self._lock:  # the last frames on their way: the streams' pace
            rnd.send_s += time.perf_counter() - t

    def rounds_over(self):
        super().rounds_over()
        self.end_streams()

    def end_streams(self):
        """The rounds are over: the streams close; pages go on the control
        channel from now on."""
        if not self.streaming:
            return
        self.streaming = False
        for lane in self.lanes:
            lane.queue.put(None)
        for lane in self.lanes:
            lane.thread.join(30)
            lane.channel.close()
        self._raise_failed()

    def close(self):
        """On failure: every stream cut at once (a thread blocked in send
        wakes up), their threads gone."""
        if not self.lanes:
            return
        self.streaming, self._closing = False, True
        self._cut_all()
        for lane in self.lanes:
            lane.queue.put(None)
        for lane in self.lanes:
            lane.thread.join(10)

    def _cut_all(self):
        """Every stream shut down: a thread blocked in send wakes up."""
        for lane in self.lanes:
            try:
                lane.channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lane.channel.close()

    def _raise_failed(self):
        if self._error is not None:
            raise ProtocolError(self._error)

    # --- the reader (the caller's thread) ------------------------------------

    def _send_ranges(self, pid, ranges, rnd):
        if not self.streaming:
            super()._send_ranges(pid, ranges, rnd)
            return
        self._raise_failed()
        frames: dict[int, list] = {}  # stream -> [buf, extents, npages, ndata]: its open frame
        try:
            self._read_into_streams(pid, ranges, rnd, frames)
        finally:  # (a process gone, a stream failed: the buffers of open frames go back)
            for buf, *_ in frames.values():
                self._pool.put(buf)

    def _read_into_streams(self, pid, ranges, rnd, frames):
        n = len(self.lanes)
        key = self.keys[pid]
        held = self.held.setdefault(key, Ranges())
        for start, end in ranges:
            at = start
            while at < end:
                index = wire.stream_of(at, n)
                block_end = min(end, (at // wire.STREAM_BLOCK + 1) * wire.STREAM_BLOCK)
                f = frames.get(index)
                if f is None:
                    f = frames[index] = [self._take(), [], 0, 0]
                buf, extents, npages, ndata = f
                # (pages_sent and the like: only this thread writes them)
                f[2], f[3], at = self._read_piece(pid, held, buf, extents, npages, ndata, at, block_end, rnd, rnd)
                if f[2] >= self.frame_pages:
                    self.lanes[index].queue.put((buf, key, extents, f[3], rnd))
                    del frames[index]
        for index in list(frames):
            buf, extents, _npages, ndata = frames.pop(index)
            if extents:
                self.lanes[index].queue.put((buf, key, extents, ndata, rnd))
            else:
                self._pool.put(buf)

    def _take(self):
        t = time.perf_counter()
        while True:
            self._raise_failed()
            try:
                buf = self._pool.get(timeout=_STOP_POLL_S)
            except queue.Empty:
                continue
            if self._rnd is not None:
                with self._lock:  # waiting for the streams: their pace
                    self._rnd.send_s += time.perf_counter() - t
            return buf

    # --- each stream's thread -------------------------------------------------

    def _lane_loop(self, lane):
        try:
            while True:
                item = lane.queue.get()
                if item is None:
                    return
                if item[0] == "end":
                    lane.channel.send(Msg.STREAM_ROUND, wire.encode_round_number(item[1]))
                    with self._lock:
                        self._ending -= 1
                        if not self._ending:
                            self._ended.set()
                    continue
                buf, key, extents, ndata, rnd = item
                try:
                    self._flush_on(lane, buf, key, extents, ndata, rnd)
                finally:
                    self._pool.put(buf)
        except Exception as e:  # noqa: BLE001 -- raised in the reader's thread
            if not self._closing and self._error is None:
                self._error = f"page stream {lane.index} failed: {e}"
                log.error("%s", self._error)
            self._cut_all()  # the others would block the reader

    def _flush_on(self, lane, buf, key, extents, ndata, rnd):
        """Sender._flush on this stream's channel, the stats added to the
        round's under the lock (the streams' times overlap: summed)."""
        clock = types.SimpleNamespace(encode_s=0.0, seal_s=0.0, send_s=0.0, frames=0, bytes_wire=0, frames_lz4=0)
        self._flush(buf, key, extents, ndata, clock, channel=lane.channel)
        with self._lock:
            rnd.frames += clock.frames
            rnd.bytes_wire += clock.bytes_wire
            rnd.frames_lz4 += clock.frames_lz4
            rnd.streams_s += clock.encode_s + clock.seal_s + clock.send_s
