"""Shared fixtures, and the one skip hook of the markers `root` and `criu`.

A test that uses the `criu_ready` fixture is a `criu` test. `make test-unit`
runs the tests marked with none of `root`, `criu`, `slow` (pyproject.toml).
"""

import os
from pathlib import Path

import pytest

from criu_util import require_root_and_criu
from hybridmig.testing.workload import become_subreaper


def pytest_collection_modifyitems(items):
    for item in items:
        if "criu_ready" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.criu)


def pytest_runtest_setup(item):
    if item.get_closest_marker("criu"):
        reason = require_root_and_criu()
        if reason:
            pytest.skip(reason)
        if not os.path.exists("/dev/userfaultfd") and not os.path.exists("/proc/sys/vm/unprivileged_userfaultfd"):
            pytest.skip("this kernel has no userfaultfd")
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture(scope="session")
def criu_ready():
    """What a `criu` test needs beyond the skip hook's checks."""
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
