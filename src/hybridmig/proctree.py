"""Ending a process tree: what the source (a resumed source after a
commit), the destination (an uncommitted copy, its guard) and CRIU's hook
all do, by pid, never by name."""

import signal

import psutil


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
