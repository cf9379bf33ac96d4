"""A program as PID 1 of its own PID namespace inside a "host" (a network
namespace), the way every bench workload runs, and the end of it."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from hybridmig.testing.workload import kill_tree


class NsProcError(RuntimeError):
    """The program did not start, or is not where it should be."""


def netns_path(name: str) -> str:
    path = f"/run/netns/{name}"
    if not os.path.exists(path):
        raise NsProcError(f"network namespace {path} does not exist")
    return path


class NsProc:
    """``argv`` run as ``nsenter --net=NS unshare --pid --fork setsid argv``.

    nsenter and not `ip netns exec` (which adds a mount namespace that CRIU
    refuses to dump); no --mount-proc (the same); no --kill-child (CRIU
    would restore the pdeath signal and fire it when `criu restore -d`
    exits).  ``host_pid`` is the program, the namespace's init.

    Its output goes to /dev/null: unshare writes to it when the
    dump kills its child, and CRIU refuses to restore an open file whose
    size changed, so never a log file the program also holds."""

    def __init__(self, argv: list, netns: str, timeout: float = 10):
        cmd = ["nsenter", f"--net={netns_path(netns)}", "unshare", "--pid", "--fork", "setsid", *argv]
        self.popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        # Held as psutil objects from now on: they refuse to signal a reused pid.
        self.unshare = psutil.Process(self.popen.pid)
        self.root: psutil.Process | None = None
        try:
            self.root = self._find_init(timeout)
        except BaseException:
            self.stop()
            raise
        self.host_pid = self.root.pid

    def _find_init(self, timeout: float) -> psutil.Process:
        # unshare's only child is the init; setsid execs in place, as that
        # child is not a process group leader (unshare leads the group).
        deadline = time.monotonic() + timeout
        while True:
            rc = self.popen.poll()
            if rc is not None:
                raise NsProcError(f"{self.popen.args} exited with {rc} before it started")
            try:
                kids = self.unshare.children()
            except psutil.NoSuchProcess:
                kids = []
            if kids:
                return kids[0]
            if time.monotonic() > deadline:
                raise NsProcError(f"{self.popen.args} did not start within {timeout}s")
            time.sleep(0.01)

    def alive(self) -> bool:
        return running(self.root)

    def wait_gone(self, timeout: float) -> bool:
        """After a dump killed the program: wait for it, reap unshare."""
        deadline = time.monotonic() + timeout
        while running(self.root) and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            self.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return not running(self.root)

    def stop(self) -> None:
        """SIGKILL the program (a PID 1 ignores an unhandled SIGTERM) and
        unshare, by pid; reap."""
        if self.root is not None:
            kill_tree(self.root)
        kill_tree(self.unshare)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


def running(proc: psutil.Process | None) -> bool:
    try:
        return proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def adopt_root(host_pid: int) -> psutil.Process:
    """The restored init ``host_pid`` (from `criu restore --pidfile`)."""
    try:
        return psutil.Process(host_pid)
    except psutil.NoSuchProcess:
        raise NsProcError("restored root %d does not exist" % host_pid) from None
