"""The CRIU that `make setup` builds carries fixes of CRIU bugs hybridmig
runs into (scripts/criu-patches/); each is proven here against the CRIU on
PATH, with a process that triggers the bug, and its speed-ups are shown to
dump what CRIU dumped without them. It also keeps its kernel probes
cached where this machine's /run cannot."""

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from criu_util import criu_binary, criu_dump
from hybridmig import doctor
from hybridmig.criu import images
from hybridmig.destination import lazysocket
from hybridmig.testing.workload import Workload, build_program
from lazy_util import wait_for

pytestmark = pytest.mark.usefixtures("criu_ready")

SRC = Path(__file__).parent / "workload" / "alignedsp.c"


def test_lazy_dump_with_a_page_aligned_stack_pointer(tmp_path):
    """A thread whose stack pointer is page-aligned when CRIU freezes it:
    4.2.1 as released took every page for a stack page and dumped the whole
    memory into pages.img; patched, the 16 MiB of data stay lazy."""
    binary = build_program(SRC, "alignedsp")
    out = tmp_path / "out"
    with open(out, "w") as f:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "setsid", binary], stdout=f, stdin=subprocess.DEVNULL, start_new_session=True
        )
    dump = None
    try:
        init = wait_for(
            lambda: "ready" in out.read_text() and psutil.Process(proc.pid).children()[0].pid, 30, "alignedsp to start"
        )
        imgs = tmp_path / "images"
        imgs.mkdir()
        rfd, wfd = os.pipe()
        dump = subprocess.Popen(
            [
                criu_binary(),
                "dump",
                "-t",
                str(init),
                "-D",
                str(imgs),
                "-o",
                "dump.log",
                "-v3",
                "--lazy-pages",
                "--address",
                "127.0.0.1",
                "--status-fd",
                str(wfd),
            ],
            pass_fds=(wfd,),
            stdin=subprocess.DEVNULL,
        )
        os.close(wfd)
        ready = os.read(rfd, 1)  # the page server is up: the images are written
        os.close(rfd)
        assert ready, (imgs / "dump.log").read_text()[-3000:]
        task = images.read_task(str(imgs), 1)
        assert task.lazy_pages >= 4096, "%d lazy pages: CRIU dumped the memory eagerly" % task.lazy_pages
    finally:
        if dump is not None and dump.poll() is None:
            dump.kill()  # the frozen tree resumes; it is ended by pid below
            dump.wait(30)
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait(30)


def test_pagemap_of_anonymous_and_file_pages_side_by_side(tmp_path):
    """0005 drops the file-page filter of PAGEMAP_SCAN for anonymous VMAs
    only: with an anonymous and a file mapping in one scan of the pagemap
    cache, the dump keeps the 8 written anonymous pages and the 4 written
    file pages, not the 12 file pages only read (16 with a filter dropped
    for the whole scan)."""
    binary = build_program(Path(__file__).parent / "workload" / "mixedmaps.c", "mixedmaps")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(16 * 4096))
    out = tmp_path / "out"
    with open(out, "w") as f:
        proc = subprocess.Popen([binary, str(data)], stdout=f, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "ready" in out.read_text(), 30, "mixedmaps to start")
        base = int(out.read_text().split()[0], 16)
        imgs = tmp_path / "images"
        criu_dump(proc.pid, imgs, ["--leave-running"])
        _, entries = images._pagemap(str(imgs / f"pagemap-{proc.pid}.img"))

        def dumped(lo, hi):
            return sum(max(0, min(v + n * 4096, hi) - max(v, lo)) // 4096 for v, n, _ in entries)

        mid = base + 16 * 4096
        assert (dumped(base, mid), dumped(mid, mid + 16 * 4096)) == (8, 4), entries
        assert "cache  mode" in (imgs / "dump.log").read_text()  # both VMAs were in one scan
    finally:
        proc.kill()
        proc.wait(30)


def test_kerndat_is_cached():
    """make setup builds CRIU to keep what it probes of the kernel at start
    (kerndat) on a tmpfs, /run or its own where /run is none: a later start
    loads it instead of probing again (~40 ms of every restore)."""
    criu = criu_binary()
    stamp = os.path.join(os.path.dirname(os.path.realpath(criu)), doctor.CRIU_PATCH_STAMP)
    if not os.path.exists(stamp):
        pytest.skip(f"{criu} was not built by make setup")
    rundir = Path(stamp).read_text().split("rundir=")[1].split()[0]
    fs = subprocess.run(["stat", "-f", "-c", "%T", rundir], capture_output=True, text=True).stdout.strip()
    assert fs == "tmpfs", f"{rundir} is on {fs}: CRIU keeps no cache there (make setup mounts it)"
    subprocess.run([criu, "check"], capture_output=True, timeout=60)
    out = subprocess.run([criu, "check", "-v4"], capture_output=True, text=True, timeout=60)
    assert f"Loaded kdat cache from {rundir}/criu.kdat" in out.stderr + out.stdout, out.stderr[-2000:]


# Run as a child subreaper, so that what a killed CRIU leaves behind is
# reparented here (not to init, among other users' processes): the CRIU
# commands, each killed within its first milliseconds, then whatever of
# theirs still lives, as pids on stdout.
_KILL_CRIU_EARLY = """
import ctypes, os, random, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
criu, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    p = subprocess.Popen([criu, "check"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.uniform(0, 0.012))
    p.kill()
    p.wait()
time.sleep(0.3)
def state(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
live = [c for c in children if state(c) != "Z"]
print(" ".join(live))
for c in live:
    os.kill(int(c), signal.SIGKILL)
"""


def test_a_criu_killed_at_its_start_leaves_no_probe_child():
    """Every CRIU command forks a child to probe ptrace with, and kills it a
    few milliseconds later. 4.2.1 as released left it sleeping for ever when
    CRIU itself was killed in those milliseconds (6 of 400 kills here): a
    stray "criu" per server killed at a restore's start. Patched, it dies
    with its CRIU."""
    out = subprocess.run(
        [sys.executable, "-c", _KILL_CRIU_EARLY, criu_binary(), "600"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [], f"killed CRIUs left these processes running: {out.stdout}"


def _daemon_that_leaves(sock, nr_tasks, gone):
    """A lazy-pages daemon that takes every task's pid and userfaultfd, then
    closes its socket before CRIU says "restore finished"."""
    conn, _ = sock.accept()
    with conn:
        for _ in range(nr_tasks):
            conn.recv(4, socket.MSG_WAITALL)  # the pid
            _, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for (fd,) in struct.iter_unpack("i", data[: len(data) - len(data) % 4]):
                        os.close(fd)
    gone.set()


def test_failed_restore_ends_a_threaded_init(tmp_path):
    """The lazy-pages daemon leaves after CRIU handed it the userfaultfds,
    before "restore finished": CRIU, tracing every thread by then, kills the
    tree. 4.2.1 as released then waited for ever on a pid-namespace init
    with threads (their zombies only CRIU, their tracer, can reap, and
    init's exit waits for them), and runc or podman above it with it;
    patched, it reaps them and fails."""
    imgs = tmp_path / "images"
    with Workload.start(16, threads=2) as wl:
        criu_dump(wl.host_pid, imgs)
    sock = lazysocket.listen(str(imgs))
    gone = threading.Event()
    daemon = threading.Thread(target=_daemon_that_leaves, args=(sock, len(images.task_pids(str(imgs))), gone))
    daemon.start()
    pidfile = tmp_path / "restore.pid"
    cmd = [criu_binary(), "restore", "-D", str(imgs), "-W", str(imgs), "--lazy-pages", "-d"]
    cmd += ["--pidfile", str(pidfile), "-o", "restore.log", "-v4"]
    restore = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rc = restore.wait(60)
    except subprocess.TimeoutExpired:
        rc = None
        restore.kill()  # its tracees, released, end their exit
        restore.wait(30)
    finally:
        restore.stderr.close()
        sock.close()
        daemon.join(30)
    log = (imgs / "restore.log").read_text()
    assert gone.is_set(), "CRIU never handed the daemon its tasks:\n" + log[-3000:]
    assert rc is not None, "criu restore still waited 60 s after its lazy-pages daemon left:\n" + log[-2000:]
    assert rc != 0 and "Failed sending restore finished indication" in log, log[-3000:]
    root = int(pidfile.read_text()) if pidfile.exists() else None
    assert root is None or not psutil.pid_exists(root) or psutil.Process(root).status() == psutil.STATUS_ZOMBIE
