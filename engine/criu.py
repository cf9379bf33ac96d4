"""Running CRIU: where it is, what its logs say, and the lazy dump of the
switch-over with its post-dump hook."""
import os
import socket
import subprocess
import sys

from . import doctor
from .errors import CriuError
from . import hook
from .hook import HOOK_ENV, PAGE_SERVER_ENV


# CRIU's log level for every dump and restore: info. Debug (-v4) also logs
# every page-pipe buffer while the tasks are frozen: 160 ms of a 4 GiB
# blackout. `--criu-opt=-v4` brings it back (CRIU takes the last -v).
CRIU_LOG_LEVEL = "-v3"


def criu_binary():
    return doctor.require_criu()


def log_tail(path, errors=8, tail=6):
    """The error lines and last lines of a CRIU log, for messages."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return "(no log %s: %s)" % (path, e.strerror)
    errs = [line for line in lines if "Error" in line and "RLIMIT_NOFILE" not in line]
    picked = errs[:errors] + [line for line in lines[-tail:] if line not in errs]
    return "\n  ".join([""] + picked)


def write_hook(directory):
    """The action script CRIU runs, written into ``directory``: hook.py run
    by this interpreter with -S (no site-packages: it starts while the tasks
    are frozen, and needs only the standard library)."""
    path = os.path.join(directory, "criu-hook")
    with open(path, "w") as f:
        f.write("#!%s -S\n" % sys.executable)
        f.write("exec(compile(open(%r, 'rb').read(), %r, 'exec'), {'__name__': '__main__'})\n"
                % (hook.__file__, hook.__file__))
    os.chmod(path, 0o700)
    return path


class LazyDump:
    """`criu dump --lazy-pages` whose post-dump step asks us what to do.

    CRIU runs the hook once the images are written and the tasks frozen; the
    hook connects to `hook_sock` and exits with the verdict we send: 0 lets
    the dump finish (the tasks end once its page server is closed), anything
    else makes CRIU resume them (criu/cr-dump.c, cr_dump_finish)."""

    def __init__(self, pid, images_dir, port, hook_sock, hook_dir, criu_opts=(), netns=None):
        self.images_dir = images_dir
        self.log = os.path.join(images_dir, "dump.log")
        cmd = ["nsenter", "--net=/run/netns/%s" % netns] if netns else []
        cmd += [criu_binary(), "dump", "-t", str(pid), "-D", images_dir, "-W", images_dir,
                "--lazy-pages", "--address", "127.0.0.1", "--port", str(port),
                "--action-script", write_hook(hook_dir), "-o", "dump.log", CRIU_LOG_LEVEL, *criu_opts]
        env = dict(os.environ, **{HOOK_ENV: hook_sock, PAGE_SERVER_ENV: str(port)})
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, text=True)

    def failed(self):
        """None while running or after success, else the reason."""
        rc = self.proc.poll()
        if rc in (None, 0):
            return None
        return "criu dump failed (exit %d):%s" % (rc, log_tail(self.log))

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def hook_listener(path):
    """The unix socket the hook connects to."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock
