"""Shared fixtures, and the one skip hook of the markers `root` and `criu`.

A test that uses the `criu_ready` fixture is a `criu` test. `make test-unit`
runs the tests marked with none of `root`, `criu`, `slow` (pyproject.toml).
"""

import os

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
