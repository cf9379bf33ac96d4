"""Auto-converge: slow a process tree down while pre-copy cannot keep up.

When the tree writes pages about as fast as the link carries them, rounds
never shrink and the last one is the whole memory, sent with the tree
frozen. QEMU's answer for VMs is to throttle the guest's CPUs; ours holds
every thread of the tree in a ptrace stop for a share of each 100 ms period
(the share starts at 20 % and goes up by 10 points per round that did not
halve the work left, up to 99 %, as QEMU's defaults).

Why ptrace stops and not SIGSTOP/SIGCONT or a cgroup: a ptrace stop ends
with its tracer. If `hybridmig run` dies, even by SIGKILL, the kernel
detaches its tracees and they run on; a SIGSTOP sent before such a death
would leave the tree stopped for good. Nothing of the tree changes either:
no job-control signal its parent could see, no cgroup CRIU would dump.

The ptrace calls must come from the thread that seized: one thread here does
every freeze and thaw. Anything else that needs the tree not traced (the
dirty tracker injects into new children with ptrace; CRIU seizes the tree)
runs inside ``paused()`` or after ``stop()``."""
import logging
import threading
import time

from .bindings.tracker import Frozen
from .errors import NativeError

log = logging.getLogger("hybridmig.converge")

PERIOD_S = 0.1
INITIAL, INCREMENT, MAXIMUM = 0.20, 0.10, 0.99


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

    @property
    def at_maximum(self):
        return self.share >= MAXIMUM

    def raise_throttle(self):
        self.share = INITIAL if self.share == 0 else min(MAXIMUM, self.share + INCREMENT)
        log.info("auto-converge: the tree is held %.0f %% of the time", self.share * 100)
        if not self.is_alive():
            self.start()

    def paused(self):
        """``with converge.paused():`` the tree is not held meanwhile."""
        return self._lock

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
            with self._lock:
                if self._done.is_set():
                    break
                t0 = time.monotonic()
                frozen = self._freeze()
                try:
                    while not self._done.is_set():
                        left = t0 + PERIOD_S * self.share - time.monotonic()
                        if self.share < 1.0 and left <= 0:
                            break
                        self._done.wait(PERIOD_S if self.share >= 1.0 else left)
                finally:
                    for f in frozen:
                        f.thaw()
                self.held_s += time.monotonic() - t0
            self._done.wait(PERIOD_S * (1 - self.share))

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
        if self.is_alive():
            self.join()
