"""`hybridmig lazy-pages` serving real `criu restore --lazy-pages` runs of the
self-verifying workload: every page of every process must verify after the
restore, whatever the process does while pages are still pending."""

import errno
import os
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest

from criu_util import CriuError, criu_dump, criu_restore
from hybridmig.testing.workload import Workload
from lazy_util import HYBRIDMIG, LazyDaemon, lazy_restore, lost_memory, restored_alive, wait_for

pytestmark = pytest.mark.usefixtures("criu_ready")


def dump(wl, tmp_path):
    images = tmp_path / "images"
    criu_dump(wl.host_pid, images)
    wl.wait_gone()
    return images


def assert_clean(reports):
    assert reports, "no verify report"
    for r in reports:
        assert r["bad"] == 0 and r.get("zero_pages_bad", 0) == 0, r


def migrate_and_verify(tmp_path, size_mb, threads=1, procs=1, daemon_args=()):
    with Workload.start(size_mb, threads=threads, procs=procs) as wl:
        wl.verify()
        images = dump(wl, tmp_path)
        pid, daemon = lazy_restore(images, *daemon_args)
        with daemon, Workload.adopt(pid, report=wl) as restored:
            assert daemon.wait(120) == 0, daemon.output()
            assert_clean(restored.verify())
            return daemon.stats(), restored.reports("verify")


def test_one_gib_single_thread(tmp_path):
    stats, _ = migrate_and_verify(tmp_path, 1024)
    assert stats["tasks"] == 1
    # every dumped page went in through the fault loop, none is left over
    assert stats["pages_fault"] + stats["pages_prefetch"] >= 1024 * 256
    assert stats["bytes_copied"] >= 1 << 30


def test_eight_writing_threads(tmp_path):
    stats, reports = migrate_and_verify(tmp_path, 256, threads=8)
    assert stats["tasks"] == 1
    assert len(reports[-1]["ops_per_thread"]) == 8


def test_tree_of_three_processes(tmp_path):
    stats, reports = migrate_and_verify(tmp_path, 128, procs=3)
    assert stats["tasks"] == 3
    assert len({r["pid"] for r in reports[-3:]}) == 3


def pending_restore(tmp_path, size_mb, procs=1, delay=3.0):
    """A restored workload whose pages are mostly still pending: the daemon
    installs only on fault for `delay` seconds."""
    wl = Workload.start(size_mb, procs=procs, rate=200, check_writes=True)
    try:
        images = dump(wl, tmp_path)
        pid, daemon = lazy_restore(images, "--eager-delay", str(delay))
    except BaseException:
        wl.stop()
        raise
    return wl, pid, daemon


def test_fork_after_restore_reads_pending_pages(tmp_path):
    wl, pid, daemon = pending_restore(tmp_path, 256)
    with daemon, Workload.adopt(pid, report=wl) as restored:
        # The child is forked while nearly every page is still pending: it
        # must read the pages it inherited, served through its own uffd.
        assert_clean(restored.fork_verify())
        assert daemon.wait(120) == 0, daemon.output()
        stats = daemon.stats()
        assert stats["forks"] >= 1
        # its uffd went to the guard too, the pages being owed
        assert stats["forks_held"] >= 1, stats
        assert stats["tasks"] == 1
        assert_clean(restored.verify())


def test_mremap_munmap_madvise_after_restore(tmp_path):
    wl, pid, daemon = pending_restore(tmp_path, 256)
    with daemon, Workload.adopt(pid, report=wl) as restored:
        # mremap moves pending pages, munmap drops some, MADV_DONTNEED drops
        # others which must then read as zeros, never as the old data.
        assert_clean(restored.churn_verify())
        assert daemon.wait(120) == 0, daemon.output()
        assert_clean(restored.verify())
        assert_clean(restored.churn_verify())


def test_workload_exits_while_pages_pending(tmp_path):
    wl, pid, daemon = pending_restore(tmp_path, 256, delay=5.0)
    with daemon, Workload.adopt(pid, report=wl) as restored:
        restored.stop()
        assert daemon.wait(60) == 0, daemon.output()
        assert not restored.alive()


def test_daemon_killed_while_pages_are_owed(tmp_path):
    """`hybridmig lazy-pages` used alone is SIGKILLed while the restored
    workload still owes most of its pages (it installs only on fault): its
    guard, holding the tasks' uffds, ends the workload, which meanwhile waits
    on its faults instead of reading zero pages."""
    wl, pid, daemon = pending_restore(tmp_path, 256, delay=30.0)
    with daemon, Workload.adopt(pid, report=wl) as restored:
        (guard,) = psutil.Process(daemon.proc.pid).children()
        time.sleep(0.3)  # the writers fault pages in, one by one
        daemon.proc.kill()
        daemon.proc.wait(10)
        wait_for(lambda: not restored.alive(), 10, "the restored workload to be ended")
        guard.wait(10)
        assert not lost_memory(restored), lost_memory(restored)
        assert "guard: ended the restored copy, pid %d" % pid in daemon.output(), daemon.output()
        assert not restored_alive(wl.report_path)


def test_daemon_killed_right_after_a_fork(tmp_path):
    """A child forked after the restore gets its uffd from the fork event,
    not from CRIU: the fault loop hands it to the guard before it serves the
    child. The daemon is SIGKILLed as soon as the child exists, which still
    owes nearly every page, while the guard is stopped (a slow guard, and a
    wide window): the child's faults must wait on the guard's duplicate,
    never read zeros, until the guard, continued, ends the tree."""
    wl, pid, daemon = pending_restore(tmp_path, 256, delay=30.0)
    with daemon, Workload.adopt(pid, report=wl) as restored:
        root = psutil.Process(pid)
        (guard,) = psutil.Process(daemon.proc.pid).children()
        guard.suspend()
        try:
            root.send_signal(signal.SIGUSR2)  # fork-verify: the child reads every page it inherited
            (child,) = wait_for(root.children, 10, "the fork-verify child", interval=0.001)
            daemon.proc.kill()
            daemon.proc.wait(10)
            # Holding no duplicate, the guard would leave the child's faults
            # to be resolved with zero pages: it would read them and report
            # them (bad pages, or a crash on zeroed libc data) well within
            # this bound; holding one, the child waits in its faults.
            try:
                wait_for(lambda: restored.reports("fork-verify") or lost_memory(restored), 3, "a report")
            except TimeoutError:
                pass
            try:
                waits = not restored.reports("fork-verify") and child.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                waits = False
        finally:
            guard.resume()
        wait_for(lambda: not restored.alive(), 10, "the restored workload to be ended")
        guard.wait(10)
        read_zeros = [r for r in restored.reports("fork-verify") if r.get("bad")]
        assert not read_zeros and not lost_memory(restored), read_zeros + lost_memory(restored)
        # (not done reading before the daemon died, or this test proved nothing)
        assert waits, restored.reports("fork-verify")
        assert "guard: ended the restored copy, pid %d" % pid in daemon.output(), daemon.output()
        assert not restored_alive(wl.report_path)


# --- the fault thread and the installers at once ---------------------------


def test_faults_served_while_installers_copy(tmp_path):
    """Four unthrottled writers fault on pages the two installers have not
    reached yet: the fault thread serves them while copies are in flight."""
    with Workload.start(512, threads=4) as wl:
        images = dump(wl, tmp_path)
        pid, daemon = lazy_restore(images)
        with daemon, Workload.adopt(pid, report=wl) as restored:
            assert daemon.wait(120) == 0, daemon.output()
            stats = daemon.stats()
            assert stats["installers"] == min(2, os.cpu_count())
            assert stats["faults_during_install"] > 0, stats
            assert stats["pages_fault"] + stats["pages_prefetch"] >= 512 * 256
            assert_clean(restored.verify())
    # where the faults' time went: a gate wait per fault read, a latency and
    # a copy per fault served, the installers' ioctls, each installer on a
    # CPU of its own; faults read while copies were in flight waited at the
    # gate
    gate, parts = stats["gate"], stats["breakdown"]
    assert parts["gate"]["count"] == stats["faults"], parts
    assert 0 < parts["fault_copy"]["count"] <= parts["latency"]["count"] <= stats["faults"], parts
    assert parts["latency"]["p99_us"] == stats["fault_latency_us"]["p99"]
    assert sum(parts["installer_copy"]["buckets_us"].values()) == parts["installer_copy"]["count"] > 0
    assert gate["gate_waits"] > 0, gate
    if len(os.sched_getaffinity(0)) >= stats["installers"]:
        assert gate["installers_pinned"] == stats["installers"], gate


@pytest.mark.parametrize("installers", [1, 2])
def test_mremap_munmap_madvise_and_fork_while_installing(tmp_path, installers):
    """The mappings change under the installers' feet: pages moved, unmapped
    and zapped while copies into the task are in flight must end as the
    process expects (zapped pages read zeros, never old data), and a child
    forked meanwhile must read what it inherited. One page per copy keeps
    the install going for a while."""
    with Workload.start(1024, threads=2, rate=2000) as wl:
        images = dump(wl, tmp_path)
        pid, daemon = lazy_restore(images, "--installers", str(installers), "--batch-pages", "1")
        with daemon, Workload.adopt(pid, report=wl) as restored:
            # the fork first: the child owes all its parent still did, which
            # keeps the installers busy while the parent churns (at once:
            # waiting for the child's check first let the install end before
            # the churn on a loaded machine)
            forks, churns = restored.fork_and_churn_verify()
            assert_clean(forks)
            assert_clean(churns)
            assert daemon.wait(120) == 0, daemon.output()
            stats = daemon.stats()
            assert stats["installers"] == installers
            assert stats["events_remove"] > 0 and stats["events_remap"] > 0 and stats["forks"] >= 1, stats
            # the events did come while installer copies were in flight,
            # or this test proved nothing about the two threads
            assert stats["events_during_install"] > 0, stats
            # and claims were cut short by the gate, their rest owed again
            assert stats["gate"]["claims_cut"] > 0, stats["gate"]
            assert_clean(restored.verify())
            assert_clean(restored.churn_verify())


def test_installer_options_are_checked(dumped):
    images, _ = dumped
    with LazyDaemon(images, "--installers", "0") as daemon:
        assert daemon.wait(30) != 0
        assert "--installers" in daemon.output()


# --- bad input -------------------------------------------------------------


@pytest.fixture
def dumped(tmp_path):
    """Images of a small dumped workload, and the report path its processes carry."""
    wl = Workload.start(32)
    report_dir = tmp_path / "report"
    shutil.copytree(wl.report_path.parent, report_dir)
    images = dump(wl, tmp_path)
    yield images, wl.report_path
    for pid in restored_alive(wl.report_path):
        os.kill(pid, signal.SIGKILL)
    wl.stop()


def failed_restore(images, report_path, expect):
    """The daemon must refuse the images at once with a message naming
    `expect`, and a restore must fail without leaving a process running on
    zero-filled memory."""
    with LazyDaemon(images) as daemon:
        rc = daemon.wait(30)
        out = daemon.output()
    assert rc != 0
    assert expect in out, out
    assert not (images / "lazy-pages.socket").exists()
    with pytest.raises(CriuError):
        criu_restore(images, extra=["--lazy-pages"], timeout=60)
    wait_for(lambda: not restored_alive(report_path), 10, "the failed restore's processes to go")


def test_missing_pagemap(dumped):
    images, report = dumped
    os.unlink(images / "pagemap-1.img")
    failed_restore(images, report, "pagemap-1.img: missing")


def test_truncated_pages_image(dumped):
    images, report = dumped
    pages = next(images.glob("pages-*.img"))
    os.truncate(pages, os.path.getsize(pages) // 2)
    failed_restore(images, report, f"{pages.name}: truncated")


def test_corrupted_pagemap(dumped):
    images, report = dumped
    path = images / "pagemap-1.img"
    data = bytearray(path.read_bytes())
    data[8:] = b"\xff" * (len(data) - 8)  # keep the magic, garble the entries
    path.write_bytes(bytes(data))
    failed_restore(images, report, "pagemap-1.img")


def writer_of(fifo):
    """A write end of fifo once a reader has it open, else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


def test_listens_before_reading_images(dumped):
    """The socket is up before any image is read (runc's users start the
    daemon and `runc restore --lazy-pages` back to back): with pstree.img a
    FIFO nobody writes, reading the images blocks, yet a client connects.
    When the images then turn out bad, the connected client is dropped."""
    images, _ = dumped
    pstree = images / "pstree.img"
    pstree.unlink()
    os.mkfifo(pstree)
    with LazyDaemon(images) as daemon:
        assert daemon.wait_listening(), daemon.output()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(30)
        try:
            client.connect(str(images / "lazy-pages.socket"))
            # the daemon waits in the FIFO's open: let it read an empty image
            os.close(wait_for(lambda: writer_of(pstree), 30, "the daemon to open pstree.img"))
            assert daemon.wait(30) != 0
            with pytest.raises(ConnectionResetError):
                if client.recv(1) == b"":  # dropped, as a restore would be
                    raise ConnectionResetError
        finally:
            client.close()
        out = daemon.output()
    assert "pstree.img" in out and "Traceback" not in out, out
    assert not (images / "lazy-pages.socket").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-D", "IMG"],
        ["-DIMG"],
        ["--images-dir=IMG"],
        ["-D", "IMG", "-W", "WORK"],
        ["-D", "IMG", "--work-dir=WORK"],
        ["-D", "IMG", "-WWORK"],
    ],
)
def test_socket_bound_before_the_imports(tmp_path, args):
    """`hybridmig lazy-pages` binds its socket off the command line before
    it imports click and its modules (~80 -> ~27 ms to a connectable
    socket here; docs/results.md): in -W, else -D, in each form click
    takes. A command line it then refuses leaves no socket behind."""
    img, work = tmp_path / "img", tmp_path / "work"
    img.mkdir()
    work.mkdir()
    argv = [a.replace("IMG", str(img)).replace("WORK", str(work)) for a in args]
    where = work if any("WORK" in a for a in args) else img
    os.mkfifo(img / "pstree.img")  # reading the images blocks: the socket must come first
    proc = subprocess.Popen(
        [*HYBRIDMIG, "lazy-pages", *argv, "--timeout", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        sock = where / "lazy-pages.socket"
        wait_for(lambda: sock.exists() or proc.poll() is not None, 30, "lazy-pages.socket")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(str(sock))
        finally:
            client.close()
    finally:
        proc.kill()
        proc.wait(30)
        proc.stderr.close()
    # --page-server without --address: refused by the command, after the early bind
    bad = subprocess.run([*HYBRIDMIG, "lazy-pages", *argv, "--page-server"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--page-server needs --address" in bad.stderr, bad.stderr
    assert not (where / "lazy-pages.socket").exists()
    assert sorted(os.listdir(where)) == (["pstree.img"] if where == img else [])


def test_socket_in_use(dumped):
    images, _ = dumped
    with LazyDaemon(images) as first:
        assert first.wait_listening(), first.output()
        with LazyDaemon(images) as second:
            assert second.wait(30) != 0
            assert "is in use" in second.output()
    # the first daemon is gone: its socket is stale and may be taken over
    with LazyDaemon(images) as third:
        assert third.wait_listening(), third.output()


def test_work_dir_not_writable(dumped, tmp_path):
    """Root writes anywhere, but not into an immutable directory."""
    images, _ = dumped
    work = tmp_path / "ro"
    work.mkdir()
    if subprocess.run(["chattr", "+i", str(work)], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i is not supported on {work}: cannot make a directory root cannot write")
    try:
        with LazyDaemon(images, work_dir=work, log_dir=tmp_path) as daemon:
            assert daemon.wait(30) != 0
            out = daemon.output()
        assert "not writable" in out and str(work) in out, out
        assert "Traceback" not in out, out
    finally:
        subprocess.run(["chattr", "-i", str(work)])
