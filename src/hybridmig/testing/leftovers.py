"""Cleaning up after containers (the tests and the bench): mounts left
below a directory, and the cgroups of a container with what still runs in
them, ended by pid."""

import os
import signal
import subprocess
import time
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"  # v1 here: one tree per controller


def unmount_under(path):
    """Lazily unmount every mount below path, deepest first."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], timeout=30)


def kill_cgroup(name: str, timeout: float = 10):
    """SIGKILL, by pid, whatever is left in the cgroups runc made for
    container `name` (a CRIU or a task a failed restore left behind), then
    remove those cgroups."""
    dirs = [p for p in Path(CGROUP_ROOT).glob(f"*/{name}") if p.is_dir()]
    dirs += [p for p in Path(CGROUP_ROOT).glob(f"memory/**/{name}") if p.is_dir()]
    deadline = time.monotonic() + timeout
    for d in dirs:
        while True:
            try:
                pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
