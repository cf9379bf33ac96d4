"""Scratch dirs: the next one made removes those whose owner died, and only those."""

import os
import subprocess
import sys

import pytest

from hybridmig import scratch

MAKE = "import sys; from hybridmig import scratch; print(scratch.make(sys.argv[1], sys.argv[2]), flush=True)"


def test_dirs_of_dead_owners_are_swept(tmp_path):
    # an owner that ended without removing its dir (as a SIGKILLed one does)
    dead = subprocess.run(
        [sys.executable, "-c", MAKE, "hm-", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    (tmp_path / os.path.basename(dead) / "images").mkdir()
    # an owner still alive
    live = subprocess.Popen(
        [sys.executable, "-c", MAKE + "; sys.stdin.read()", "hm-", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        alive = live.stdout.readline().strip()
        kept = scratch.make("hm-", str(tmp_path))
        scratch.disown(kept)
        other = tmp_path / "hm-not-ours"
        other.mkdir()
        mine = scratch.make("hm-", str(tmp_path))
        assert not os.path.exists(dead)
        assert all(os.path.isdir(d) for d in (alive, kept, other, mine))
    finally:
        live.stdin.close()
        live.wait(10)
    scratch.make("hm-", str(tmp_path))
    assert not os.path.exists(alive) and os.path.isdir(mine) and os.path.isdir(kept)


def test_a_reused_pid_is_not_its_owner(tmp_path):
    """A dir whose owner's pid now belongs to another process (this one,
    started at another time) is swept; one whose owner lives in another pid
    namespace is left alone."""
    d = tmp_path / "hm-reused"
    d.mkdir()
    pidns = os.stat("/proc/self/ns/pid").st_ino
    (d / scratch.OWNER_FILE).write_text("%d 12.00 %d" % (os.getpid(), pidns))
    other_ns = tmp_path / "hm-other-pid-namespace"
    other_ns.mkdir()
    (other_ns / scratch.OWNER_FILE).write_text("%d 12.00 %d" % (os.getpid(), pidns + 1))
    scratch.make("hm-", str(tmp_path))
    assert not d.exists()
    assert other_ns.exists()  # its owner's pid means nothing here


@pytest.mark.root
def test_a_dead_owners_mounts_are_detached_not_emptied(tmp_path):
    """What a killed CRIU leaves mounted in its work dir (its cgroup yard:
    the host's cgroup hierarchies) is detached before the dir is removed:
    removing through the mount would delete the host's own entries. Here a
    bind mount of an outside dir stands for it, with a space in its name."""
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "keep").write_text("the host's")
    dead = subprocess.run(
        [sys.executable, "-c", MAKE, "hm-", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    yard = os.path.join(dead, "images", ".criu cgyard")
    os.makedirs(yard)
    subprocess.run(["mount", "--bind", str(outside), yard], check=True, timeout=10)
    try:
        scratch.make("hm-", str(tmp_path))
        assert not os.path.exists(dead)
        assert (outside / "keep").read_text() == "the host's"
    finally:
        subprocess.run(["umount", "-l", yard], capture_output=True, timeout=10)


def test_the_owners_start_is_in_ticks_since_boot(tmp_path):
    """The start time in the owner file is /proc/PID/stat's, in clock ticks
    since boot: a date (psutil's create_time, made from the boot time) moves
    when the clock is stepped, and a sweep then took a live run's dir for a
    dead one's."""
    d = scratch.make("hm-", str(tmp_path))
    pid, start, _ = open(os.path.join(d, scratch.OWNER_FILE)).read().split()
    with open("/proc/self/stat") as f:
        assert (pid, start) == (str(os.getpid()), f.read().rsplit(")", 1)[1].split()[19])
    scratch.make("hm-", str(tmp_path))
    assert os.path.isdir(d)  # its owner, this process, lives
