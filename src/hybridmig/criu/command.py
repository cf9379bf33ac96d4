"""Running CRIU: where it is, what its logs say, and the lazy dump of the
switch-over with its post-dump hook."""

import functools
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time

from .. import doctor, scratch
from ..errors import CriuError, UsageError
from . import hook
from .hook import HOOK_ENV

# CRIU's log level for every dump and restore: info. Debug (-v4) also logs
# every page-pipe buffer while the tasks are frozen: 160 ms of a 4 GiB
# blackout. `--criu-opt=-v4` brings it back (CRIU takes the last -v).
CRIU_LOG_LEVEL = "-v3"


@functools.cache
def criu_binary():
    """The checked CRIU, checked once per process: `criu check` takes 70 ms,
    and the destination needs the binary while the process is down."""
    return doctor.require_criu()


# CRIU options hybridmig sets itself for the dump and the restore, or that
# change what a committed dump leaves behind (-R, -s: a second copy of the
# process on the source): refused in --criu-opt. Long names, and the short
# letters that stand for them.
RESERVED_OPTS = {
    "--leave-running": "R",
    "--leave-stopped": "s",
    "--tree": "t",
    "--images-dir": "D",
    "--work-dir": "W",
    "--log-file": "o",
    "--restore-detached": "d",
    "--lazy-pages": None,
    "--page-server": None,
    "--address": None,
    "--port": None,
    "--ps-socket": None,
    "--action-script": None,
    "--pidfile": None,
    "--track-mem": None,
    "--prev-images-dir": None,
}


def check_criu_opts(opts):
    """UsageError naming the first of `opts` that hybridmig must not be
    given (RESERVED_OPTS)."""
    short = {letter: name for name, letter in RESERVED_OPTS.items() if letter}
    for opt in opts:
        name = opt.split("=", 1)[0]
        if name in RESERVED_OPTS:
            reserved = name
        elif opt.startswith("-") and not opt.startswith("--") and opt[1:2] in short:
            reserved = short[opt[1:2]]
        else:
            continue
        why = (
            "it would leave a second copy of the process on the source"
            if reserved in ("--leave-running", "--leave-stopped")
            else "hybridmig sets it itself"
        )
        raise UsageError(f"--criu-opt {opt} ({reserved}): {why}")


def log_tail(path, errors=8, tail=6):
    """The error lines and last lines of a CRIU log, for messages."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return f"(no log {path}: {e.strerror})"
    errs = [line for line in lines if "Error" in line and "RLIMIT_NOFILE" not in line]
    picked = errs[:errors] + [line for line in lines[-tail:] if line not in errs]
    return "\n  ".join([""] + picked)


# The phases of CRIU's dump, from the lines of its -v3 log that begin them;
# each phase runs until the next one begins (dump_phases()).
DUMP_PHASE_MARKS = (
    ("Dumping processes (pid", ""),  # then the pre-dump hook: not CRIU's time
    ("irmap: Searching irmap cache", "seize"),  # the first line after it; plugins, inventory, seizing the tree
    ("Preparing image inventory", "seize"),
    ("net: Lock network", "network_lock"),  # until the next line
    ("Dumping task (pid", "task"),  # per task: its stat, then
    ("Collecting mappings", "vmas"),  # /proc/PID/smaps: grows with the memory (it counts pages)
    ("Collected, longest area", "parasite"),  # fds, parasite injection, files
    ("Dumping pages (type", "pagemap"),  # the pagemap walk, per VMA ("Pagemap generated")
    ("Dumping core (pid", "images"),  # core, mm, namespaces, files: everything but memory
    ("Writing image inventory", None),  # the end: next come the post-dump hook and the page server
)


# lines of the pagemap walk: "Pagemap generated" (one per VMA at -v3), and at -v4 its page-pipe set-up
_WALK_LINES = ("Pagemap generated", "pagemap-cache:", "page-pipe: Add iov", "page-pipe: Will grow", "page-pipe: Grow")
_LOG_TIME = re.compile(r"\((\d+\.\d+)\) ")


def dump_phases(log_path):
    """{phase: ms} of a CRIU dump from its log at -v3 (DUMP_PHASE_MARKS),
    the time from the tree's seizing to the last image; "page_pipes" is
    the memory pass after the last VMA's pagemap (vmsplicing the pages into
    page pipes, the pagemap image). Empty if the log says too little (a log
    level under -v3, a dump that did not reach post-dump)."""
    phases = {}
    phase = None
    prev = None
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in lines:
        m = _LOG_TIME.match(line)
        if not m:
            continue  # the parasite's lines, continuation lines
        t = float(m.group(1)) * 1000
        text = line[m.end() :]
        walk = text.startswith(_WALK_LINES)
        if phase is not None and prev is not None:
            # a VMA's pagemap line ends time spent on the pagemap walk
            charged = "pagemap" if walk and phase in ("pagemap", "page_pipes") else phase
            phases[charged] = phases.get(charged, 0.0) + t - prev
        prev = t
        if text.startswith("Pagemap generated"):
            phase = "page_pipes"
        elif phase == "network_lock":
            phase = "namespaces"
        for mark, name in DUMP_PHASE_MARKS:
            if text.startswith(mark):
                if name is None:
                    return {k: round(v, 2) for k, v in phases.items()}
                phase = name or None
                break
    return {}


def write_hook(directory):
    """The action script CRIU runs, written into ``directory``: hook.py run
    by this interpreter with -S (no site-packages: it starts while the tasks
    are frozen, and needs only the standard library)."""
    path = os.path.join(directory, "criu-hook")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable} -S\n")
        f.write(
            f"exec(compile(open({hook.__file__!r}, 'rb').read(), {hook.__file__!r}, 'exec'), {{'__name__': '__main__'}})\n"  # noqa: E501
        )
    os.chmod(path, 0o700)
    return path


def in_place_opts():
    """["--lazy-pages-in-place"] if this CRIU has it (scripts/criu-patches/0002):
    the dump then leaves every lazy page in the frozen tree's memory instead
    of vmsplicing them all into page pipes while the tree is frozen (the
    destination holds them from pre-copy; one it lacks is read from the
    frozen tree on request). `--criu-opt=--no-lazy-pages-in-place` undoes it."""
    return ["--lazy-pages-in-place"] if doctor.check_criu_lazy_in_place().ok else []


class LazyDump:
    """`criu dump --lazy-pages` that waits for us at both of its hook points.

    Started at the beginning of pre-copy: CRIU's own start-up (80-450 ms
    here) is over by the time pre-copy converges, and it waits in its
    pre-dump hook, before it has looked at the tree. ``wait_hook("pre-dump")``
    then ``go()`` let it seize the tree; ``cancel()`` instead makes it give up
    without touching it. CRIU runs the post-dump hook once the images are
    written and the tasks frozen: the verdict sent there (``conn`` of
    ``wait_hook("post-dump")``) is 0 to let the dump finish (the tasks end
    once its page server is closed), anything else makes CRIU resume them
    (criu/cr-dump.c, cr_dump_finish)."""

    def __init__(self, pid, images_dir, hook_dir, criu_opts=()):
        self.images_dir = images_dir
        self.log = os.path.join(images_dir, "dump.log")
        # The socket lives apart from the work dir: a UNIX socket path has
        # at most 107 bytes, a --work-dir can be longer.
        self._sock_dir = scratch.make("hybridmig-hook-")
        hook_sock = os.path.join(self._sock_dir, "hook.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(hook_sock)
        self._listener.listen(1)
        self._pre_dump = None  # the pre-dump hook's connection, until go() or cancel()
        cmd = [
            criu_binary(),
            "dump",
            "-t",
            str(pid),
            "-D",
            images_dir,
            "-W",
            images_dir,
            "--lazy-pages",
            "--address",
            "127.0.0.1",  # no --port: CRIU binds where it can (hook.py)
            "--action-script",
            write_hook(hook_dir),
            "-o",
            "dump.log",
            CRIU_LOG_LEVEL,
            *in_place_opts(),
            *criu_opts,
        ]
        # whether the dump leaves lazy pages in place (CRIU takes the last of the pair)
        self.in_place = [o for o in cmd if o.endswith("-lazy-pages-in-place")][-1:] == ["--lazy-pages-in-place"]
        env = dict(os.environ, **{HOOK_ENV: hook_sock})
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
        )

    def wait_hook(self, stage, timeout):
        """The connection of CRIU's hook at `stage` ("pre-dump" or
        "post-dump"), once it calls; CriuError if CRIU fails or is silent."""
        deadline = time.monotonic() + timeout
        while not select.select([self._listener], [], [], 0.05)[0]:
            failed = self.failed()
            if failed:
                raise CriuError(f"{failed}; the source keeps running")
            if time.monotonic() > deadline:
                raise CriuError(f"criu dump did not reach {stage} within {timeout}s")
        conn, _ = self._listener.accept()
        said = conn.recv(64).decode(errors="replace").strip()
        if said != stage:
            conn.close()
            raise CriuError(f"criu dump's hook reported {said!r}, expected {stage}")
        if stage == "pre-dump":
            self._pre_dump = conn
        return conn

    def go(self):
        """Let CRIU go on from its pre-dump hook: it seizes the tree next."""
        self._answer_pre_dump(b"0")

    def _answer_pre_dump(self, verdict):
        if self._pre_dump is not None:
            with self._pre_dump:
                self._pre_dump.sendall(verdict)
            self._pre_dump = None

    def cancel(self, timeout=10):
        """Make a CRIU that has not seized the tree yet give up (its pre-dump
        hook fails: nothing of the tree is touched), and wait for it."""
        try:
            self._answer_pre_dump(b"1")
        except OSError:
            pass  # the hook is gone: CRIU ends anyway
        self._listener.close()  # a hook still to call finds no one: it fails, CRIU gives up
        if self.wait(timeout) is None:
            self.kill()

    def failed(self):
        """None while running or after success, else the reason."""
        rc = self.proc.poll()
        if rc in (None, 0):
            return None
        # CRIU complains on stderr before its log is open (bad options).
        # Not read to its end: a detached child of the hook may hold it.
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            said = os.read(fd, 65536).decode(errors="replace").strip().splitlines()
        except BlockingIOError:
            said = []
        return "criu dump failed (exit %d):%s" % (
            rc,
            log_tail(self.log) if os.path.exists(self.log) else "\n  " + "\n  ".join(said[:3]),
        )

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self):
        self._listener.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
