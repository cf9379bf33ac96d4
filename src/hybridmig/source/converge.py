"""Auto-converge: slow a process tree down while pre-copy cannot keep up.

When the tree writes pages about as fast as the link carries them, rounds
never shrink and the last one is the whole memory, sent with the tree
frozen. QEMU's answer for VMs is to throttle the guest's CPUs; ours holds
every thread of the tree in a ptrace stop for a share of the time: runs of
20 ms alternate with holds of share / (1 - share) x 20 ms, as QEMU sleeps a
vCPU after each timeslice (5 ms held at 20 %, 180 ms at 90 %, 2 s at 99 %).
The share starts at 20 % and goes up by 10 points per round that did not
halve the work left, up to 99 %, as QEMU's defaults. Only holds longer
than a workload's own catch-up horizon matter: a paced writer that makes up
for lost time (memwork catches up on up to 100 ms) is only slowed by holds
longer than that, and 10 points a round take 8 rounds to get there (180 ms
at 90 %), minutes at 4 GiB. So a raise that did not slow the tree's writes
by half of what its share should have is followed by holds 4 times as long
instead (5, 20, 80, 320 ms: 20, 50, 80, 94 %).

Why ptrace stops and not SIGSTOP/SIGCONT or a cgroup: a ptrace stop ends
with its tracer. If `hybridmig run` dies, even by SIGKILL, the kernel
detaches its tracees and they run on; a SIGSTOP sent before such a death
would leave the tree stopped for good. Nothing of the tree changes either:
no job-control signal its parent could see, no cgroup CRIU would dump.

The ptrace calls must come from the thread that seized: one thread here does
every freeze and thaw. Anything else that needs the tree not traced (the
dirty tracker injects into new children with ptrace; CRIU seizes the tree)
runs inside ``paused()``, which cuts a hold short, or after ``stop()``."""

import contextlib
import logging
import threading
import time

from ..bindings.tracker import Frozen
from ..errors import NativeError

log = logging.getLogger("hybridmig.source.converge")

RUN_SLICE_S = 0.02
INITIAL, INCREMENT, MAXIMUM = 0.20, 0.10, 0.99
LONGER = 4  # holds this many times longer after a raise that did not slow the writes


def hold_s(share):
    return RUN_SLICE_S * share / (1 - share)


def share_of_hold(hold):
    return hold / (hold + RUN_SLICE_S)


def slowed_down(rate_before, share_before, rate_now, share_now):
    """Whether raising the share from share_before to share_now slowed the
    writes (pages/s) by at least half of what it should have, writes being
    proportional to the time the tree runs."""
    if share_now <= share_before or rate_before <= 0:
        return True
    expected = rate_before * (1 - share_now) / (1 - share_before)
    return rate_now <= rate_before - 0.5 * (rate_before - expected)


class AutoConverge(threading.Thread):
    """``pids()`` gives the tree's processes; ``raise_throttle()`` after a
    round that did not converge; ``hold_all()`` once pre-copy converged;
    ``stop()`` when CRIU is about to seize the tree, or on any failure."""

    def __init__(self, pids):
        super().__init__(name="auto-converge", daemon=True)
        self.pids = pids
        self.share = 0.0
        self.held_s = 0.0  # total time the tree was held, for the report
        self._lock = threading.Lock()  # held while the tree is frozen
        self._done = threading.Event()
        self._interrupt = threading.Event()  # ends a hold early: stop() or paused()

    @property
    def at_maximum(self):
        return self.share >= MAXIMUM

    def raise_throttle(self, slowed=True):
        """Hold the tree longer: `slowed` is whether the last raise slowed
        its writes (slowed_down); if not, holds get LONGER times longer."""
        if self.share == 0:
            self.share = INITIAL
        elif slowed:
            self.share = min(MAXIMUM, self.share + INCREMENT)
        else:
            self.share = min(MAXIMUM, share_of_hold(hold_s(self.share) * LONGER))
        log.info("auto-converge: the tree is held %.0f %% of the time", self.share * 100)
        if not self.is_alive():
            self.start()

    @contextlib.contextmanager
    def paused(self):
        """``with converge.paused():`` the tree is not held meanwhile."""
        self._interrupt.set()
        with self._lock:
            self._interrupt.clear()
            yield

    def hold_all(self):
        """Hold the tree from now until stop(): pre-copy converged and the
        switch-over starts. At full speed through CRIU's start-up, a tree
        that needed throttling would dirty far more than the last round
        left; held, it only runs in the instant between stop() (at CRIU's
        pre-dump) and CRIU's own freeze."""
        if self.share:
            self.share = 1.0

    def run(self):
        while not self._done.is_set():
            share = self.share
            hold = hold_s(share) if share < 1 else None  # None: until stop()
            with self._lock:
                if self._done.is_set():
                    break
                t0 = time.monotonic()
                frozen = self._freeze()
                try:
                    self._interrupt.wait(hold)
                finally:
                    for f in frozen:
                        f.thaw()
                self.held_s += time.monotonic() - t0
            self._done.wait(RUN_SLICE_S)

    def _freeze(self):
        frozen = []
        for pid in self.pids():
            try:
                frozen.append(Frozen(pid))
            except NativeError as e:  # exited meanwhile, or being traced by someone else: skip it this time
                log.debug("auto-converge: cannot hold %d: %s", pid, e)
        return frozen

    def stop(self):
        """Stop throttling; returns once the tree is no longer held."""
        self._done.set()
        self._interrupt.set()
        if self.is_alive():
            self.join()
