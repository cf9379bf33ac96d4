"""Shared plumbing: the compiled module and errno -> exception mapping."""

import os

from .._native import ffi, lib  # noqa: F401  (re-exported to the binding modules)
from ..errors import NativeError

PAGE_SIZE = 4096


def check(rc, origin, exc=NativeError):
    """Raise `exc` for a native -errno return, psutil style; pass others through."""
    if rc < 0:
        err = OSError(-rc, f"{os.strerror(-rc)} (originated from {origin})")
        raise exc(err.errno, err.strerror) from err
    return rc


def check_range(vaddr, npages):
    if vaddr < 0 or vaddr % PAGE_SIZE:
        raise ValueError(f"address 0x{vaddr:x} is not page aligned")
    if npages < 0:
        raise ValueError("negative page count %d" % npages)
