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
import time
from dataclasses import asdict, dataclass, field

from .. import wire
from ..bindings import PAGE_SIZE
from ..bindings.ranges import Ranges
from ..errors import ProcessGone
from ..wire import Msg
from .converge import slowed_down
from .options import DEFAULTS
from .tracker import TreeTracker, read_pages

log = logging.getLogger("hybridmig.source.precopy")
BATCH_PAGES = 256  # 1 MiB of pages per PAGES frame
MAX_EXTENTS = 4096  # scattered dirty pages: one frame carries many runs
WORTHWHILE_MS = 5.0  # a final transfer estimated shorter than this is not worth another round


@dataclass
class Round:
    number: int
    pages_scanned: int = 0
    pages_written: int = 0  # to send in this round (or carried to the final one)
    pages_hot: int = 0  # also owed, left for the final round (hot pages)
    pages_sent: int = 0
    pages_zero: int = 0
    bytes_raw: int = 0
    bytes_wire: int = 0
    duration_s: float = 0.0
    scan_s: float = 0.0
    dirty_rate_pps: float = 0.0
    bandwidth_bps: float = 0.0
    est_downtime_ms: float = 0.0
    throttle_pct: float = 0.0  # auto-converge: share of the time the tree was held

    @property
    def pages_owed(self):
        """What the destination lacks after the scan: what the final round
        would send if the rounds stopped here."""
        return self.pages_written + self.pages_hot

    def as_dict(self):
        return asdict(self)


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


class Throttle:
    """--bandwidth-limit as a token bucket over bytes put on the wire."""

    def __init__(self, bytes_per_s):
        self.rate = bytes_per_s
        self.t = time.monotonic()
        self.sent = 0

    def account(self, n):
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.t)
        if ahead > 0:
            time.sleep(ahead)


class Compression:
    """lz4 where it pays: after a run of frames it did not shrink, stop
    trying for a while (a process's memory is often already dense)."""

    SKIP_AFTER, SKIP_FOR = 8, 64

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.misses = 0
        self.skip = 0

    def wanted(self):
        if self.skip:
            self.skip -= 1
            return False
        return self.enabled

    def result(self, shrank):
        self.misses = 0 if shrank else self.misses + 1
        if self.misses >= self.SKIP_AFTER:
            self.misses, self.skip = 0, self.SKIP_FOR


@dataclass
class Sender:
    """Reads pages of the source tasks and sends them in PAGES frames of up
    to BATCH_PAGES pages, scattered pages gathered into one frame."""

    channel: wire.Channel
    keys: dict  # host pid -> ns pid (store key)
    root: int = 0  # the tree's root: its exit is an error
    compress: bool = True
    throttle: Throttle | None = None
    held: dict = field(default_factory=dict)  # ns pid -> Ranges held by the destination

    def __post_init__(self):
        self.compression = Compression(self.compress)

    def _flush(self, key, extents, parts, rnd):
        body, packed = wire.encode_pages(key, extents, b"".join(parts), self.compression.wanted())
        self.compression.result(packed)
        self.channel.send(Msg.PAGES, body)
        rnd.bytes_wire += len(body)
        if self.throttle:
            self.throttle.account(len(body))

    def send_ranges(self, pid, ranges, rnd):
        """Send the pages of ranges of process pid. A process of the tree that
        exits meanwhile is skipped: it has nothing left to migrate."""
        try:
            self._send_ranges(pid, ranges, rnd)
        except ProcessGone:
            if pid == self.root:
                raise
            log.info("pid %d exited during pre-copy", pid)

    def _send_ranges(self, pid, ranges, rnd):
        key = self.keys[pid]
        held = self.held.setdefault(key, Ranges())
        extents, parts, npages = [], [], 0
        for start, end in ranges:
            for b in read_pages(pid, start, end, BATCH_PAGES):
                extents.append((b.vaddr, b.npages, b.zero_bitmap))
                parts.append(b.data)
                npages += b.npages
                held.add(b.vaddr, b.vaddr + b.npages * PAGE_SIZE)
                rnd.pages_sent += b.npages
                rnd.pages_zero += b.nzero
                rnd.bytes_raw += (b.npages - b.nzero) * PAGE_SIZE
                if npages >= BATCH_PAGES or len(extents) >= MAX_EXTENTS:
                    self._flush(key, extents, parts, rnd)
                    extents, parts, npages = [], [], 0
        if extents:
            self._flush(key, extents, parts, rnd)

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
    ):
        self.tracker = tracker
        self.converge = converge  # an AutoConverge, or None
        self.sender = sender
        self.max_rounds = max_rounds
        self.target_downtime_ms = target_downtime_ms
        self.progress = progress or (lambda rnd: None)
        self.rounds = []
        self.pending = {}  # host pid -> dirty ranges seen but not sent (carried to the final round)
        self.bandwidth = 0.0

    def _ack(self, rnd):
        """A round marker the destination acknowledges once all before it is stored."""
        self.sender.channel.send(Msg.ROUND, wire.encode_round(rnd.number, rnd.as_dict()))
        kind, payload = self.sender.channel.recv()
        if kind != Msg.ROUND_ACK or wire.decode_ack(payload)[0] != rnd.number:
            raise wire.ProtocolError("expected the ack of round %d, got %s" % (rnd.number, kind.name))

    def _finish(self, rnd, t0):
        self._ack(rnd)
        rnd.duration_s = time.monotonic() - t0
        if rnd.bytes_wire and rnd.duration_s > 0:
            self.bandwidth = rnd.bytes_wire / rnd.duration_s
        rnd.bandwidth_bps = self.bandwidth
        self.rounds.append(rnd)
        self.progress(rnd)

    def first_round(self):
        rnd = Round(0)
        t0 = time.monotonic()
        for pid, vmas in self.tracker.vmas().items():
            if not self.sender.adopt(pid):
                continue  # forked while the tracker attached, exited since
            rnd.pages_scanned += _pages(vmas)
            self.sender.send_ranges(pid, vmas, rnd)
        rnd.pages_written = rnd.pages_scanned
        self._finish(rnd, t0)
        return rnd

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

    def _send(self, rnd, dirty, t0):
        for pid, ranges in dirty.items():
            self.sender.send_ranges(pid, ranges, rnd)
        self._finish(rnd, t0)

    def round(self, number):
        """One round as next_round sends it, without deciding whether to stop
        (the bench's steady state)."""
        rnd, t0 = Round(number), time.monotonic()
        self._send(rnd, self.scan(rnd), t0)
        return rnd

    def next_round(self, number):
        """Scan; decide. Returns (round, converged); a converged round sends
        nothing and leaves its dirty pages in self.pending for the final round
        (the tracker still holds the hot ones)."""
        rnd = Round(number)
        t0 = time.monotonic()
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
                # hot pages are owed unseen: only exact tracking shows
                # the dirty set shrink as the tree slows down
                self.tracker.drop_hot()
        converged = (fits and not worth_another) or number >= self.max_rounds or stalled
        if converged:
            if self.converge is not None:
                self.converge.hold_all()
            self.pending = dirty
            rnd.duration_s = time.monotonic() - t0
            self.rounds.append(rnd)
            self.progress(rnd)
            return rnd, True
        self._send(rnd, dirty, t0)
        return rnd, False

    def run(self):
        self.first_round()
        number = 1
        while True:
            _, converged = self.next_round(number)
            if converged:
                return self.rounds
            number += 1
