"""Shared fixtures: the real-CRIU tests need root, CRIU and userfaultfd."""

import os
from pathlib import Path

import pytest

from criu_util import require_root_and_criu
from hybridmig.testing.workload import become_subreaper


@pytest.fixture(scope="session")
def criu_ready():
    reason = require_root_and_criu()
    if reason:
        pytest.skip(reason)
    if not os.path.exists("/dev/userfaultfd") and not os.path.exists("/proc/sys/vm/unprivileged_userfaultfd"):
        pytest.skip("this kernel has no userfaultfd")
    # Restored trees are re-parented: adopt them so they can be reaped.
    become_subreaper()


# CRIU's page server tee()s up to 4 MiB (PIPE_MAX_SIZE pages)
PAGE_SERVER_PIPE_SIZE = 4194304


@pytest.fixture(scope="module")
def pipe_max_size():
    """CRIU's page server needs pipes of 4 MiB; root without CAP_SYS_RESOURCE
    cannot exceed fs.pipe-max-size. Raised for the tests, then restored."""
    path = "/proc/sys/fs/pipe-max-size"
    old = int(Path(path).read_text())
    if old < PAGE_SERVER_PIPE_SIZE:
        Path(path).write_text(str(PAGE_SERVER_PIPE_SIZE))
    try:
        yield
    finally:
        if old < PAGE_SERVER_PIPE_SIZE:
            Path(path).write_text(str(old))
