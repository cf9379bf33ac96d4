"""The guard of a restored copy (destination side).

A copy restored with `criu restore --lazy-pages` runs while a fault loop
still installs its memory. If the process holding the userfaultfds (serve,
or `hybridmig lazy-pages` used alone) dies, they close, and the kernel
resolves every page still owed with a zero page: the copy would run on
memory it was never given. So each restored task's uffd is also handed to a
guard process, a duplicate sent over its socket as the daemon receives it:
while the guard holds it, faults on owed pages keep waiting. The guard lets
go of the duplicates only when told that every page is in ("installed",
answered "ok"), or once it has ended the tasks. If its socket closes before
it was told that the copy may run on ("commit", "release", or "done": the
daemon alone has nothing to commit to), it ends the tree the restore's
pidfile names and every task it holds, with their descendants, and only then
closes the duplicates: the tasks die waiting on their faults. See "Failure"
in docs/design.md for every process that can die, at every step.

    python -m hybridmig.destination.guard [--pidfile F] [--owner NAME]   (stdin: the socket)

Messages (SOCK_SEQPACKET): "hold PID" with the task's uffd (SCM_RIGHTS);
"hold 0" with the uffd of a child forked after the restore, sent by the
daemon's native fault loop from the fork event, which names no pid (the
child is ended with the tree of the task it descends from); "installed"
(the duplicates are closed, then "ok" is answered, or why not: a "hold"
whose descriptor did not come); "commit" or "release" (serve: the copy
stays, or serve ended it itself); "done" (the daemon alone: every page
installed, its work is over). The fault loop writes to a duplicate of the
daemon's end: the daemon shuts its end down, and does not only close it,
for the guard to see the end of its work.
"""

import argparse
import array
import os
import resource
import signal
import socket
import subprocess
import sys

import psutil

from ..errors import HybridmigError
from ..proctree import end_tree

_MAX_MSG = 64
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
_OVER = (b"commit", b"release", b"done")


class Guard:
    """The daemon's end of a guard process: started before the restore."""

    def __init__(self, pidfile=None, owner="serve", root_file=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "hybridmig.destination.guard", "--owner", owner]
        if pidfile:
            cmd += ["--pidfile", pidfile]
        if root_file:
            cmd += ["--root-file", root_file]
        try:
            # its own session: the owner's Ctrl-C must not reach it
            self.proc = subprocess.Popen(cmd, stdin=theirs.fileno(), start_new_session=True)
        finally:
            theirs.close()
        self.sock: socket.socket | None = ours

    def fileno(self):
        """The daemon's end, for the fault loop to send forked children's uffds on."""
        if self.sock is None:
            raise HybridmigError("the restored copy's guard was already let go")
        return self.sock.fileno()

    def _send(self, msg, fds=()):
        if self.sock is None:
            raise HybridmigError("the restored copy's guard was already let go")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([msg], anc)
        except OSError as e:
            raise HybridmigError(f"the restored copy's guard (pid {self.proc.pid}) is gone: {e}") from e

    def hold(self, pid, uffd):
        """A duplicate of task pid's uffd goes to the guard: sent, it is held
        (a descriptor in flight counts as open), whatever happens to us."""
        self._send(b"hold %d" % pid, [uffd])

    def installed(self, timeout=10):
        """Every page is in: the guard closes its duplicates (as long as it
        held one, a fault after our fault loop stops, in memory the copy
        zapped since, would wait for it). Raises if the guard is gone."""
        self._send(b"installed")
        sock = self.sock
        if sock is None:
            raise HybridmigError("the guard was already let go")
        sock.settimeout(timeout)
        try:
            answer = sock.recv(_MAX_MSG)
        except OSError as e:
            answer = str(e).encode()
        if answer != b"ok":
            raise HybridmigError(f"the restored copy's guard (pid {self.proc.pid}) failed: {answer.decode() or 'gone'}")

    def finish(self, word):
        """ "commit", "release" or "done": the guard's work is over. Returns
        False if it was gone already."""
        if self.sock is None:
            return True
        try:
            self._send(word.encode())
            return True
        except HybridmigError:
            return False
        finally:
            self.close()

    def close(self):
        """Without a word: the guard ends the tasks it holds (the owner failed)."""
        if self.sock is not None:
            try:
                # the end of the guard's input even while the fault loop's
                # duplicate of this socket is open; the loop's next send fails
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the guard is gone
            self.sock.close()
            self.sock = None

    def wait(self, timeout=10):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _receive(sock, held):
    """Messages until one that ends the guard's work (returned), or EOF (b"")."""
    lost = 0  # "hold" messages whose descriptor did not come (out of descriptors)
    while True:
        try:
            msg, anc, _, _ = sock.recvmsg(_MAX_MSG, _FD_SPACE)
        except InterruptedError:
            continue
        fds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if msg.startswith(b"hold ") and len(fds) == 1:
            pid = int(msg.split()[1])
            task = None
            try:
                if pid > 1 and pid != os.getppid():  # never init, never the owner
                    task = psutil.Process(pid)  # now, while it is surely this task
            except psutil.NoSuchProcess:
                pass
            held.append((task, fds[0]))
            continue
        lost += msg.startswith(b"hold ")
        for fd in fds:
            os.close(fd)
        if msg == b"installed":
            _let_go(held)
            # a task it could not hold may have read zero pages: the owner
            # must not go on to the commit
            sock.send(b"ok" if not lost else b"could not hold the uffds of %d tasks" % lost)
        elif not msg or msg in _OVER:
            return msg


def _let_go(held):
    for i, (task, fd) in enumerate(held):
        if fd is not None:
            os.close(fd)
            held[i] = (task, None)


def main(argv=None):
    args = argparse.ArgumentParser()
    args.add_argument("--pidfile")
    # the restored root's pid as soon as it exists, long before CRIU writes
    # the pidfile at the end of its restore (serve's restore action script)
    args.add_argument("--root-file")
    args.add_argument("--owner", default="serve")
    opts = args.parse_args(argv)
    # the owner's Ctrl-C or SIGTERM must not reach the guard before the
    # owner itself has decided about the copy
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # one descriptor per restored task, and per child forked while pages are owed
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # (an unlimited hard limit is above fs.nr_open): the soft one stays
    sock = socket.socket(fileno=0)
    held: list = []  # (psutil.Process or None, uffd or None) of each restored task
    if _receive(sock, held):
        _let_go(held)
        return
    roots = [task for task, _ in held if task is not None]
    for path in (opts.pidfile, opts.root_file):
        try:
            with open(path or "") as f:
                roots.insert(0, psutil.Process(int(f.read().strip())))
            break
        except (OSError, ValueError, psutil.NoSuchProcess):
            pass  # no copy restored yet, or gone already: the tasks held, if any, are ended
    for root in roots:
        end_tree(root)
    _let_go(held)  # the tasks are dead: their faults no longer wait
    if roots:
        print(
            "hybridmig guard: ended the restored copy, pid %d: %s failed or is gone before every page was "
            "installed or the source committed to it" % (roots[0].pid, opts.owner),
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
