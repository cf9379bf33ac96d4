"""The cgroup yard that run and serve mount before a container's freeze
(cgroup_yard.py): every hierarchy of the process, each where CRIU looks
for it, and nothing left mounted once it is closed."""

import os
import subprocess
import sys

from hybridmig import scratch
from hybridmig.cgroup_yard import PREFIX, CgroupYard, hierarchies


def mounts():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def test_yard_holds_each_hierarchy_of_the_process():
    me = subprocess.Popen(["sleep", "30"])
    try:
        yard = CgroupYard(me.pid)
        path = yard.path
        try:
            names = sorted(os.listdir(path))
            with open(f"/proc/{me.pid}/cgroup") as f:
                lines = [line.rstrip("\n").split(":", 2) for line in f]
            # CRIU's names (criu/cgroup.c): name=X as X, cgroup2 as unified
            expected = sorted("unified" if c == "" else c.removeprefix("name=") for _, c, _ in lines)
            assert [n for n in names if n != scratch.OWNER_FILE] == expected
            for _, controllers, cgroup in lines:
                name = "unified" if controllers == "" else controllers.removeprefix("name=")
                point = os.path.join(path, name)
                assert point in mounts(), point
                # the hierarchy's root: the process is in it at its own path
                with open(os.path.join(point, cgroup.lstrip("/"), "cgroup.procs")) as f:
                    assert str(me.pid) in f.read().split(), (name, cgroup)
        finally:
            yard.close()
        assert not os.path.exists(path)
        assert not [m for m in mounts() if m.startswith(path)]
    finally:
        me.kill()
        me.wait()


def test_hierarchies_name_them_as_criu_does():
    for name, fstype, options in hierarchies():
        assert "/" not in name and name
        if fstype == "cgroup2":
            assert name == "unified" and options is None
        elif options.startswith("none,name="):
            assert options == "none,name=" + name
        else:
            assert options == name


def test_a_dead_owners_yard_is_swept_mounts_and_all():
    # a yard whose owner died (SIGKILL): the next yard removes it, detaching its mounts first
    child = subprocess.run(
        [
            sys.executable, "-c",
            "import os\nfrom hybridmig.cgroup_yard import CgroupYard\n"
            "print(CgroupYard().path, flush=True)\nos._exit(0)",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    left = child.stdout.strip()
    assert os.path.basename(left).startswith(PREFIX) and [m for m in mounts() if m.startswith(left + "/")]
    yard = CgroupYard()
    try:
        assert not os.path.exists(left)
        assert not [m for m in mounts() if m.startswith(left + "/")]
    finally:
        yard.close()
