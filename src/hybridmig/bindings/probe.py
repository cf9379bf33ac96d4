"""Kernel feature probes (native/api/probe.h).

Each probe exercises the feature on the calling process's own memory and
returns plain values, or raises NativeError carrying the errno the kernel
gave (ENOSYS, EPERM, ENOTTY, EOPNOTSUPP, ...) so callers can explain it.
"""

from collections.abc import Iterable
from typing import NamedTuple

from ..errors import UsageError
from ._ffi import check, ffi, lib

# UFFD_FEATURE_* names in bit order (include/uapi/linux/userfaultfd.h).
_FEATURE_NAMES = (
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
)
#: feature name -> bit mask
FEATURES: dict[str, int] = {name: getattr(lib, "HM_UFFD_FEATURE_" + name) for name in _FEATURE_NAMES}

# UFFDIO_API reports ioctls as bits numbered by _UFFDIO_* (same uapi header).
_IOCTL_BITS = {
    0x00: "REGISTER",
    0x01: "UNREGISTER",
    0x02: "WAKE",
    0x03: "COPY",
    0x04: "ZEROPAGE",
    0x05: "MOVE",
    0x06: "WRITEPROTECT",
    0x07: "CONTINUE",
    0x08: "POISON",
    0x3F: "API",
}

#: ways of opening a userfaultfd, for probe_uffd_open()
SYSCALL = lib.HM_UFFD_OPEN_SYSCALL
USER_ONLY = lib.HM_UFFD_OPEN_USER_ONLY
DEV = lib.HM_UFFD_OPEN_DEV
WAYS = {SYSCALL: "syscall", USER_ONLY: "user-mode-only syscall", DEV: "/dev/userfaultfd"}


#: features: names the kernel supports; feature_mask: the raw mask;
#: ioctls: names of the ioctls UFFDIO_API reports; via: how the fd was opened.
class UffdInfo(NamedTuple):
    features: list[str]
    feature_mask: int
    ioctls: list[str]
    via: str


def decode_features(mask: int) -> list[str]:
    """UFFD_FEATURE_* names set in mask, in bit order; unknown bits as 'bitN'."""
    names = [name for name, bit in FEATURES.items() if mask & bit]
    known = sum(FEATURES.values())
    return names + ["bit%d" % b for b in range(64) if mask & ~known & (1 << b)]


def encode_features(names: Iterable[str]) -> int:
    """Mask of the given UFFD_FEATURE_* names (KeyError on an unknown one)."""
    mask = 0
    for name in names:
        mask |= FEATURES[name]
    return mask


def decode_ioctls(mask: int) -> list[str]:
    return [_IOCTL_BITS.get(b, "bit%d" % b) for b in range(64) if mask & (1 << b)]


def probe_uffd() -> UffdInfo:
    """Open a userfaultfd the first way that works: UffdInfo of what the kernel supports."""
    features, ioctls, via_dev = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int *")
    check(lib.hm_probe_uffd(features, ioctls, via_dev), "hm_probe_uffd")
    via = WAYS[DEV] if via_dev[0] else WAYS[SYSCALL]
    return UffdInfo(decode_features(features[0]), features[0], decode_ioctls(ioctls[0]), via)


def probe_uffd_open(how: int, want: Iterable[str] = ()) -> UffdInfo:
    """Open a userfaultfd one way (SYSCALL, USER_ONLY, DEV) asking for the
    feature names in `want`: UffdInfo, or NativeError (EINVAL: a feature is
    missing, EPERM: refused, e.g. EVENT_FORK without CAP_SYS_PTRACE)."""
    if how not in WAYS:
        raise UsageError(f"unknown way of opening a userfaultfd: {how!r}")
    features, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    check(lib.hm_probe_uffd_open(how, encode_features(want), features, ioctls), "hm_probe_uffd_open")
    return UffdInfo(decode_features(features[0]), features[0], decode_ioctls(ioctls[0]), WAYS[how])


def probe_pagemap_scan() -> None:
    """None if uffd-wp async + PAGEMAP_SCAN report a written page; else NativeError
    (ENOTTY: no PAGEMAP_SCAN, EOPNOTSUPP: no WP_ASYNC, EIO: wrong answer)."""
    check(lib.hm_probe_pagemap_scan(), "hm_probe_pagemap_scan")


def probe_soft_dirty() -> None:
    """None if soft-dirty tracking works; NativeError(EOPNOTSUPP) if the kernel lacks it."""
    check(lib.hm_probe_soft_dirty(), "hm_probe_soft_dirty")


def probe_process_vm_readv() -> None:
    """None if process_vm_readv reads this process's memory; else NativeError."""
    check(lib.hm_probe_process_vm_readv(), "hm_probe_process_vm_readv")


def probe_pidfd_getfd() -> None:
    """None if pidfd_open + pidfd_getfd duplicate one of this process's fds; else NativeError."""
    check(lib.hm_probe_pidfd_getfd(), "hm_probe_pidfd_getfd")
