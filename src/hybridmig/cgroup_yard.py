"""A cgroup yard: every cgroup hierarchy of a process mounted, each in a
directory named as CRIU names it, before the container is frozen; CRIU,
given it as `cgroup-yard` (the container's CRIU config file), opens them
instead of mounting each hierarchy itself.

Why: CRIU mounts every hierarchy to read a container's cgroups on the dump
and again to restore them, with the container frozen; the cgroup2 mount
alone took 10-12 ms here (the v1 ones ~0.01 ms), once on each side
(docs/containers.md, last section). A yard made ahead takes that out of
the blackout. CRIU's naming (criu/cgroup.c, collect_cgroups and
ctrl_dir_and_opt): the hierarchy's controllers as /proc/PID/cgroup lists
them, a `name=X` hierarchy as X, cgroup2 as `unified`. On restore CRIU
mounts a hierarchy the yard lacks itself, into the yard (scratch.remove
detaches those too); on the dump each must be there."""

import ctypes
import logging
import os

from . import scratch
from .errors import HybridmigError

log = logging.getLogger("hybridmig.cgroup_yard")
_libc = ctypes.CDLL(None, use_errno=True)
PREFIX = "hybridmig-cgyard-"


def hierarchies(pid="self"):
    """(directory name, file system type, mount options) for each cgroup
    hierarchy `pid` is in."""
    found: list[tuple[str, str, str | None]] = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            controllers = line.rstrip("\n").split(":", 2)[1]
            if controllers == "":
                found.append(("unified", "cgroup2", None))
            elif controllers.startswith("name="):
                found.append((controllers[5:], "cgroup", "none," + controllers))
            else:
                found.append((controllers, "cgroup", controllers))
    return found


class CgroupYard:
    """The yard of `pid`'s hierarchies, in a scratch dir of this process
    (a later one's sweep removes it, mounts detached, if this one dies)."""

    def __init__(self, pid="self"):
        self.path = scratch.make(PREFIX)
        try:
            for name, fstype, options in hierarchies(pid):
                if "/" in name or name in (".", ".."):
                    raise HybridmigError(f"cgroup hierarchy {name!r}: no name for a directory")
                point = os.path.join(self.path, name)
                os.mkdir(point, 0o700)
                opts = options.encode() if options else None
                if _libc.mount(b"none", point.encode(), fstype.encode(), 0, opts) != 0:
                    err = ctypes.get_errno()
                    raise HybridmigError(f"cannot mount the {fstype} hierarchy {name} at {point}: {os.strerror(err)}")
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.path is not None:
            try:
                scratch.remove(self.path)
            except OSError:
                pass  # left mounted, not removed: the next yard's sweep tries again
            self.path = None


def ahead(pid="self"):
    """A yard of `pid`'s hierarchies, or None if one cannot be made (CRIU
    then mounts them itself, as without one)."""
    try:
        return CgroupYard(pid)
    except (OSError, HybridmigError) as e:
        log.warning("no cgroup yard made ahead (%s): CRIU mounts the hierarchies itself", e)
        return None
