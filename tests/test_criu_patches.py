"""The CRIU that `make setup` builds carries fixes of CRIU bugs hybridmig
runs into (scripts/criu-patches/); each is proven here against the CRIU on
PATH, with a process that triggers the bug, and its speed-ups are shown to
dump what CRIU dumped without them. It also keeps its kernel probes
cached where this machine's /run cannot."""

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from criu_util import criu_binary, criu_dump
from hybridmig import doctor
from hybridmig.criu import images
from hybridmig.testing.workload import build_program
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
