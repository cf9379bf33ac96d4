"""The source tree held stopped by run itself, under CRIU's ptrace hold.

From the moment the destination's copy may run (post-copy's switch-over, a
commit left in doubt) the source must not run again until run or the
operator decides. CRIU holds it with ptrace, and if CRIU dies (killed, out
of memory) the kernel detaches its tracees and the tree runs on beside the
copy. So run also queues a SIGSTOP to every process of the tree while CRIU
still holds it. A tracee cannot take a signal while in tracing stop; once
detached, taking it is the first thing it does, before any instruction of
its own (a syscall-exit stop takes signals before returning to user space),
and it stops instead of running. The stop reaches a pid-namespace init
too: SIGSTOP from an ancestor namespace is always delivered.

SIGCONT discards a pending SIGSTOP without waking a tracee still in tracing
stop, and continues a stopped process: release() is right whether CRIU has
let go of the tree yet or not (even for an init, which ignores SIGCONT
itself: the continuing is done when the signal is sent, not delivered).
What the workload can see: nothing when the tree ends, or when it is
released while CRIU still holds it; a process with a SIGCONT handler sees
one SIGCONT at its release.

A record under RECORDS names the processes, with their start, so that a
pid used again is never signalled, and the CRIU holding them, for
`hybridmig settle` after run is gone (docs/design.md, "Commit semantics")."""

import json
import logging
import os
import signal
import time

from ..proctree import start_ticks, thread_stats

log = logging.getLogger("hybridmig.source.hold")

RECORDS = "/run/hybridmig/held"
# A thread that a dying CRIU detaches passes through running, in the
# kernel, on its way to the stop: how long holding() lets that take.
SETTLE_S = 0.5
PF_EXITING = 0x4  # a task's flags (/proc/PID/stat, field 9): killed, in its exit


class Hold:
    def __init__(self, root, criu, procs):
        self.root, self.criu = root, criu  # criu: (pid, start ticks)
        self.procs = procs  # [(pid, start ticks)], the root first
        self.path = os.path.join(RECORDS, "%d.json" % root)

    @property
    def criu_pid(self):
        return self.criu[0]

    @classmethod
    def take(cls, root, pids, criu_pid):
        """Hold the tree `pids` (root first), now held by the CRIU `criu_pid`;
        None if that CRIU was gone once the stops were queued: the tree may
        have run by then, so it is let go again and no record is left."""
        procs = []
        for pid in pids:
            try:
                procs.append((pid, start_ticks(pid)))
            except ProcessLookupError:
                pass  # gone: reading its pages says so
        try:
            hold = cls(root, (criu_pid, start_ticks(criu_pid)), procs)
        except ProcessLookupError:
            return None
        for _ in cls._records():  # (removes the records of ended trees)
            pass
        hold._write()  # first: a hold always has its record
        hold._signal(signal.SIGSTOP)
        # CRIU alive now was alive, holding the tree, when the stops were
        # queued: it detaches its tracees only after the verdict run gives.
        if not hold.criu_alive():
            hold.release()
            return None
        log.info("the source (%d processes) held stopped beside criu dump %d", len(procs), criu_pid)
        return hold

    @classmethod
    def find(cls, pid):
        """The hold of the tree rooted at `pid`, or held by the CRIU `pid`;
        None if there is none."""
        return next((h for h in cls._records() if pid in (h.root, h.criu_pid)), None)

    @classmethod
    def _records(cls):
        """The holds on record whose root still lives; those of ended trees
        (a run killed before it let go of its record) are removed."""
        try:
            names = os.listdir(RECORDS)
        except FileNotFoundError:
            return
        for name in names:
            try:
                with open(os.path.join(RECORDS, name)) as f:
                    rec = json.load(f)
                hold = cls(rec["root"], tuple(rec["criu"]), [tuple(p) for p in rec["procs"]])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # (being written: its .tmp)
            if hold.procs and _same(*hold.procs[0]):
                yield hold
            else:
                hold._forget()

    def criu_alive(self):
        """Whether the CRIU that held the tree has not exited."""
        return _same(*self.criu) and _state(self.criu_pid) not in ("Z", "X", None)

    def settle(self, end, through_criu):
        """End or resume the tree: through its CRIU (`through_criu()` settles
        it) while that lives, by this hold alone once it has died. A resume
        drops the queued stops first, so that the tree runs on as CRIU lets
        go, and queues them again if CRIU could not be settled (it still
        holds the tree). Returns whether CRIU was there."""
        criu = self.criu_alive()
        if end:
            try:
                if criu:
                    through_criu()
            finally:
                self.end()  # (what CRIU ended is gone: only the rest is signalled)
            return criu
        self._signal(signal.SIGCONT)
        if criu:
            try:
                through_criu()
            except BaseException:
                self._signal(signal.SIGSTOP)
                raise
        self._forget()
        return criu

    def holding(self):
        """Whether nothing of the tree runs: every thread in tracing stop
        (CRIU) or stopped (this hold), or exiting, or exited."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            running = [pid for pid, start in self.procs if _same(pid, start) and not _nothing_runs(pid)]
            if not running or time.monotonic() > deadline:
                return not running
            time.sleep(0.01)

    def release(self):
        """Let the tree run (CRIU resumes it, or has let go of it)."""
        self._signal(signal.SIGCONT)
        self._forget()

    def end(self):
        """End the tree (CRIU is gone, or could not do it)."""
        self._signal(signal.SIGKILL)
        self._forget()

    def _signal(self, sig):
        for pid, start in self.procs:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:  # the pidfd pins the pid: checked, it is the process recorded
                if _same(pid, start):
                    signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)

    def _write(self):
        os.makedirs(RECORDS, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"root": self.root, "criu": self.criu, "procs": self.procs, "time": time.time()}, f)
        os.replace(tmp, self.path)

    def _forget(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _same(pid, start):
    try:
        return start_ticks(pid) == start
    except ProcessLookupError:
        return False


def _state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _nothing_runs(pid):
    """Every thread of pid in tracing stop or stopped, or exiting (killed:
    a pid-namespace init waits in its exit, asleep, for its children), or
    exited."""
    try:
        stats = thread_stats(pid)
    except ProcessLookupError:
        return True
    return all(st is None or st[0] in ("t", "T", "Z", "X") or st[1] & PF_EXITING for st in stats)
