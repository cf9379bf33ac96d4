"""Shared plumbing: the compiled module and errno -> exception mapping."""

import os

from .._native import ffi as ffi  # re-exported to the binding modules
from .._native import lib as lib
from ..errors import NativeError

PAGE_SIZE = 4096


def check(rc: int, origin: str, exc: type[NativeError] = NativeError) -> int:
    """Raise `exc` for a native -errno return, psutil style; pass others through."""
    if rc < 0:
        err = OSError(-rc, f"{os.strerror(-rc)} (originated from {origin})")
        raise exc(err.errno, err.strerror) from err
    return rc


def check_range(vaddr: int, npages: int) -> None:
    if vaddr < 0 or vaddr % PAGE_SIZE:
        raise ValueError(f"address 0x{vaddr:x} is not page aligned")
    if npages < 0:
        raise ValueError("negative page count %d" % npages)
