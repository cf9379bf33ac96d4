"""Shared fixtures: the real-CRIU tests need root, CRIU and userfaultfd."""

import os

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
