"""Running CRIU: where it is, what its logs say, and the lazy dump of the
switch-over with its post-dump hook."""

import functools
import hashlib
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time

from .. import doctor, scratch
from ..errors import CriuError, UsageError
from . import hook
from .hook import HOOK_ENV

log = logging.getLogger("hybridmig.criu.command")

# CRIU's log level for every dump and restore: info. Debug (-v4) also logs
# every page-pipe buffer while the tasks are frozen: 160 ms of a 4 GiB
# blackout. `--criu-opt=-v4` brings it back (CRIU takes the last -v).
CRIU_LOG_LEVEL = "-v3"


@functools.cache
def criu_binary():
    """The checked CRIU, checked once per process: `criu check` takes 70 ms,
    and the destination needs the binary while the process is down."""
    return doctor.require_criu()


# CRIU 4.2.1's options (criu/config.c, long_opts and short_opts), and
# whether each takes an argument: an option from a source is resolved as
# CRIU's getopt_long resolves it (any unambiguous prefix of a long name
# counts: --leave-run is --leave-running), then checked by its full name.
NO, REQUIRED, OPTIONAL = 0, 1, 2
CRIU_LONG_OPTS = {
    "tree": REQUIRED, "leave-stopped": NO, "leave-running": NO, "restore-detached": NO,
    "no-restore-detached": NO, "restore-sibling": NO, "no-restore-sibling": NO, "daemon": NO,
    "no-daemon": NO, "images-dir": REQUIRED, "work-dir": REQUIRED, "log-file": REQUIRED,
    "join-ns": REQUIRED, "root": REQUIRED, "ext-unix-sk": OPTIONAL, "help": NO,
    "tcp-established": NO, "no-tcp-established": NO, "close": REQUIRED, "log-pid": NO,
    "no-log-pid": NO, "version": NO, "evasive-devices": NO, "no-evasive-devices": NO,
    "pidfile": REQUIRED, "veth-pair": REQUIRED, "action-script": REQUIRED, "link-remap": NO,
    "no-link-remap": NO, "shell-job": NO, "no-shell-job": NO, "file-locks": NO,
    "no-file-locks": NO, "page-server": NO, "no-page-server": NO, "address": REQUIRED,
    "port": REQUIRED, "prev-images-dir": REQUIRED, "ms": NO, "track-mem": NO,
    "no-track-mem": NO, "auto-dedup": NO, "no-auto-dedup": NO, "libdir": REQUIRED,
    "cpu-cap": OPTIONAL, "force-irmap": NO, "no-force-irmap": NO, "ext-mount-map": REQUIRED,
    "exec-cmd": NO, "manage-cgroups": OPTIONAL, "cgroup-root": REQUIRED, "inherit-fd": REQUIRED,
    "feature": REQUIRED, "skip-mnt": REQUIRED, "enable-fs": REQUIRED, "enable-external-sharing": NO,
    "enable-external-masters": NO, "freeze-cgroup": REQUIRED, "ghost-limit": REQUIRED, "irmap-scan-path": REQUIRED,
    "lsm-profile": REQUIRED, "timeout": REQUIRED, "external": REQUIRED, "empty-ns": REQUIRED,
    "lazy-pages": NO, "extra": NO, "no-extra": NO, "experimental": NO,
    "no-experimental": NO, "all": NO, "cgroup-props": REQUIRED, "cgroup-props-file": REQUIRED,
    "cgroup-dump-controller": REQUIRED, "skip-in-flight": NO, "no-skip-in-flight": NO, "deprecated": NO,
    "no-deprecated": NO, "display-stats": NO, "no-display-stats": NO, "weak-sysctls": NO,
    "no-weak-sysctls": NO, "status-fd": REQUIRED, "tcp-close": NO, "no-tcp-close": NO,
    "verbosity": OPTIONAL, "ps-socket": REQUIRED, "stream": NO, "no-stream": NO,
    "config": REQUIRED, "no-default-config": NO, "tls-cacert": REQUIRED, "tls-cacrl": REQUIRED,
    "tls-cert": REQUIRED, "tls-key": REQUIRED, "tls": NO, "no-tls": NO,
    "tls-no-cn-verify": NO, "cgroup-yard": REQUIRED, "pre-dump-mode": REQUIRED, "file-validation": REQUIRED,
    "skip-file-rwx-check": NO, "no-skip-file-rwx-check": NO, "lsm-mount-context": REQUIRED, "network-lock": REQUIRED,
    "mntns-compat-mode": NO, "no-mntns-compat-mode": NO, "unprivileged": NO, "no-unprivileged": NO,
    "ghost-fiemap": NO, "no-ghost-fiemap": NO, "allow-uprobes": NO, "no-allow-uprobes": NO,
    # scripts/criu-patches/0002, 0008
    "lazy-pages-in-place": NO, "no-lazy-pages-in-place": NO, "early-vmas": NO, "no-early-vmas": NO,
}  # fmt: skip
# short_opts "dSsRt:hD:o:v::x::Vr:jJ:lW:L:M:": the long option each letter is
CRIU_SHORT_OPTS = {
    "d": "restore-detached", "S": "restore-sibling", "s": "leave-stopped", "R": "leave-running", "t": "tree",
    "h": "help", "D": "images-dir", "o": "log-file", "v": "verbosity", "x": "ext-unix-sk", "V": "version",
    "r": "root", "j": "shell-job", "J": "join-ns", "l": "file-locks", "W": "work-dir", "L": "libdir",
    "M": "ext-mount-map",
}  # fmt: skip

# What a source may ask the destination's CRIU for: options about how the
# process's sockets, terminal, locks and unlinked files are restored, and the
# log level. Anything else (paths, scripts, namespaces, a config file) would
# let whoever holds the key choose what root runs there; serve widens the
# list with --allow-criu-opt.
ALLOWED_CRIU_OPTS = frozenset(
    {"tcp-established", "tcp-close", "skip-in-flight", "ext-unix-sk", "shell-job", "file-locks", "link-remap"}
    | {"no-tcp-established", "no-tcp-close", "no-skip-in-flight", "no-shell-job", "no-file-locks", "no-link-remap"}
    | {"verbosity"}
    # the switch-over's dump as CRIU does it without hybridmig (in_place_opts,
    # early_vmas_opts); a restore ignores them (0002, 0008)
    | {"no-lazy-pages-in-place", "no-early-vmas"}
)
# Never allowed, whatever serve allows: the second copy they would leave on
# the source after a commit, or what hybridmig sets itself.
_SECOND_COPY = {"leave-running", "leave-stopped"}
_SET_BY_HYBRIDMIG = {
    "tree", "images-dir", "work-dir", "log-file", "restore-detached", "lazy-pages", "page-server", "address",
    "port", "ps-socket", "action-script", "pidfile", "track-mem", "prev-images-dir", "lazy-pages-in-place",
    "early-vmas",
}  # fmt: skip


def resolve_criu_opts(opts):
    """[(given, full long name)] of `opts`, a CRIU command line's options,
    read as CRIU's getopt_long reads them (a unique prefix of a long name,
    short letters in clusters, an argument attached or the next word).
    UsageError for what CRIU would not take as an option."""
    out, words = [], list(opts)
    while words:
        word = words.pop(0)
        if word.startswith("--") and len(word) > 2:
            given, eq, _value = word[2:].partition("=")
            names = [given] if given in CRIU_LONG_OPTS else [n for n in CRIU_LONG_OPTS if n.startswith(given)]
            if len(names) != 1:
                why = "not a CRIU option" if not names else "ambiguous: " + ", ".join("--" + n for n in names)
                raise UsageError(f"--criu-opt {word}: {why}")
            name = names[0]
            has_arg = CRIU_LONG_OPTS[name]
            if eq and has_arg == NO:
                raise UsageError(f"--criu-opt {word}: --{name} takes no argument")
            if not eq and has_arg == REQUIRED:
                if not words:
                    raise UsageError(f"--criu-opt {word}: --{name} needs an argument")
                words.pop(0)
            out.append((word, name))
        elif word.startswith("-") and len(word) > 1 and word != "--":
            letters = word[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                name = CRIU_SHORT_OPTS.get(letter)
                if name is None:
                    raise UsageError(f"--criu-opt {word}: -{letter} is not a CRIU option")
                out.append((word, name))
                if CRIU_LONG_OPTS[name] != NO:
                    if not letters and CRIU_LONG_OPTS[name] == REQUIRED:
                        if not words:
                            raise UsageError(f"--criu-opt {word}: -{letter} needs an argument")
                        words.pop(0)
                    break  # the rest of the word is its argument
        else:
            raise UsageError(f"--criu-opt {word!r}: not an option (CRIU would take it as an argument)")
    return out


def check_criu_opts(opts, allowed=ALLOWED_CRIU_OPTS):
    """UsageError naming the first of `opts` that is not an allowed CRIU
    option (read as CRIU reads it: resolve_criu_opts)."""
    for given, name in resolve_criu_opts(opts):
        if name in _SECOND_COPY:
            why = "it would leave a second copy of the process on the source"
        elif name in _SET_BY_HYBRIDMIG:
            why = "hybridmig sets it itself"
        elif name not in allowed:
            why = "not among the CRIU options a source may set (%s); `serve --allow-criu-opt %s` allows it" % (
                ", ".join(sorted(allowed)),
                name,
            )
        else:
            continue
        raise UsageError(f"--criu-opt {given} (--{name}): {why}")


def check_allowed_names(names):
    """serve's --allow-criu-opt: full CRIU long names, never one hybridmig
    must refuse. Returns the widened allowlist."""
    for name in names:
        name = name.removeprefix("--")
        if name not in CRIU_LONG_OPTS:
            raise UsageError(f"--allow-criu-opt {name}: not a CRIU option (give its full long name)")
        if name in _SECOND_COPY or name in _SET_BY_HYBRIDMIG:
            raise UsageError(f"--allow-criu-opt {name}: hybridmig never lets a source set it")
    return ALLOWED_CRIU_OPTS | {n.removeprefix("--") for n in names}


def settle(criu_pid, end, timeout=10.0):
    """Decide a migration left in doubt (the post-dump hook's verdict 2):
    its `criu dump` waits, the tree frozen, for a client of its page
    server; a clean session ends the tree (end), a failed one resumes it."""
    import psutil

    from .pageserver import PageServerSource

    try:
        cmdline = psutil.Process(criu_pid).cmdline()
    except psutil.NoSuchProcess as e:
        raise UsageError(f"no process {criu_pid}") from e
    # runc's CRIU (a podman container's dump) runs as `criu swrk FD`: its
    # options came over RPC; the page server's port below is the check
    rpc = cmdline[1:2] == ["swrk"]
    lazy_dump = rpc or ("dump" in cmdline and "--lazy-pages" in cmdline)
    if not lazy_dump or not cmdline or not os.path.basename(cmdline[0]).startswith("criu"):
        raise UsageError(f"pid {criu_pid} is not a `criu dump --lazy-pages`: {' '.join(cmdline)[:200]}")
    port = hook.page_server_port(criu_pid, timeout)
    if port is None:
        raise CriuError(f"criu dump {criu_pid} does not listen for its page-server client")
    src = PageServerSource("127.0.0.1", port)
    src.connect()
    if end:
        src.close()
    else:
        src.abort()
    deadline = time.monotonic() + timeout
    while True:  # not our child (run started it): a zombie is done, whoever reaps it
        try:
            if psutil.Process(criu_pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        if time.monotonic() > deadline:
            raise CriuError(f"criu dump {criu_pid} did not finish within {timeout}s")
        time.sleep(0.05)


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
    # --early-vmas (scripts/criu-patches/0008): the VMAs read while the tree still runs
    ("early-vmas: Reading the tree's VMAs", "early_vmas"),
    ("early-vmas: Read the VMAs of", "seize"),
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
    phases: dict[str, float] = {}
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


_EARLY_VMAS = re.compile(r"\(\d+\.\d+\) early-vmas: (\d+): (used|not used|VMAs changed while read|not read)")


def early_vmas_used(log_path):
    """{"used": [pid], "late": [pid]} of a dump with --early-vmas, from its log
    at -v3: whose VMAs CRIU took from its read before the seize, and whose it
    read again after (they changed, or could not be told unchanged). Empty
    without the option or if the log says too little."""
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    if "early-vmas: Reading the tree's VMAs" not in text:
        return {}
    used: list[int] = []
    late: list[int] = []
    for m in _EARLY_VMAS.finditer(text):
        (used if m.group(2) == "used" else late).append(int(m.group(1)))
    return {"used": used, "late": late}


HOOK_PROGRAM = os.path.join(os.path.dirname(hook.__file__), "_hook")  # built by scripts/venv.sh
HOOK_SOURCE = os.path.join(os.path.dirname(hook.__file__), "..", "..", "..", "native", "hook", "criu_hook.c")


def hook_program():
    """The compiled hook (native/hook/criu_hook.c), if it was built from the
    sources beside the package (or they are not there to compare); else None,
    and hook.py stands in."""
    try:
        with open(HOOK_PROGRAM, "rb") as f:
            program = f.read()
    except FileNotFoundError:
        return None
    try:
        with open(HOOK_SOURCE, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return HOOK_PROGRAM  # an installed package: no sources to compare
    if b"hybridmig-hook-sha256:" + digest.encode() not in program:
        log.warning("%s was not built from %s: using hook.py (run make setup)", HOOK_PROGRAM, HOOK_SOURCE)
        return None
    return HOOK_PROGRAM


def write_hook(directory, hook_sock=None, program=None):
    """The action script CRIU runs, written into ``directory``: the compiled
    hook, or else hook.py run by this interpreter with -S (no site-packages:
    it starts while the tasks are frozen, and needs only the standard
    library). `hook_sock`: the socket of `run`, written into the script, for
    a CRIU whose environment is not ours (podman's: runc starts it).
    `program`: hook_program() unless given ("": hook.py)."""
    path = os.path.join(directory, "criu-hook")
    program = hook_program() if program is None else program
    if program:
        with open(path, "w") as f:  # what criu_hook.c reads: its socket, the python for its child
            f.write(f"#!{program}\n{hook_sock or ''}\n{sys.executable}\n")
        os.chmod(path, 0o700)
        return path
    with open(path, "w") as f:
        f.write(f"#!{sys.executable} -S\n")
        if hook_sock:
            f.write(f"import os; os.environ[{HOOK_ENV!r}] = {hook_sock!r}\n")
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


def early_vmas_opts():
    """["--early-vmas"] if this CRIU has it (scripts/criu-patches/0008): the
    dump reads the tree's VMAs (/proc/PID/smaps, a walk of every page) after
    the pre-dump hook's go but before seizing the tree, and uses that read if
    the kernel's count of mmap write locks says no VMA changed since.
    `--criu-opt=--no-early-vmas` undoes it."""
    return ["--early-vmas"] if doctor.check_criu_early_vmas().ok else []


def _parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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
        hook_sock = self._listen()
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
            *early_vmas_opts(),
            *criu_opts,
        ]
        # whether the dump leaves lazy pages in place (CRIU takes the last of the pair)
        self.in_place = [o for o in cmd if o.endswith("-lazy-pages-in-place")][-1:] == ["--lazy-pages-in-place"]
        env = dict(os.environ, **{HOOK_ENV: hook_sock})
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
        )

    def _listen(self):
        """The hook's socket, listening; returns its path."""
        # The socket lives apart from the work dir: a UNIX socket path has
        # at most 107 bytes, a --work-dir can be longer.
        self._sock_dir = scratch.make("hybridmig-hook-")
        hook_sock = os.path.join(self._sock_dir, "hook.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(hook_sock)
        self._listener.listen(1)
        self._pre_dump = None  # the pre-dump hook's connection, until go() or cancel()
        self.criu_pid = None  # CRIU's pid, once its hook called
        return hook_sock

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
        if self.criu_pid is None:  # the hook's parent: CRIU runs its action scripts itself
            hook_pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            self.criu_pid = _parent_of(hook_pid)
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
        assert self.proc.stderr is not None  # started with stderr=PIPE
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
