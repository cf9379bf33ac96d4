"""Helpers of test_migrate.py: `hybridmig serve` and `hybridmig run` as real
processes in the network namespaces of a TwoHosts, and a cleanup stack that
ends by pid whatever a test started, even when the test fails."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

# the console script installed beside the interpreter running the tests
HYBRIDMIG = os.path.join(os.path.dirname(sys.executable), "hybridmig")
PORT = 7777


def wait_for(predicate, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def kill_tree(proc):
    """SIGKILL a psutil.Process and its descendants (psutil refuses reused pids)."""
    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.wait(10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            pass


class Cleanup:
    """Callbacks run in reverse order at teardown; one failing does not stop the others."""

    def __init__(self):
        self._stack = []

    def add(self, fn, *args):
        self._stack.append((fn, args))

    def kill_pid_tree(self, pid):
        """End pid and its descendants at teardown (taken now, so a reused pid is never hit)."""
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        self.add(kill_tree, proc)

    def run(self):
        errors = []
        while self._stack:
            fn, args = self._stack.pop()
            try:
                fn(*args)
            except Exception as e:  # keep cleaning
                errors.append("%s%r: %r" % (getattr(fn, "__name__", fn), args, e))
        if errors:
            print("cleanup errors:\n  " + "\n  ".join(errors))


class Serve:
    """`hybridmig serve --once` in a namespace, logging to a file; killed by pid at teardown."""

    def __init__(self, hosts, ns, addr, base_dir, key_file, cleanup, log_dir, port=PORT, env=None, once=True,
                 verbosity=3):
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / ("serve-%s-%d.log" % (ns, time.monotonic_ns()))
        self.listen = "%s:%d" % (addr, port)
        cmd = hosts.run_in(ns) + [HYBRIDMIG, "serve", "--listen", self.listen, "--dir", str(base_dir),
                                  "--key-file", str(key_file), "-v%d" % verbosity]
        if once:
            cmd.append("--once")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))
        cleanup.add(self.close)

    def wait_listening(self, timeout=30):
        wait_for(lambda: "listening on" in self.log() or self.proc.poll() is not None, timeout,
                 "serve to listen")
        assert self.proc.poll() is None, "serve exited early (%s):\n%s" % (self.proc.returncode, self.log())
        return self

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """SIGKILL serve by pid (nsenter execs it: the pid is serve's own)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self):
        self.kill()
        self._log.close()


def run_cmd(hosts, ns, pid, to, key_file, *extra, verbosity=3):
    return hosts.run_in(ns) + [HYBRIDMIG, "run", str(pid), "--to", to, "--key-file", str(key_file), "--json",
                               "--timeout", "60", "-v%d" % verbosity, *extra]


def _parse(stdout):
    try:
        return json.loads(stdout)
    except ValueError:
        return None


def run_migration(hosts, ns, pid, to, key_file, *extra, timeout=180):
    """`hybridmig run PID --to TO --json` in namespace ns; (returncode, parsed JSON or None, stderr)."""
    proc = subprocess.run(run_cmd(hosts, ns, pid, to, key_file, *extra), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    report = _parse(proc.stdout)
    print("run %d -> rc %d\n--- stdout\n%s\n--- stderr\n%s" % (pid, proc.returncode, proc.stdout[-6000:],
                                                             proc.stderr[-6000:]))
    return proc.returncode, report, proc.stderr


class BackgroundRun:
    """`hybridmig run` started in the background (to act on the tree during its rounds)."""

    def __init__(self, hosts, ns, pid, to, key_file, *extra, cleanup, log_dir):
        self.pid = pid
        self.out_path = Path(log_dir) / ("run-%d.out" % time.monotonic_ns())
        self.err_path = self.out_path.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(run_cmd(hosts, ns, pid, to, key_file, *extra), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err)
        cleanup.add(self.close)

    def running(self):
        return self.proc.poll() is None

    def wait(self, timeout=180):
        """(returncode, parsed JSON or None, stderr)."""
        rc = self.proc.wait(timeout)
        self._out.flush()
        self._err.flush()
        out, err = self.out_path.read_text(), self.err_path.read_text()
        print("run %d -> rc %d\n--- stdout\n%s\n--- stderr\n%s" % (self.pid, rc, out[-6000:], err[-6000:]))
        return rc, _parse(out), err

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()
        self._err.close()


def tracked(pid):
    """Does a VMA of pid carry the uffd-wp flag ("uw" in smaps' VmFlags): is
    the dirty tracker of `hybridmig run` attached to it?"""
    try:
        with open("/proc/%d/smaps" % pid) as f:
            return any(line.startswith("VmFlags:") and " uw" in line for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return False


def uffd_fds(pid):
    """The userfaultfd descriptors pid holds."""
    out = []
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if "userfaultfd" in os.readlink("/proc/%d/fd/%s" % (pid, fd)):
                    out.append(int(fd))
            except OSError:
                pass
    except OSError:
        pass
    return out


def state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def net_ns_inode(pid):
    return os.stat("/proc/%d/ns/net" % pid).st_ino


def netns_inode(name):
    return os.stat("/run/netns/%s" % name).st_ino
