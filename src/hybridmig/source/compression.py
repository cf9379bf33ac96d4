"""lz4 where it pays, on the source: whether a frame shrinks (a sample of
its pages), and whether shrinking makes the rounds faster on this link and
these two ends (LinkProbe, measured within the rounds; docs/design.md "lz4
where it pays")."""

import logging
import statistics
import threading
import time

from .. import wire
from ..bindings import PAGE_SIZE

log = logging.getLogger("hybridmig.source.compression")


class Compression:
    """lz4 where it pays, two questions. Does a frame shrink: a sample of
    PROBE_PAGES pages spread over it, each alone (~1 % of compressing it),
    so that random or dense memory costs almost nothing. And does shrinking
    make the round faster: over a slow link lz4 wins by its ratio, over a
    fast one the destination's decompression can cost more CPU than the
    bytes it saves (on 2 vCPUs it did: docs/results.md). Time blocked in
    send cannot tell a slow link from a slow destination, so the round
    measures it (LinkProbe): frames that shrink go compressed or raw as the
    probe's window says, then as it decided."""

    PROBE_PAGES = 4
    PROBE_RATIO = 0.9  # the sample must shrink below this share of its size

    def __init__(self, enabled=True, probe=None):
        self.enabled = enabled
        self.probe = probe if probe is not None else LinkProbe()

    def shrinks(self, data):
        n = len(data) // PAGE_SIZE
        if not self.enabled or not n:
            return False
        step = max(1, n // self.PROBE_PAGES)
        sample = [data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(step // 2, n, step)]
        packed = sum(len(wire.lz4_compress(page)) for page in sample)
        return packed < self.PROBE_RATIO * len(sample) * PAGE_SIZE


class LinkProbe:
    """Whether compressing the frames that shrink pays on this link and
    these two ends, measured. Windows of `window` bytes on the wire go in
    the order of ORDER, the shrinking frames compressed in the lz4 windows
    only; a window's pace is its data bytes over its wall time (reads,
    sends, the destination's pace behind them). Only a window that follows
    one of its own mode is measured: up to ~10 MiB of frames wait in the
    two ends' socket buffers, so a window's first bytes on the wire pay
    for the window before it (a raw window after an lz4 one waits for the
    destination to decompress what was queued, an lz4 window after a raw
    one gets ~7 data bytes of credit per byte drained: both seen here,
    the choice biased to lz4 when windows were counted in data bytes and
    all measured). The first window warms up (TCP's window opening, the
    destination's first stores: 7-16 % slower whatever its mode) and
    follows the choice so far. Each mode's pace is the median of its
    measured windows'. lz4 must earn its CPU on both ends: it is chosen if
    LZ4_MARGIN faster, raw otherwise (a tie too: the same pace for less
    CPU), but for windows most of whose data could not shrink (nothing to
    compare: lz4 for the frames that do, as before the probe). A measured
    raw window whose pace so far is under 1/RAW_CUT of lz4's ends the
    probe, lz4 chosen: on a slow link, where lz4 wins most, the probe
    costs one raw window and a frame. The choice holds for HOLD_WINDOWS windows' data
    bytes, then the probe runs again. Thread-safe (page streams)."""

    # the margins: windows of random memory (the same frames in both modes)
    # came out 0.70-3.37 x apart on this project's busy 2-vCPU machine, 7 of 12
    # within 1.25 x; a slow link puts raw 5-7 x behind (docs/bench-wire.md)
    # a window, bytes on the wire: 1/WINDOWS_PER_ROUND0 of round 0 (expect())
    # within these bounds, over the socket buffers' ~10 MiB on a fast link
    MIN_WINDOW, MAX_WINDOW = 2 << 20, 16 << 20
    WINDOWS_PER_ROUND0 = 128
    HOLD_WINDOWS = 128
    LZ4_MARGIN = 1.25
    RAW_CUT = 3.0
    MIN_SHRINKING = 0.5  # share of a window's data in frames that shrink, for it to count
    # compressed?, per window of a probe (None: warming up, as chosen); measured:
    # the windows after one of their own mode (lz4 twice, at both ends: a drift cancels)
    ORDER = (None, True, True, False, False, False, False, True, True)

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.window = self.MAX_WINDOW
        self.choice = True  # compress the frames that shrink (until a probe says otherwise)
        self._lock = threading.Lock()
        self.probes = []  # one dict per finished probe: paces (MB/s) and the choice (run --json)
        self._start_probe()

    def _start_probe(self):
        self._window = 0  # index into ORDER; len(ORDER): holding the choice
        self._t0 = None  # the open window's start (None: at its first frame)
        self._wire = self._data = self._shrinking = 0
        self._paces: dict[bool, list[float]] = {True: [], False: []}  # mode -> its windows' paces, bytes/s
        self._short = False  # the probe's windows had too few frames that shrink
        self._held = 0

    def expect(self, nbytes):
        """Round 0 will send about nbytes: windows sized to it."""
        with self._lock:
            self.window = min(self.MAX_WINDOW, max(self.MIN_WINDOW, nbytes // self.WINDOWS_PER_ROUND0))

    @property
    def probing(self):
        """Whether a probe is under way: only then does sent() count the
        frames that shrink. (Read without the lock: a stale answer falls
        in a probe's first window, the warm-up, which is not measured.)"""
        return self._window < len(self.ORDER)

    def settle(self):
        """The rounds are over: the choice holds from now on (post-copy's
        pages come one fault at a time: no pace to measure)."""
        with self._lock:
            self._window, self._held = len(self.ORDER), -(1 << 62)

    def restart_window(self):
        """Between rounds: the time in between (the scan, the ack) is no one's."""
        with self._lock:
            self._t0 = None
            self._wire = self._data = self._shrinking = 0

    def compress(self):
        """Whether to compress a frame that shrinks, now (called for every
        frame: the open window's clock starts at its first)."""
        with self._lock:
            if self._t0 is None:
                self._t0 = self.clock()
            mode = self.ORDER[self._window] if self._window < len(self.ORDER) else None
            return self.choice if mode is None else mode

    def sent(self, data, wire, shrinking):
        """A frame of `data` data bytes went out as `wire` bytes (shrinking:
        its data would shrink)."""
        with self._lock:
            if self._window >= len(self.ORDER):
                self._held += data
                if self._held >= self.HOLD_WINDOWS * self.window:
                    self._start_probe()
                return
            self._wire += wire
            self._data += data
            self._shrinking += data if shrinking else 0
            now = self.clock()
            took = max(now - self._t0 if self._t0 is not None else 0.0, 1e-9)
            lz4 = self.ORDER[self._window]
            measured = lz4 is not None and self.ORDER[self._window - 1] == lz4
            cut = measured and not lz4 and self._data / took * self.RAW_CUT < statistics.median(self._paces[True])
            if self._wire < self.window and not cut:
                return
            if measured:
                self._short |= self._shrinking < self.MIN_SHRINKING * self._data
                self._paces[bool(lz4)].append(self._data / took)
            self._t0, self._wire, self._data, self._shrinking = now, 0, 0, 0
            self._window = len(self.ORDER) if cut else self._window + 1
            if self._window == len(self.ORDER):
                self._decide(bool(cut))

    def _decide(self, cut):
        pace = {mode: statistics.median(p) / 1e6 if p else 0.0 for mode, p in self._paces.items()}
        self.choice = bool(cut or self._short or pace[True] > self.LZ4_MARGIN * pace[False])
        self.probes.append(
            {
                "lz4_mb_s": round(pace[True], 1),
                "raw_mb_s": round(pace[False], 1),
                "raw_cut": cut,
                "too_few_shrinking": self._short,
                "lz4": self.choice,
            }
        )
        log.info(
            "lz4 probe: %.0f MB/s compressed, %.0f raw: %s", pace[True], pace[False], "lz4" if self.choice else "raw"
        )
