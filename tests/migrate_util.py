"""Helpers of test_migrate.py: `hybridmig serve` and `hybridmig run` as real
processes in the network namespaces of a TwoHosts, and a cleanup stack that
ends by pid whatever a test started, even when the test fails."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from hybridmig.testing.workload import kill_tree
from lazy_util import HYBRIDMIG_BIN as HYBRIDMIG
from lazy_util import wait_for  # noqa: F401  (test_migrate takes it from here)

PORT = 7777
RELAY = str(Path(__file__).parent / "relay.py")  # a TCP relay between run and serve


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
                errors.append("{}{!r}: {!r}".format(getattr(fn, "__name__", fn), args, e))
        if errors:
            print("cleanup errors:\n  " + "\n  ".join(errors))


class Serve:
    """`hybridmig serve --once` in a namespace, logging to a file; killed by pid at teardown."""

    def __init__(
        self,
        hosts,
        ns,
        addr,
        base_dir,
        key_file,
        cleanup,
        log_dir,
        port=PORT,
        env=None,
        once=True,
        verbosity=3,
        keep=False,
        extra=(),
    ):
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / ("serve-%s-%d.log" % (ns, time.monotonic_ns()))
        self.listen = "%s:%d" % (addr, port)
        cmd = hosts.run_in(ns) + [
            HYBRIDMIG,
            "serve",
            "--listen",
            self.listen,
            "--dir",
            str(base_dir),
            "--key-file",
            str(key_file),
            "-v%d" % verbosity,
        ]
        if once:
            cmd.append("--once")
        if keep:
            cmd.append("--keep")
        cmd += extra
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})),
        )
        self._ps = psutil.Process(self.proc.pid)
        cleanup.add(self.close)

    def wait_listening(self, timeout=30):
        wait_for(lambda: "listening on" in self.log() or self.proc.poll() is not None, timeout, "serve to listen")
        assert self.proc.poll() is None, f"serve exited early ({self.proc.returncode}):\n{self.log()}"
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
        """At teardown: serve and whatever it started (a criu restore)."""
        kill_tree(self._ps)
        self.proc.poll()
        self._log.close()


def run_cmd(hosts, ns, pid, to, key_file, *extra, verbosity=3):
    return hosts.run_in(ns) + [
        HYBRIDMIG,
        "run",
        str(pid),
        "--to",
        to,
        "--key-file",
        str(key_file),
        "--json",
        "--timeout",
        "60",
        "-v%d" % verbosity,
        *extra,
    ]


def _parse(stdout):
    try:
        return json.loads(stdout)
    except ValueError:
        return None


def run_migration(hosts, ns, pid, to, key_file, *extra, timeout=180):
    """`hybridmig run PID --to TO --json` in namespace ns; (returncode, parsed JSON or None, stderr)."""
    proc = subprocess.run(
        run_cmd(hosts, ns, pid, to, key_file, *extra),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    report = _parse(proc.stdout)
    print(
        "run %d -> rc %d\n--- stdout\n%s\n--- stderr\n%s"
        % (pid, proc.returncode, proc.stdout[-6000:], proc.stderr[-6000:])
    )
    return proc.returncode, report, proc.stderr


class BackgroundRun:
    """`hybridmig run` started in the background (to act on the tree during its rounds)."""

    def __init__(self, hosts, ns, pid, to, key_file, *extra, cleanup, log_dir):
        self.pid = pid
        self.out_path = Path(log_dir) / ("run-%d.out" % time.monotonic_ns())
        self.err_path = self.out_path.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(
            run_cmd(hosts, ns, pid, to, key_file, *extra), stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err
        )
        self._ps = psutil.Process(self.proc.pid)
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
        """At teardown: run and whatever it started (a criu dump)."""
        kill_tree(self._ps)
        self.proc.poll()
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


def kill_by_report(report_path):
    """SIGKILL every process started with this memwork report path (a restored
    copy nobody was told about), by pid, checking the cmdline again."""
    needle = str(report_path).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            p = psutil.Process(int(entry))
            if needle in "\0".join(p.cmdline()).encode():
                kill_tree(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def frozen_by(env, error):
    """The pid of the criu dump that holds a source frozen "in doubt", read
    from run's error; it and its images dir are cleaned up after the test."""
    criu_pid = int(error.split("hybridmig settle ")[1].split()[0])
    env.cleanup.kill_pid_tree(criu_pid)
    work = error.rsplit(" stay in ", 1)[1].strip()
    env.cleanup.add(shutil.rmtree, os.path.dirname(work), True)
    return criu_pid


def settle(env, criu_pid, pids, decision):
    """`hybridmig settle PID decision` (the pid run named) on the source
    host, once the source (pids) is seen still frozen a second later; its
    stdout."""
    time.sleep(1)
    assert all(state(pid) in ("t", "T") for pid in pids), [(pid, state(pid)) for pid in pids]
    done = subprocess.run(
        env.hosts.run_in(env.hosts.src) + [HYBRIDMIG, "settle", str(criu_pid), decision],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def tracer(pid):
    """The pid tracing pid (0: none, or pid gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("TracerPid:")), 0)
    except OSError:
        return 0


def held_by_criu(pids):
    """Does a CRIU dump hold one of pids (the switch-over began)? A stopped
    state alone does not say: run's tracker also stops a process briefly
    (ptrace) when it attaches to one, as to a child forked during the rounds."""
    for pid in pids:
        t = tracer(pid)
        try:
            with open(f"/proc/{t}/comm") as f:
                if t and f.read().strip() == "criu":
                    return True
        except OSError:
            pass
    return False


def net_ns_inode(pid):
    return os.stat("/proc/%d/ns/net" % pid).st_ino


def netns_inode(name):
    return os.stat(f"/run/netns/{name}").st_ino


# --- small python trees for the shapes memwork does not take ----------------------

PYTREE = r"""
import hashlib, json, mmap, os, signal, sys, time
report, private_mb, shared_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
zombie, child_life = sys.argv[4] == "1", float(sys.argv[5])
os.setsid()  # CRIU wants the session leader inside the pid namespace
if sys.argv[6] == "1":  # a perf event fd (CPU clock of this process): a file CRIU cannot dump
    import ctypes, struct
    attr = ctypes.create_string_buffer(struct.pack("IIQ", 1, 128, 0) + bytes(112))  # SOFTWARE, size, CPU_CLOCK
    if ctypes.CDLL(None, use_errno=True).syscall(298, attr, 0, -1, -1, 0) < 0:
        raise OSError(ctypes.get_errno(), "perf_event_open")
def line(**kw):
    kw.update(pid=os.getpid(), realtime=time.time())
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps(kw) + "\n").encode())
    os.close(fd)
private = bytearray(os.urandom(private_mb << 20))
shared = mmap.mmap(-1, max(shared_mb, 1) << 20)  # MAP_SHARED | MAP_ANONYMOUS
if shared_mb:
    shared.write(os.urandom(shared_mb << 20))
digest = lambda: [hashlib.sha256(private).hexdigest(), hashlib.sha256(shared).hexdigest()]
expect = digest()
children = []
if zombie:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    children.append(pid)  # never reaped: a zombie until the end
def on_usr1(*_):
    line(event="check", ok=digest() == expect, children=children)
def on_usr2(*_):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        end = time.monotonic() + child_life if child_life > 0 else float("inf")
        while time.monotonic() < end:
            time.sleep(0.05)
        os._exit(0)
    children.append(pid)
    line(event="forked", child=pid)
    if child_life > 0:  # reap it once it is done, not before
        signal.signal(signal.SIGCHLD, lambda *_: os.waitpid(pid, os.WNOHANG))
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, on_usr2)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
line(event="ready", children=children)
while True:
    private[(int(time.time() * 1000) % len(private)) & ~4095] ^= 0  # touch, do not change
    time.sleep(0.01)
"""


class PyTree:
    """A python process as the init of its own pid namespace (so CRIU can
    restore it with its pids), holding private_mb MiB of random private
    anonymous memory and shared_mb MiB of MAP_SHARED anonymous memory whose
    digests it checks on SIGUSR1; optionally with a zombie child, or with a
    perf event fd, which CRIU refuses to dump. On SIGUSR2
    it forks a child that lives child_life seconds (0: for ever) and is
    reaped as soon as it exits."""

    def __init__(
        self, hosts, ns, workdir, cleanup, private_mb=32, shared_mb=0, zombie=False, child_life=0.0, perf_event=False
    ):
        self.report = Path(workdir) / ("pytree-%d.jsonl" % time.monotonic_ns())
        cmd = hosts.run_in(ns) + [
            "unshare",
            "--pid",
            "--fork",
            "python3",
            "-c",
            PYTREE,
            str(self.report),
            str(private_mb),
            str(shared_mb),
            "1" if zombie else "0",
            str(child_life),
            "1" if perf_event else "0",
        ]
        self.popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        cleanup.add(kill_by_report, str(self.report))  # last: a restored copy left behind
        cleanup.kill_pid_tree(self.popen.pid)
        parent = psutil.Process(self.popen.pid)
        self.pid = wait_for(lambda: parent.children() and parent.children()[0].pid, 30, "the pid namespace init")
        cleanup.kill_pid_tree(self.pid)
        self.wait_event("ready", 0, 60)

    def lines(self):
        try:
            return [json.loads(x) for x in self.report.read_text().splitlines() if x.strip()]
        except FileNotFoundError:
            return []

    def wait_event(self, event, after, timeout=30):
        return wait_for(
            lambda: [x for x in self.lines()[after:] if x["event"] == event], timeout, f"{event} from the python tree"
        )[0]

    def signal(self, pid, sig, event, timeout=30):
        after = len(self.lines())
        os.kill(pid, sig)
        return self.wait_event(event, after, timeout)


def rss_during_precopy(run, serve, wl):
    """RSS samples of run and of serve (lists, bytes) every 50 ms from
    run's tracker attaching until CRIU holds the tree (pre-copy's span)."""
    ps = psutil.Process(run.proc.pid)  # nsenter execs run: the pid is run's own
    serve_ps = psutil.Process(serve.proc.pid)
    wait_for(lambda: tracked(wl.host_pid) or not run.running(), 30, "run to attach its tracker")
    rss, serve_rss = [], []
    while run.running() and not held_by_criu(wl.pids()):
        try:
            rss.append(ps.memory_info().rss)
            serve_rss.append(serve_ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return rss, serve_rss
