"""Scratch directories that their owner may not live to remove (SIGKILL):
each holds its owner's pid and start time, and whoever makes the next one of
the same kind in the same place removes those whose owner is gone."""

import ctypes
import os
import re
import shutil
import tempfile

from .proctree import start_ticks

OWNER_FILE = ".hybridmig-owner"
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _mounts_under(path):
    """Mount points at or below `path` in this mount namespace, deepest first."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])  # \040: a space
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove(path):
    """rmtree, but first detach what is mounted below `path`: a CRIU killed
    while it restores leaves its cgroup yard (every cgroup hierarchy,
    mounted in its work dir), and rmtree would go down into those mounts
    and remove host cgroups and files through them."""
    for point in _mounts_under(path):
        if _libc.umount2(point.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot detach {point}, so {path} is left in place: {os.strerror(err)}")
    shutil.rmtree(path, ignore_errors=True)


def _pid_namespace():
    return os.stat("/proc/self/ns/pid").st_ino


def _identity(pid):
    """pid, start time, pid namespace. The start time tells a live owner from
    a later process given its pid (proctree.start_ticks: a date made from
    the boot time moved when the clock was stepped, and a sweep removed a
    live run's dir). Pids are only comparable within one pid namespace.
    Raises ProcessLookupError."""
    return "%d %d %d" % (pid, start_ticks(pid), _pid_namespace())


def _owner_gone(identity):
    pid, _, pidns = identity.split()
    if int(pidns) != _pid_namespace():
        return False  # another container's, sharing the dir: not ours to judge
    try:
        return _identity(int(pid)) != identity
    except ProcessLookupError:
        return True


def sweep(prefix, parent=None):
    """Remove the `prefix`* dirs in `parent` whose owner is gone. Dirs with
    no owner file (being made, kept on purpose, or not ours) stay."""
    parent = parent or tempfile.gettempdir()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(prefix):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                identity = f.read()
            gone = _owner_gone(identity)
        except (OSError, ValueError):
            continue
        if gone:
            try:
                remove(path)
            except OSError:
                pass  # left mounted: not removed either


def make(prefix, parent=None):
    """A new dir `prefix`* in `parent` (default: the temp dir), owned by
    this process, after sweeping the ones of dead owners."""
    sweep(prefix, parent)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(_identity(os.getpid()))
    return path


def disown(path):
    """Keep `path` for good: no later sweep removes it."""
    try:
        os.unlink(os.path.join(path, OWNER_FILE))
    except FileNotFoundError:
        pass
