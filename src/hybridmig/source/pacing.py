"""The default pace of pre-copy: as fast as the process tree lets it.

Pre-copy's data path (reading, sealing, sending; on one machine also the
destination's receiving and storing) takes CPU, and where the tree wants
the same CPUs it loses pace (docs/bench-wire.md: a CPU-bound writer kept
0.6-0.7 of its pace during an unlimited round 0 on 2 vCPUs). Which share a
process gets is not ours to set: nice values count only within a session's
autogroup (the tree's is not run's) and within a cgroup (a container's is
not run's). What can be seen from outside is whether the tree is starved:
each thread's time waiting for a CPU while runnable (the second field of
/proc/PID/task/TID/schedstat) against its time running. So run watches
that share, running / (running + waiting), over windows of WINDOW_S, and
when the tree gets less than `keep` of the CPU it asks for, it lowers its
own rate (a limit at DOWN of what it sent in that window, never below
FLOOR); while the tree gets what it asks for, the limit rises by UP per
window and is dropped once it is well above what is sent, or at once
when the tree asks for almost no CPU in a window (idle). A tree that
waits for other reasons (another process, the host) slows pre-copy too:
the choice is the tree's pace over the round's. An idle tree asks for
nothing and pre-copy runs at full speed."""

import logging
import os
import time

log = logging.getLogger("hybridmig.source.pacing")

WINDOW_S = 0.25
DOWN, UP = 0.7, 1.15
FLOOR = 32 << 20  # bytes/s: a tree starved by others still migrates
# below this much running + waiting (s) in a window the tree asks for too
# little CPU to say whether it is starved
MIN_ASKED_S = 0.02


def tree_cpu(pids):
    """(s running, s waiting for a CPU) summed over every thread of pids."""
    run = wait = 0
    for pid in pids:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue  # exited
        for tid in tids:
            try:
                with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                    fields = f.read().split()
            except OSError:
                continue
            run += int(fields[0])
            wait += int(fields[1])
    return run / 1e9, wait / 1e9


class Pacer:
    """The limit pre-copy keeps to (bytes/s, 0: none), adapted every
    WINDOW_S to the tree's CPU share. `pids()` gives the tree's processes."""

    def __init__(self, pids, keep):
        self.pids = pids
        self.keep = keep
        self.limit = 0
        self.starved = 0  # windows in which the tree was starved
        self.run_s = self.wait_s = 0.0  # the tree's CPU time running, and waiting, over the windows
        self._t = time.monotonic()
        self._cpu = tree_cpu(pids())
        self._sent = 0

    def share(self):
        """The tree's share of the CPU it asked for over the windows so far
        (1.0 if it asked for none)."""
        asked = self.run_s + self.wait_s
        return self.run_s / asked if asked else 1.0

    def account(self, n):
        """n bytes sent; returns the limit to keep to now."""
        self._sent += n
        now = time.monotonic()
        if now - self._t >= WINDOW_S:
            self._window(now)
        return self.limit

    def _window(self, now):
        run, wait = tree_cpu(self.pids())
        d_run, d_wait = run - self._cpu[0], wait - self._cpu[1]
        rate = self._sent / (now - self._t)
        self._t, self._cpu, self._sent = now, (run, wait), 0
        self.run_s += d_run
        self.wait_s += d_wait
        # A window in which the tree asked for too little CPU to tell is
        # an idle tree's: it wants nothing pre-copy could give back, so the
        # limit goes. (Before, such a window returned with the limit
        # unchanged, and one starved window held a tree that then went
        # idle at 0.7 x that window's rate to the round's end: 49 MB/s for
        # 40 s of a 2 GiB round 0, seen here.)
        asked = d_run + d_wait
        if asked < MIN_ASKED_S:
            self.limit = 0
        elif d_run / asked < self.keep:
            self.starved += 1
            self.limit = max(FLOOR, int(DOWN * min(rate, self.limit or rate)))
            log.debug("tree at %.2f of its CPU: pre-copy at %.0f MB/s", d_run / asked, self.limit / 1e6)
        elif self.limit:
            self.limit = int(self.limit * UP)
            if self.limit > 4 * rate:  # far above what is sent: no limit
                self.limit = 0
