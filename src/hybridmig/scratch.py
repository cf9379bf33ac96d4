"""Scratch directories that their owner may not live to remove (SIGKILL):
each holds its owner's pid and start time, and whoever makes the next one of
the same kind in the same place removes those whose owner is gone."""

import os
import shutil
import tempfile

import psutil

OWNER_FILE = ".hybridmig-owner"


def _pid_namespace():
    return os.stat("/proc/self/ns/pid").st_ino


def _identity(proc):
    # the start time tells a live owner from a later process given its pid;
    # pids are only comparable within one pid namespace
    return "%d %.2f %d" % (proc.pid, proc.create_time(), _pid_namespace())


def _owner_gone(identity):
    pid, _, pidns = identity.split()
    if int(pidns) != _pid_namespace():
        return False  # another container's, sharing the dir: not ours to judge
    try:
        return _identity(psutil.Process(int(pid))) != identity
    except psutil.NoSuchProcess:
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
            shutil.rmtree(path, ignore_errors=True)


def make(prefix, parent=None):
    """A new dir `prefix`* in `parent` (default: the temp dir), owned by
    this process, after sweeping the ones of dead owners."""
    sweep(prefix, parent)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(_identity(psutil.Process()))
    return path


def disown(path):
    """Keep `path` for good: no later sweep removes it."""
    try:
        os.unlink(os.path.join(path, OWNER_FILE))
    except FileNotFoundError:
        pass
