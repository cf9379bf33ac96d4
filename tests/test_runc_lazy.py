"""`hybridmig lazy-pages` as the daemon runc expects (as runc's own
checkpoint.bats starts `criu lazy-pages`): `runc checkpoint --lazy-pages
--page-server`, the daemon fetching from that page server, and `runc
restore --lazy-pages` of a busybox container running memwork, whose every
page must verify after the restore."""

import os
import select
import socket
import subprocess

import pytest

from container_util import RUNC, RuncBundle, need_runc
from hybridmig.criu.pageserver import PageServerSource
from hybridmig.testing.workload import Workload
from lazy_util import LazyDaemon

pytestmark = pytest.mark.usefixtures("criu_ready")


@pytest.fixture
def bundle(pipe_max_size):
    reason = need_runc()
    if reason:
        pytest.skip(reason)
    b = RuncBundle(size_mb=128)
    yield b
    b.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def abort_page_server(port):
    """Fail the session of a lazy dump's page server: the dump resumes its tasks and exits."""
    src = PageServerSource("127.0.0.1", port)
    src.connect()
    src.abort()


class LazyCheckpoint:
    """`runc checkpoint --lazy-pages --page-server` of container `name`,
    running until its page server is served; close() ends it either way
    (runc's CRIU outlives a killed runc: its session is failed instead)."""

    def __init__(self, bundle, name, tmp_path):
        self.bundle = bundle
        self.images, work = tmp_path / "images", tmp_path / "work"
        self.images.mkdir()
        work.mkdir()
        bundle.image_dirs.append(self.images)
        self.port = free_port()
        status_r, status_w = os.pipe()  # runc wants its --status-fd write-only
        self.proc = subprocess.Popen(
            [RUNC, "--root", str(bundle.state), "checkpoint", "--lazy-pages", "--page-server"]
            + [f"127.0.0.1:{self.port}", "--status-fd", str(status_w), "--image-path", str(self.images)]
            + ["--work-path", str(work), name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            text=True,
        )
        os.close(status_w)
        try:
            # the page server is up once CRIU writes its status byte
            ready = select.select([status_r], [], [], 60)[0] and os.read(status_r, 1)
        finally:
            os.close(status_r)
        if not ready:
            self.close()
            raise AssertionError("runc checkpoint --lazy-pages never reported its page server ready")

    def restore(self, name, timeout=120):
        """`runc restore --lazy-pages` of the images as container `name`;
        CRIU finds the daemon's socket in its work dir, the images dir here."""
        return self.bundle.detached(
            name,
            "restore",
            "--lazy-pages",
            "--detach",
            "--image-path",
            str(self.images),
            "--work-path",
            str(self.images),
            "--bundle",
            str(self.bundle.dir),
            timeout=timeout,
        )

    def close(self):
        if self.proc.poll() is None:
            try:
                abort_page_server(self.port)
            except OSError:
                pass  # already served
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stderr.close()


def page_server_daemon(images, port, log_dir):
    """`hybridmig lazy-pages --page-server` started as runc's users start `criu lazy-pages`."""
    daemon = LazyDaemon(images, "--page-server", "--address", "127.0.0.1", "--port", str(port), log_dir=log_dir)
    if not daemon.wait_listening():
        daemon.close()
        raise AssertionError("hybridmig lazy-pages exited early:\n" + daemon.output())
    return daemon


def test_runc_lazy_migration_through_hybridmig_lazy_pages(bundle, tmp_path):
    source = bundle.start("hm-lazy-src")
    assert all(r["bad"] == 0 for r in source.verify())
    checkpoint = LazyCheckpoint(bundle, "hm-lazy-src", tmp_path)
    daemon = None
    try:
        daemon = page_server_daemon(checkpoint.images, checkpoint.port, tmp_path)
        restore = checkpoint.restore("hm-lazy-dst")
        assert restore.returncode == 0, f"runc restore --lazy-pages failed: {restore.stdout}"
        assert daemon.wait(120) == 0, daemon.output()
        assert checkpoint.proc.wait(60) == 0, checkpoint.proc.stderr.read()
        stats = daemon.stats()
        assert stats["tasks"] == 1 and stats["lazy_pages"] >= 128 * 256, stats
        assert stats["pages_fault"] + stats["pages_prefetch"] >= 128 * 256, stats
        # the source container ended with its checkpoint; the restored one runs
        assert bundle.runc("state", "hm-lazy-src").returncode != 0 or (
            bundle.state_of("hm-lazy-src")["status"] == "stopped"
        )
        assert bundle.state_of("hm-lazy-dst")["status"] == "running"
        restored = Workload(bundle.pid("hm-lazy-dst"), bundle.report, 1)
        reports = restored.verify()
        assert reports and all(r["bad"] == 0 and r.get("zero_pages_bad", 0) == 0 for r in reports), reports
    finally:
        if daemon is not None:
            daemon.close()
        checkpoint.close()


def test_runc_restore_fails_when_the_page_server_closes(bundle, tmp_path):
    """The daemon's page server closes at the first request: the daemon
    exits non-zero, `runc restore` fails within a bound, and the source
    container, its checkpoint told of the failure, runs on intact."""
    source = bundle.start("hm-lazy-src")
    checkpoint = LazyCheckpoint(bundle, "hm-lazy-src", tmp_path)
    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen(1)
    daemon = None
    try:
        daemon = page_server_daemon(checkpoint.images, closer.getsockname()[1], tmp_path)
        conn, _ = closer.accept()
        conn.close()  # before the first answer
        restore = checkpoint.restore("hm-lazy-dst", timeout=30)
        assert restore.returncode != 0, "runc restore succeeded without its lazy pages"
        assert daemon.wait(60) != 0
        assert "closed the connection" in daemon.output(), daemon.output()
        # the checkpoint's page server was never served: a failed session
        # makes it resume the container
        abort_page_server(checkpoint.port)
        assert checkpoint.proc.wait(60) != 0
    finally:
        closer.close()
        if daemon is not None:
            daemon.close()
        checkpoint.close()
    assert bundle.state_of("hm-lazy-src")["status"] == "running"
    assert all(r["bad"] == 0 for r in source.verify())
