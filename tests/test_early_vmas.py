"""CRIU's --early-vmas (scripts/criu-patches/0008): the dump reads the tree's
VMAs (/proc/PID/smaps, the kernel walking every page for it) before seizing
it, and uses that read for a task whose mm_lock_seq (the kernel's count of
mmap write locks, read by a BPF task iterator) did not move since; else it
reads smaps again, frozen, as without the option.

Proven with the CRIU on PATH (CRIU=path, or after make setup): with one
that lacks the patch, the option is refused and every test here fails.
"""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from criu_util import criu_dump, criu_restore
from hybridmig.criu.command import early_vmas_used
from hybridmig.testing.workload import build_program
from lazy_util import wait_for
from test_migrate import assert_migrated, env  # noqa: F401  (env: the fixture)

SRC = Path(__file__).parent / "workload" / "vmatoggle.c"
# the VmFlags CRIU reads (parse_vmflags()) and the protection; not what the
# kernel sets on its own (ac: accounted, mr/mw/me: may-read/write/exec, ...)
CRIU_FLAGS = {"rd", "wr", "ex", "sh", "gd", "lo", "nr", "ht", "dp", "sr", "rr", "dc", "dd", "mg", "hg", "nh", "wf"}


def vmas(pid):
    """[(range, the VmFlags CRIU restores)] of /proc/PID/smaps, in order, the [vdso]/[vvar]/[vsyscall] left out
    (the kernel places them)."""
    out, head = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if fields[0] == "VmFlags:":
                if head is not None:
                    out.append((head, sorted(CRIU_FLAGS.intersection(fields[1:]))))
            elif len(fields) >= 5 and "-" in fields[0] and len(fields[1]) == 4:  # a VMA's line
                head = None if fields[-1] in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]") else fields[0]
    return out


@contextlib.contextmanager
def vmatoggle(tmp_path, mode):
    """vmatoggle running in MODE ("quiet" or "toggle"), its own session."""
    binary = build_program(SRC, "vmatoggle")
    out = tmp_path / "out"
    with open(out, "w") as f:
        proc = subprocess.Popen([binary, mode], stdout=f, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "ready" in out.read_text(), 30, "vmatoggle to start")
        yield proc
    finally:
        proc.kill()
        proc.wait(30)


def dump_stopped(proc, imgs):
    """Dump with --early-vmas, leaving the task stopped as it was frozen:
    (its VMAs now, which the dump had to see; early_vmas_used of the log)."""
    criu_dump(proc.pid, imgs, ["--early-vmas", "--leave-stopped"])
    return vmas(proc.pid), early_vmas_used(imgs / "dump.log")


def restored_vmas(proc, imgs):
    """The VMAs of the task restored (stopped) from imgs, the source ended first."""
    proc.kill()
    proc.wait(30)
    pid = criu_restore(imgs, ["--leave-stopped"])
    try:
        return vmas(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.usefixtures("criu_ready")
def test_quiet_task_uses_the_early_read(tmp_path):
    """A task whose VMAs do not change: the dump takes them from the read
    before the seize, and the restored task has the same VMAs and flags,
    DONTFORK, read-only and WIPEONFORK included."""
    with vmatoggle(tmp_path, "quiet") as proc:
        imgs = tmp_path / "images"
        before, used = dump_stopped(proc, imgs)
        assert used == {"used": [proc.pid], "late": []}, used
        flags = [f for _, f in before]
        assert any("dc" in f for f in flags) and any("wf" in f for f in flags), before
        assert restored_vmas(proc, imgs) == before


@pytest.mark.usefixtures("criu_ready")
def test_task_changing_its_vmas_is_read_again(tmp_path):
    """A task flipping madvise(DONTFORK/DOFORK) and mprotect() of whole VMAs
    in a loop (their ranges, so /proc/PID/maps, never change): the dump sees
    mm_lock_seq move and reads smaps again once the task is frozen, and the
    restored task's VMAs and flags are the source's at the freeze. Whether
    the task toggled between CRIU's two reads depends on the scheduler (a
    loaded machine may not run it for those few ms: the early read is then
    right and used), so it is dumped and restored until a dump reads again,
    at most 20 times; a restore from an early read used must be right too."""
    for attempt in range(20):
        work = tmp_path / str(attempt)
        work.mkdir()
        with vmatoggle(work, "toggle") as proc:
            before, used = dump_stopped(proc, work / "images")
            assert sorted(used["used"] + used["late"]) == [proc.pid], used
            assert restored_vmas(proc, work / "images") == before, used
        if used["late"]:
            return
    pytest.fail("20 dumps of a task toggling its VMAs' flags all used their early read")


@pytest.mark.timeout(300)
def test_switch_over_takes_the_vmas_read_before_the_freeze(env):  # noqa: F811
    """A migration of a tree of two memworks (they write pages, map nothing):
    the switch-over's dump took every task's VMAs from its read before the
    seize, which `run --json` reports apart from the freeze-to-dumped time,
    and the restored tree has every page."""
    wl = env.workload(64, procs=2, threads=1, rate=2000)
    serve = env.serve()
    pids = wl.pids()
    rc, rep, err = env.run(wl.host_pid)
    new = assert_migrated(env, wl, rc, rep, err, serve, 64, procs=2)
    new.stop()
    early = rep["criu_early_vmas"]
    assert sorted(early.get("used", [])) == sorted(pids) and early["late"] == [], (early, pids)
    assert early["read_ms"] > 0, early
    phases = rep["criu_dump_phases_ms"]
    assert "early_vmas" not in phases and phases["vmas"] >= 0, phases
    assert abs(sum(phases.values()) - rep["breakdown"]["freeze_to_dumped_ms"]) < 1, (phases, rep["breakdown"])


@pytest.mark.timeout(300)
def test_switch_over_without_the_option(env):  # noqa: F811
    """--criu-opt=--no-early-vmas: the dump reads the VMAs frozen, as CRIU
    does by itself, and the report says no early read."""
    wl = env.workload(64, threads=1, rate=2000)
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid, "--criu-opt=--no-early-vmas")
    assert_migrated(env, wl, rc, rep, err, serve, 64).stop()
    assert rep["criu_early_vmas"] == {}, rep["criu_early_vmas"]
    assert rep["criu_dump_phases_ms"]["vmas"] > 0, rep["criu_dump_phases_ms"]
