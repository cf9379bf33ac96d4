"""The guard's socket protocol (destination/guard.py), without a restore:
what the fault loop's "hold 0" and the daemon's ends of the socket do. The
guard's work on a real copy is tested in test_lazy_pages.py and
test_migrate.py."""

import os

import pytest

from hybridmig.bindings.faultloop import FaultLoop
from hybridmig.bindings.pagestore import PageStore
from hybridmig.destination.guard import Guard
from hybridmig.errors import HybridmigError


@pytest.fixture
def guard():
    g = Guard(owner="test")
    yield g
    g.close()
    g.wait(10)


def test_sees_its_end_while_the_fault_loop_holds_a_duplicate(guard):
    """The fault loop keeps a duplicate of the daemon's end: closing the
    daemon's end still ends the guard's input (it shuts the socket down)."""
    loop = FaultLoop(PageStore())
    try:
        loop.set_guard(guard.fileno())
        guard.close()
        assert guard.proc.wait(10) == 0
    finally:
        loop.close()


def test_holds_a_forked_childs_uffd_with_no_pid(guard):
    """ "hold 0" (the fault loop's, for a forked child): held, and let go at
    "installed" like the others."""
    r, w = os.pipe()  # a stand-in for a uffd
    try:
        guard.hold(0, w)
        guard.installed()
    finally:
        os.close(r)
        os.close(w)
    assert guard.finish("done")
    assert guard.proc.wait(10) == 0


def test_a_hold_without_its_descriptor_fails_installed(guard):
    """A "hold" whose descriptor did not come (the guard out of descriptors)
    is a task it could not protect: the owner must not go on to commit."""
    assert guard.sock is not None
    guard.sock.send(b"hold 0")
    with pytest.raises(HybridmigError, match="could not hold the uffds of 1 tasks"):
        guard.installed()


def test_the_fault_loop_refuses_a_guard_once_started():
    loop = FaultLoop(PageStore())
    try:
        loop.start()
        with pytest.raises(HybridmigError):
            loop.set_guard(0)
    finally:
        loop.close()
