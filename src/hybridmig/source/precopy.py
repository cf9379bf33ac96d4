"""Pre-copy on the source: ship the memory of a running process tree to the
destination, then what was written since, round after round, until what is
left is small enough for the switch-over.

What the destination holds is mirrored here as one interval list per task
(`held`): pages sent, minus ranges invalidated. Round 0 sends every tracked
VMA whole; each later round sends the pages the tracker saw written, but
for the hot ones: pages written round after round stay unprotected in the
tracker (keep_hot) and travel once, in the final round, with the tree
frozen. They count in every estimate of that round; when auto-converge
slows the tree down the tracker drops them, so that rounds show it."""

import contextlib
import logging
import queue
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import wire
from ..bindings import PAGE_SIZE
from ..bindings.ranges import Ranges
from ..cpus import data_threads
from ..errors import ProcessGone, ProtocolError
from ..messages import RoundStats, Stored
from ..wire import Msg
from .compression import Compression
from .converge import slowed_down
from .early import EarlySwitch
from .options import DEFAULTS
from .pacing import tree_cpu
from .tracker import TreeTracker, read_run

log = logging.getLogger("hybridmig.source.precopy")
# Pages per PAGES frame (1 MiB), zero pages included; scattered runs share a
# frame. With the data path's threads (cpus.py) 4 MiB frames cost 0.2-1.3
# CPU s/GiB less over both ends (fewer hand-offs); without them, 1 MiB
# frames overlap the two ends better (the socket buffers hold several:
# sealed round 0 at 0.7 of its pace with 4 MiB frames; docs/bench-wire.md).
FRAME_PAGES = 256
WORTHWHILE_MS = 5.0  # a final transfer estimated shorter than this is not worth another round
# Frame buffers of the sender: one being read while the other is sealed and
# sent (a reader thread), the memory of `run`'s data path bounded by them.
FRAME_BUFFERS = 2
# Ranges of fewer pages than this are read and sent by one thread (a
# thread's start costs more than it overlaps).
PIPELINE_MIN_PAGES = 2 * FRAME_PAGES


class _Stopped(Exception):
    """The sender gave up: the reader thread stops."""


class Round(RoundStats):
    """A round's stats, as ROUND carries them (messages.RoundStats: a new
    stat goes there)."""

    @property
    def pages_owed(self):
        """What the destination lacks after the scan: what the final round
        would send if the rounds stopped here."""
        return self.pages_written + self.pages_hot

    def ended(self, t0, cpu0):
        """The round's time since monotonic t0 and its CPU since process_time cpu0."""
        self.duration_s = time.monotonic() - t0
        self.cpu_s = time.process_time() - cpu0
        if self.duration_s > 0:
            self.rate_mb_s = self.bytes_raw / self.duration_s / 1e6


def track(pid, keep_hot=True):
    """The tracker pre-copy uses: hot pages kept for the final round."""
    return TreeTracker(pid, keep_hot=keep_hot)


def ns_pid(host_pid):
    """The pid of host_pid in its own (innermost) pid namespace: CRIU's images,
    and so the destination's store, know tasks by that pid."""
    with open("/proc/%d/status" % host_pid) as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return host_pid


def _pages(ranges):
    return sum((e - s) // PAGE_SIZE for s, e in ranges)


def _first_bytes(ranges, budget):
    """(the first `budget` bytes of sorted ranges, the budget left)."""
    out = []
    for start, end in ranges:
        if budget <= 0:
            break
        end = min(end, start + budget)
        out.append((start, end))
        budget -= end - start
    return out, budget


class Throttle:
    """A token bucket over bytes put on the wire: at --bandwidth-limit, and
    (pacer, source/pacing.py) at the limit that keeps the tree's CPU share,
    whichever is lower."""

    def __init__(self, bytes_per_s, pacer=None):
        self.limit = bytes_per_s
        self.pacer = pacer
        self.rate = bytes_per_s
        self.t = time.monotonic()
        self.sent = 0
        self._lock = threading.Lock()  # page streams account from their threads

    def account(self, n):
        with self._lock:
            if self.pacer is not None:
                paced = self.pacer.account(n)
                rate = min(self.limit, paced) if self.limit and paced else self.limit or paced
                if rate != self.rate:  # a new rate counts from now
                    self.rate, self.t, self.sent = rate, time.monotonic(), 0
            if not self.rate:
                return
            self.sent += n
            ahead = self.sent / self.rate - (time.monotonic() - self.t)
        if ahead > 0:
            time.sleep(ahead)

    def stop_pacing(self):
        """From now on --bandwidth-limit alone (the final round: the tree is frozen)."""
        with self._lock:
            self.pacer = None
            self.rate, self.t, self.sent = self.limit, time.monotonic(), 0


@dataclass
class Sender:
    """Reads pages of the source tasks and sends them in PAGES frames of up
    to frame_pages pages, scattered pages gathered into one frame. A frame is
    read straight into one of FRAME_BUFFERS reused buffers, its data pages
    packed by the native read, its head written just before them, and
    sealed and sent from there: no copy of the pages in Python. Where it
    pays (cpus.py), large ranges are read by a reader thread while the
    caller's seals and sends the frame before (both release the GIL);
    frames go out in the order they were read. One caller at a time."""

    channel: wire.Channel
    keys: dict  # host pid -> ns pid (store key)
    root: int = 0  # the tree's root: its exit is an error
    compress: bool = True
    throttle: Throttle | None = None
    held: dict = field(default_factory=dict)  # ns pid -> Ranges held by the destination
    frame_pages: int = FRAME_PAGES
    reader_thread: bool | None = None  # read ahead in a thread (large ranges); None: cpus.data_threads()
    # (pid, start, end) before pages are read (PreCopy's round 0): the
    # tracker forgets what was written there (TreeTracker.refresh)
    refresh: Callable[[int, int, int], None] | None = None

    def __post_init__(self):
        if self.reader_thread is None:
            self.reader_thread = data_threads()
        self.compression = Compression(self.compress)
        # [scratch byte for the sealed type][room for the longest head][data]
        self._data_at = 1 + wire.pages_head_max(self.frame_pages)
        self._bufs = [bytearray(self._data_at + self.frame_pages * PAGE_SIZE) for _ in range(FRAME_BUFFERS)]

    def _flush(self, buf, key, extents, ndata, rnd, channel=None):
        """One frame out on `channel` (default: the control channel)."""
        channel = channel or self.channel
        t = time.perf_counter()
        view = memoryview(buf)
        data = view[self._data_at : self._data_at + ndata * PAGE_SIZE]
        enc, end = wire.RAW, self._data_at + len(data)
        probe = self.compression.probe if self.compression.enabled else None
        lz4 = probe is not None and probe.compress()
        # (the sample costs ~1 % of compressing the frame: not taken while
        # the probe holds a raw choice, when nothing would use it)
        shrinks = probe is not None and (lz4 or probe.probing) and self.compression.shrinks(data)
        if shrinks and lz4:
            packed = wire.lz4_compress(data)
            if len(packed) < len(data):
                data[: len(packed)] = packed
                enc, end = wire.LZ4, self._data_at + len(packed)
                rnd.frames_lz4 += 1
        head = wire.pages_head(key, extents, enc)
        start = self._data_at - len(head)
        view[start : self._data_at] = head
        t_sent, sealing = time.perf_counter(), channel.seal_s
        rnd.encode_s += t_sent - t
        channel.send_from(Msg.PAGES, buf, start, end)
        sealed = channel.seal_s - sealing
        rnd.seal_s += sealed
        rnd.send_s += time.perf_counter() - t_sent - sealed
        rnd.frames += 1
        rnd.bytes_wire += end - start
        if self.throttle:
            self.throttle.account(end - start)
        if probe is not None:
            probe.sent(ndata * PAGE_SIZE, end - self._data_at, shrinks)

    def send_ranges(self, pid, ranges, rnd):
        """Send the pages of ranges of process pid. A process of the tree that
        exits meanwhile is skipped: it has nothing left to migrate."""
        try:
            self._send_ranges(pid, ranges, rnd)
        except ProcessGone:
            if pid == self.root:
                raise
            log.info("pid %d exited during pre-copy", pid)

    def send_on(self, channel, pid, ranges, rnd):
        """The pages of ranges of pid in frames on `channel` (post-copy's
        fault channel), read and sent in this thread."""
        buf = self._bufs[0]
        for _, key, extents, ndata in self._frames(pid, ranges, rnd, lambda: buf, lambda b: None):
            self._flush(buf, key, extents, ndata, rnd, channel=channel)

    def _send_ranges(self, pid, ranges, rnd):
        if self.reader_thread and _pages(ranges) >= PIPELINE_MIN_PAGES:
            self._send_pipelined(pid, ranges, rnd)
            return
        buf = self._bufs[0]
        for _, key, extents, ndata in self._frames(pid, ranges, rnd, lambda: buf, lambda b: None):
            self._flush(buf, key, extents, ndata, rnd)

    def _frames(self, pid, ranges, rnd, take, give, clock=None):
        """Read ranges of pid into frames: yields (buffer, key, extents,
        data pages), each buffer from take() (given back to give() if
        nothing was read into it); the time in reads goes to clock.read_s
        (default: the round's)."""
        clock = clock or rnd
        key = self.keys[pid]
        held = self.held.setdefault(key, Ranges())
        buf, npages, ndata = None, 0, 0
        extents: list = []
        for start, end in ranges:
            at = start
            while at < end:
                if buf is None:
                    buf = take()
                npages, ndata, at = self._read_piece(pid, held, buf, extents, npages, ndata, at, end, rnd, clock)
                if npages >= self.frame_pages:
                    yield buf, key, extents, ndata
                    buf, extents, npages, ndata = None, [], 0, 0
        if extents:
            yield buf, key, extents, ndata
        elif buf is not None:
            give(buf)

    def _read_piece(self, pid, held, buf, extents, npages, ndata, at, end, rnd, clock):
        """Read pages of [at, end) of pid into what is left of the frame in
        buf (npages pages described by extents, ndata of them data);
        returns (npages, ndata, where to read next)."""
        # what is left of the frame: its data space from ndata on
        room = memoryview(buf)[self._data_at + ndata * PAGE_SIZE :][: (self.frame_pages - npages) * PAGE_SIZE]
        if self.refresh is not None:
            self.refresh(pid, at, min(end, at + len(room)))
        t = time.perf_counter()
        got, zero, nd, nxt = read_run(pid, at, end, room)
        clock.read_s += time.perf_counter() - t
        if got:
            extents.append((at, got, zero))
            held.add(at, at + got * PAGE_SIZE)
            npages, ndata = npages + got, ndata + nd
            rnd.pages_sent += got
            rnd.pages_zero += got - nd
            rnd.bytes_raw += nd * PAGE_SIZE
        return npages, ndata, nxt

    def _send_pipelined(self, pid, ranges, rnd):
        """_frames in a reader thread, each frame sent here as soon as it
        is read: reading the next overlaps sealing and sending this one.
        Bounded by the FRAME_BUFFERS buffers; an error on either side stops
        both (the reader's is raised here, after the frames read before it
        are sent, as one thread would). The round's read_s is the time
        spent here waiting for a frame (its parts add up to its duration);
        the reader's own time in reads, overlapping the rest, is
        read_ahead_s."""
        free: queue.Queue[bytearray] = queue.Queue()
        full: queue.Queue[tuple | BaseException | None] = queue.Queue()
        stop = threading.Event()
        clock = types.SimpleNamespace(read_s=0.0)
        for b in self._bufs:
            free.put(b)

        def take():
            while True:
                try:
                    return free.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        raise _Stopped from None

        def reader():
            try:
                for frame in self._frames(pid, ranges, rnd, take, free.put, clock):
                    full.put(frame)
                full.put(None)
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 -- raised in the sending thread
                full.put(e)

        th = threading.Thread(target=reader, name="precopy-reader", daemon=True)
        th.start()
        try:
            while True:
                t = time.perf_counter()
                item = full.get()
                rnd.read_s += time.perf_counter() - t
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                buf, key, extents, ndata = item
                self._flush(buf, key, extents, ndata, rnd)
                free.put(buf)
        finally:
            stop.set()
            th.join()
            rnd.read_ahead_s += clock.read_s

    def expect(self, nbytes):
        """Round 0 will send about nbytes (the lz4 probe sizes its windows)."""
        self.compression.probe.expect(nbytes)

    def start_round(self, rnd):
        """Before a round's pages (page streams: source/streams.py)."""
        self.compression.probe.restart_window()

    def rounds_over(self):
        """The rounds are over: the lz4 choice holds from now on, and the
        tree, frozen next (or served in post-copy), is paced no more."""
        self.compression.probe.settle()
        if self.throttle is not None:
            self.throttle.stop_pacing()

    @property
    def lz4_probes(self):
        """Whether lz4 paid on this link, as each probe of the rounds found (run --json)."""
        return self.compression.probe.probes

    def end_round(self, rnd):
        """After a round's pages, before its ROUND."""

    def adopt(self, pid):
        """A process that joined the tree since the start (a fork); False if
        it has exited already (nothing of it to send)."""
        if pid not in self.keys:
            try:
                self.keys[pid] = ns_pid(pid)
            except FileNotFoundError:
                return False
        return True

    def invalidate(self, pid, ranges):
        key = self.keys[pid]
        held = self.held.setdefault(key, Ranges())
        for start, end in ranges:
            self.channel.send(Msg.INVALIDATE, wire.encode_range(key, start, (end - start) // PAGE_SIZE))
            held.remove(start, end)


class PreCopy:
    """Rounds until convergence. `progress(round)` is called after each."""

    def __init__(
        self,
        tracker,
        sender,
        max_rounds=DEFAULTS.max_rounds,
        target_downtime_ms=DEFAULTS.target_downtime_ms,
        progress=None,
        converge=None,
        switchover_mode="precopy",
        postcopy_after=DEFAULTS.postcopy_after,
    ):
        self.tracker = tracker
        # options.SWITCHOVERS; pre-copy alone unless told (run's default is DEFAULTS.switchover)
        self.switchover = switchover_mode
        self.postcopy_after = postcopy_after
        self.postcopy = False  # the rounds ended in a switch-over to post-copy
        self.stop_reason = None  # why they ended: see next_round
        self.converge = converge  # an AutoConverge, or None
        self.sender = sender
        self.max_rounds = max_rounds
        self.target_downtime_ms = target_downtime_ms
        self.progress = progress or (lambda rnd: None)
        self.rounds = []
        self.pending = {}  # host pid -> dirty ranges seen but not sent (carried to the final round)
        self.bandwidth = 0.0
        self.early = None  # an EarlySwitch that stopped round 0 (auto)

    def _ack(self, rnd):
        """A round marker the destination acknowledges once all before it is stored."""
        t = time.perf_counter()
        self.sender.channel.send(Msg.ROUND, rnd.encode())
        kind, payload = self.sender.channel.recv()
        if kind != Msg.ROUND_ACK or wire.decode_ack(payload)[0] != rnd.number:
            raise ProtocolError("expected the ack of round %d, got %s" % (rnd.number, kind.name))
        if tail := wire.ack_stats(payload):
            dest = Stored.decode(tail)
            rnd.dest_frames, rnd.dest_recv_s, rnd.dest_open_s = dest.frames, dest.recv_s, dest.open_s
            rnd.dest_store_s, rnd.dest_cpu_s = dest.store_s, dest.cpu_s
        rnd.ack_s = time.perf_counter() - t

    def _started(self):
        """What a round's pacing stats count from (see _paced)."""
        pacer = self.sender.throttle.pacer if self.sender.throttle else None
        return tree_cpu(self.tracker.pids()), pacer.starved if pacer else 0

    def _paced(self, rnd, started):
        """The tree's share of the CPU it asked for during the round
        (source/pacing.py), and what pacing did about it."""
        (run0, wait0), starved0 = started
        run, wait = tree_cpu(self.tracker.pids())
        asked = (run - run0) + (wait - wait0)
        rnd.tree_cpu_share = round((run - run0) / asked, 3) if asked > 0 else 1.0
        throttle = self.sender.throttle
        if throttle is not None and throttle.pacer is not None:
            rnd.paced_windows = throttle.pacer.starved - starved0
            rnd.pace_limit_mb_s = throttle.pacer.limit / 1e6

    def _finish(self, rnd, t0, cpu0, started):
        self.sender.end_round(rnd)
        self._ack(rnd)
        rnd.ended(t0, cpu0)
        self._paced(rnd, started)
        if rnd.bytes_wire and rnd.duration_s > 0:
            rate = rnd.bytes_wire / rnd.duration_s
            # A paced round measured the pace, not the link: the final round
            # is not paced (the tree is frozen), so its estimate keeps the
            # faster rate seen, lest a slow estimate buy rounds or throttling.
            if not rnd.paced_windows or rate > self.bandwidth:
                self.bandwidth = rate
        rnd.bandwidth_bps = self.bandwidth
        self.rounds.append(rnd)
        self.progress(rnd)

    def first_round(self, share=1.0):
        """Round 0: every tracked page, or (share < 1, an early post-copy)
        the first `share` of them, task after task in address order."""
        rnd = Round(0)
        t0, cpu0, started = time.monotonic(), time.process_time(), self._started()
        self.sender.start_round(rnd)
        tree = self.tracker.vmas()
        total = sum(_pages(v) for v in tree.values())
        self.sender.expect(total * PAGE_SIZE)
        budget = None if share >= 1 else int(share * total) * PAGE_SIZE
        early = EarlySwitch(self.tracker.peek, total, self._unpace) if self._may_switch_early() else None
        for pid, vmas in tree.items():
            if not self.sender.adopt(pid):
                continue  # forked while the tracker attached, exited since
            if budget is not None:
                vmas, budget = _first_bytes(vmas, budget)
            for piece in early.pieces(pid, vmas) if early else [vmas]:
                rnd.pages_scanned += _pages(piece)
                self.sender.send_ranges(pid, piece, rnd)
            if early and early.stopped:
                self.early = early
                break
        rnd.pages_written = rnd.pages_scanned
        self._finish(rnd, t0, cpu0, started)
        return rnd

    def _unpace(self, why="auto: the tree writes too fast for pre-copy"):
        """No more pacing (source/pacing.py): the rounds as fast as the link
        and --bandwidth-limit allow. Once the tree writes faster than the
        rounds can converge, keeping its CPU share only makes them longer
        and what they send staler: auto's round 0 before its early
        switch-over (source/early.py), and pre-copy once auto-converge slows
        the tree down (pacing would give back the pace it takes away)."""
        if self.sender.throttle is not None and self.sender.throttle.pacer is not None:
            log.info("%s: no longer paced", why)
            self.sender.throttle.stop_pacing()

    def _may_switch_early(self):
        """auto may stop round 0 for post-copy (source/early.py), unless
        auto-converge is asked for instead."""
        return self.switchover == "auto" and self.converge is None

    def scan(self, rnd):
        t = time.monotonic()
        # (the tracker may inject into new children: not while they are held)
        with self.converge.paused() if self.converge else contextlib.nullcontext():
            results = self.tracker.scan()
        rnd.scan_s = time.monotonic() - t
        dirty = {}
        for pid, res in results.items():
            if not self.sender.adopt(pid):
                continue  # a fork that exited since the scan found it
            if res.removed:
                self.sender.invalidate(pid, res.removed)
            rnd.pages_scanned += res.pages_scanned
            dirty[pid] = res.dirty
            rnd.pages_written += _pages(res.dirty)
            rnd.pages_hot += _pages(res.hot)
        return dirty

    def _send(self, rnd, dirty, t0, cpu0, started):
        self.sender.start_round(rnd)  # (after the scan's INVALIDATEs)
        for pid, ranges in dirty.items():
            self.sender.send_ranges(pid, ranges, rnd)
        self._finish(rnd, t0, cpu0, started)

    def round(self, number):
        """One round as next_round sends it, without deciding whether to stop
        (the bench's steady state)."""
        rnd, t0, cpu0, started = Round(number), time.monotonic(), time.process_time(), self._started()
        self._send(rnd, self.scan(rnd), t0, cpu0, started)
        return rnd

    def next_round(self, number):
        """Scan; decide. Returns (round, converged); a converged round sends
        nothing and leaves its dirty pages in self.pending for the final round
        (the tracker still holds the hot ones)."""
        rnd = Round(number)
        t0, cpu0, started = time.monotonic(), time.process_time(), self._started()
        since = self.rounds[-1].duration_s if self.rounds else 0
        dirty = self.scan(rnd)
        owed = rnd.pages_owed
        rnd.dirty_rate_pps = rnd.pages_written / since if since else 0.0
        rnd.est_downtime_ms = (owed * PAGE_SIZE / self.bandwidth * 1000) if self.bandwidth else 0.0
        # Not shrinking: two rounds in a row with no less owed than the one
        # before (one slow round alone lets more pages get dirty).
        history = [r.pages_owed for r in self.rounds[1:]] + [owed]
        stalled = len(history) >= 3 and history[-1] >= 0.95 * history[-2] and history[-2] >= 0.95 * history[-3]
        # Fitting the target is not reason enough to stop: after the long
        # first round the dirty set often fits, yet sending it as one more
        # round (while the process runs) leaves only what gets dirty during
        # that short round, and the hot pages. Stop once another round would
        # not halve what is owed.
        send_s = rnd.pages_written * PAGE_SIZE / self.bandwidth if self.bandwidth else 0.0
        expected_next = rnd.pages_hot + rnd.dirty_rate_pps * send_s
        worth_another = rnd.est_downtime_ms > WORTHWHILE_MS and expected_next < 0.5 * owed
        fits = rnd.est_downtime_ms <= self.target_downtime_ms
        if self.converge is not None:
            rnd.throttle_pct = self.converge.share * 100
            if stalled and not self.converge.at_maximum:
                stalled = False  # slow the tree down further instead of giving up
            # QEMU's rule: the work left not halved by a round (hot pages
            # count: they would be sent frozen)
            if not fits and owed > 0.5 * self.rounds[-1].pages_owed:
                # (a rate with hot pages left out cannot be compared with an exact one)
                last = self.rounds[-1]
                self.converge.raise_throttle(
                    last.pages_hot > 0
                    or rnd.pages_hot > 0
                    or slowed_down(
                        last.dirty_rate_pps, last.throttle_pct / 100, rnd.dirty_rate_pps, self.converge.share
                    )
                )
                self._unpace("auto-converge slows the tree down")
                # hot pages are owed unseen: only exact tracking shows
                # the dirty set shrink as the tree slows down
                self.tracker.drop_hot()
        converged = (fits and not worth_another) or number >= self.max_rounds or stalled
        self._choose(rnd, number, converged, fits, stalled)
        if self.postcopy:
            converged = True
        if converged:
            if self.converge is not None:
                self.converge.hold_all()
            self.pending = dirty
            rnd.ended(t0, cpu0)
            self.rounds.append(rnd)
            self.progress(rnd)
            return rnd, True
        self._send(rnd, dirty, t0, cpu0, started)
        return rnd, False

    def _choose(self, rnd, number, converged, fits, stalled):
        """Why the rounds stop, and whether post-copy takes over: after
        postcopy_after rounds (postcopy), or (auto) where pre-copy would
        throttle or carry a final round over the target: rounds that stop
        halving what is owed, or the last one allowed."""
        if fits:
            self.stop_reason = "fits"
        elif number >= self.max_rounds:
            self.stop_reason = "rounds exhausted (--max-rounds %d)" % self.max_rounds
        elif rnd.pages_hot and rnd.pages_hot >= rnd.pages_written:
            self.stop_reason = "hot set too large (%d pages written round after round)" % rnd.pages_hot
        else:
            self.stop_reason = "link too slow for the dirty rate (%.0f pages/s over %.1f MB/s)" % (
                rnd.dirty_rate_pps,
                self.bandwidth / 1e6,
            )
        if self.switchover == "postcopy":
            self.postcopy = number >= self.postcopy_after
            if self.postcopy_after < 1:
                self.stop_reason = "post-copy after %.0f %% of round 0 (--postcopy-after %g)" % (
                    self.postcopy_after * 100,
                    self.postcopy_after,
                )
        elif self.early is not None:
            self.postcopy = True
            self.stop_reason = (
                "post-copy during round 0: %.0f %% of memory sent, %.1f %% of it stale"
                " (writes at %.2f x round 0's pace: rounds would not converge)"
                % (
                    self.early.pages * 100 / max(1, self.early.total),
                    self.early.stale * 100 / max(1, self.early.pages),
                    self.early.x,
                )
            )
        elif self.switchover == "auto" and self.converge is None and not fits:
            not_halved = rnd.pages_owed > 0.5 * self.rounds[-1].pages_owed
            self.postcopy = not_halved or stalled or (converged and not fits)

    def run(self):
        # Round 0 only, the long one, and only where post-copy may follow
        # (it resends whatever round 0 finds written): a refresh splits the
        # runs the next scan finds written, and hot runs (keep_hot) may then
        # be told a round later (test_precopy's hot-page test saw it).
        if self.switchover != "precopy":
            self.sender.refresh = self.tracker.refresh
        early = self.switchover == "postcopy" and self.postcopy_after < 1
        try:
            self.first_round(self.postcopy_after if early else 1.0)
        finally:
            self.sender.refresh = None
        number = 1
        while True:
            _, converged = self.next_round(number)
            if converged:
                return self.rounds
            number += 1
