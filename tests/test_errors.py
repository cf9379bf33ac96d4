"""One error model: the errno of a native call decides the exception's class
(psutil style), and every one names the call and the process it was about."""

import errno
import os
import socket
import struct

import pytest

from hybridmig.bindings import tracker as native
from hybridmig.bindings.faultloop import FaultLoop
from hybridmig.bindings.pagestore import PageStore
from hybridmig.bindings.ranges import Ranges
from hybridmig.errors import (
    AccessDenied,
    HybridmigError,
    NativeError,
    ProcessGone,
    StoreError,
    UffdError,
    UsageError,
    native_error,
)


def _unused_pid():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


@pytest.mark.parametrize(
    "code, cls, builtin",
    [
        (errno.ESRCH, ProcessGone, ProcessLookupError),
        (errno.EPERM, AccessDenied, PermissionError),
        (errno.EACCES, AccessDenied, PermissionError),
        (errno.EINVAL, StoreError, OSError),
    ],
)
def test_the_errno_decides_the_class(code, cls, builtin):
    e = native_error(code, "what happened", origin="hm_call", pid=42, fallback=StoreError)
    assert type(e) is cls and isinstance(e, builtin) and isinstance(e, NativeError) and isinstance(e, HybridmigError)
    assert (e.errno, e.strerror, e.origin, e.pid) == (code, "what happened", "hm_call", 42)


def test_a_process_that_does_not_exist_is_gone_with_its_pid_and_the_call():
    pid = _unused_pid()
    with pytest.raises(ProcessGone) as gone:
        native.read_pages_into(pid, 0x10000, bytearray(4096))
    assert gone.value.pid == pid and gone.value.origin == "hm_read_pages"
    assert "originated from hm_read_pages" in str(gone.value)


def test_a_call_about_no_process_keeps_its_class_whatever_the_errno():
    e = native_error(errno.EACCES, "a file", origin="hm_store_load_fd", fallback=StoreError)
    assert type(e) is StoreError and e.pid is None


def test_other_errnos_stay_native_errors_of_their_module():
    with pytest.raises(NativeError) as e:
        Ranges().add(20, 10)
    assert not isinstance(e.value, (ProcessGone, AccessDenied))
    assert (e.value.errno, e.value.origin, e.value.pid) == (errno.EINVAL, "hm_ranges_add", None)
    store = PageStore()
    store.put(1, 0x10000, bytes(4096))
    with pytest.raises(StoreError):
        store.clone_task(1, 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: PageStore().put(1, 0x10001, bytes(4096)),
        lambda: PageStore().put(1, 0x10000, bytes(100)),
        lambda: PageStore().load_file(1, 0x10000, 1, 0, 5),
        lambda: native.read_pages_into(-1, 0x10000, bytearray(4096)),
        lambda: native.remote_syscall(1, 39, *range(7)),
    ],
)
def test_bad_values_are_usage_errors(call):
    with pytest.raises(UsageError) as e:
        call()
    assert isinstance(e.value, ValueError) and isinstance(e.value, HybridmigError)


def test_a_fault_loop_error_names_the_operation_the_task_and_where():
    """A uffd message of an unknown kind fails the loop (EPROTO): the error
    says it came from reading that task's uffd, and which task."""
    store = PageStore()
    loop = FaultLoop(store, installers=1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.setblocking(False)
        loop.add_task(os.dup(theirs.fileno()), 7, os.getpid(), [(0x10000, 4)])
        loop.start()
        ours.sendall(struct.pack("=B31x", 0xFF))  # a struct uffd_msg with event 0xff
        with pytest.raises(UffdError) as e:
            loop.wait(10)
        assert e.value.errno == errno.EPROTO and e.value.pid == os.getpid()
        assert e.value.origin == "reading the uffd of pid %d" % os.getpid()
        st = loop.stats()
        assert (st["error"], st["error_pid"]) == (-errno.EPROTO, os.getpid())
    finally:
        loop.close()
        ours.close()
        theirs.close()
