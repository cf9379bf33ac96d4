"""The guard of a restored copy (destination side).

A copy restored with `criu restore --lazy-pages` runs while serve's fault
loop still installs its memory, and must not outlive serve unless the
source committed to it: once serve is gone (SIGKILL, the OOM killer) its
userfaultfds close, every page still owed reads as zeros, and the source,
never told of a commit, resumes its own copy. serve starts a guard with
each session, naming the pidfile its restore will write (CRIU writes it
before it resumes the tasks), and tells it "commit" once COMMIT came, or
"release" once it ended the copy itself. Its stdin closing with neither
(serve gone) makes the guard end the tree that pidfile names.

    python -m hybridmig.destination.guard PIDFILE     (lines on stdin: "commit", "release")
"""

import signal
import sys

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


def main(pidfile):
    # serve's Ctrl-C or SIGTERM must not reach the guard before serve itself
    # has decided about the copy
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for line in sys.stdin:
        if line.strip() in ("commit", "release"):
            return
    try:
        with open(pidfile) as f:
            root = psutil.Process(int(f.read().strip()))
    except (OSError, ValueError, psutil.NoSuchProcess):
        return  # no copy restored yet, or gone already
    end_tree(root)
    print(
        "hybridmig guard: ended the restored copy, pid %d: serve is gone, and the source never committed "
        "to it" % root.pid,
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
