"""Ending a process tree: what the source (a resumed source after a
commit), the destination (an uncommitted copy, its guard) and CRIU's hook
all do, by pid, never by name; and telling whether a tree is still held."""

import os
import signal

import psutil


def start_ticks(pid):
    """When pid started, in clock ticks since boot (/proc/PID/stat): it tells
    a process from a later one given its pid, and, unlike a date made from
    the boot time, does not move when the clock is stepped. Raises
    ProcessLookupError."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError):  # (ESRCH: it is being reaped)
        raise ProcessLookupError(pid) from None


def end_tree(root):
    """SIGKILL the process `root` (a psutil.Process) and its descendants,
    stopped first so that none of it forks meanwhile."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            try:
                proc.send_signal(sig)  # (psutil checks that the pid is still this process)
            except psutil.NoSuchProcess:
                pass


# A thread CRIU holds is in tracing stop; one that has exited cannot write.
_HELD_STATES = frozenset("tZX")


def thread_stats(pid):
    """(state, flags) of each thread of pid (/proc/PID/task/TID/stat), None
    for one that exited while being read. Raises ProcessLookupError."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    stats: list[tuple[str, int] | None] = []
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            stats.append((fields[0], int(fields[6])))
        except (FileNotFoundError, ProcessLookupError):
            stats.append(None)
    return stats


def all_held(pids, stop_too=False):
    """Whether every thread of the processes `pids` is in tracing stop (or
    has exited). Seen after reading their memory, this proves the reads a
    snapshot: a tracer that died let its tracees run, and none of them
    enters tracing stop again without a new tracer. `stop_too`: a stop
    counts too (run's hold after CRIU died, source/hold.py)."""
    held = _HELD_STATES | {"T"} if stop_too else _HELD_STATES
    for pid in pids:
        try:
            stats = thread_stats(pid)
        except ProcessLookupError:
            return False
        if any(st is None or st[0] not in held for st in stats):  # (exited meanwhile: it ran)
            return False
    return True
