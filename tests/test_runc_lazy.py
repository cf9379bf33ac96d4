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


def test_runc_lazy_migration_through_hybridmig_lazy_pages(bundle, tmp_path):
    source = bundle.start("hm-lazy-src")
    assert all(r["bad"] == 0 for r in source.verify())
    images, work = tmp_path / "images", tmp_path / "work"
    images.mkdir()
    work.mkdir()
    port = free_port()
    status_r, status_w = os.pipe()  # runc wants its --status-fd write-only
    checkpoint = subprocess.Popen(
        [RUNC, "--root", str(bundle.state), "checkpoint", "--lazy-pages", "--page-server", f"127.0.0.1:{port}"]
        + ["--status-fd", str(status_w), "--image-path", str(images), "--work-path", str(work), "hm-lazy-src"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(status_w,),
        text=True,
    )
    os.close(status_w)
    daemon = None
    try:
        # the page server is up once CRIU writes its status byte
        ready = select.select([status_r], [], [], 60)[0] and os.read(status_r, 1)
        assert ready, "runc checkpoint --lazy-pages never reported its page server ready: " + checkpoint.stderr.read()
        daemon = LazyDaemon(images, "--page-server", "--address", "127.0.0.1", "--port", str(port), log_dir=tmp_path)
        assert daemon.wait_listening(), daemon.output()
        # CRIU finds the daemon's socket in its work dir: the images dir here
        restore = bundle.detached(
            "hm-lazy-dst",
            "restore",
            "--lazy-pages",
            "--detach",
            "--image-path",
            str(images),
            "--work-path",
            str(images),
            "--bundle",
            str(bundle.dir),
        )
        assert restore.returncode == 0, f"runc restore --lazy-pages failed: {restore.stdout}"
        assert daemon.wait(120) == 0, daemon.output()
        assert checkpoint.wait(60) == 0, checkpoint.stderr.read()
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
        os.close(status_r)
        if daemon is not None:
            daemon.close()
        if checkpoint.poll() is None:
            checkpoint.kill()
            checkpoint.wait(10)
