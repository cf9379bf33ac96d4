"""Shared plumbing: the compiled module, its freshness, and errno -> exception mapping."""

import importlib.util
from pathlib import Path

from .. import _native
from .._native import ffi as ffi  # re-exported to the binding modules
from .._native import lib as lib
from ..errors import NativeError, StaleNativeModule, UsageError, native_error, strerror

#: the page size of the native modules (native/api/pagestore.h), the one definition
PAGE_SIZE: int = lib.HM_PAGE_SIZE

#: native/ of the tree this package runs from, in an editable install
NATIVE_SOURCES = Path(__file__).resolve().parents[3] / "native"


def check_fresh(native: Path = NATIVE_SOURCES) -> None:
    """Refuse a module built from other sources than those in `native`
    (when they are there), as pyca/cryptography refuses a mismatched binding:
    a stale .so would run old code under new Python silently."""
    digest = native / "digest.py"
    if not digest.is_file():
        return  # an installed wheel: the module is the one built with it
    spec = importlib.util.spec_from_file_location("_hybridmig_native_digest", digest)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # (a module older than this check has no digest at all)
    built = ffi.string(lib.hm_sources_sha256()).decode() if hasattr(lib, "hm_sources_sha256") else None
    if module.sources_sha256(native) != built:
        raise StaleNativeModule(
            f"hybridmig's native module {_native.__file__} was built from other sources than "
            f"{native} holds now: rebuild it with `make setup` (or `make venv`, or `pip install -e .`)"
        )


check_fresh()


def check(rc: int, origin: str, *, pid: int | None = None, exc: type[NativeError] = NativeError) -> int:
    """Pass a native return value through, or raise the error of its -errno:
    ProcessGone, AccessDenied, else `exc` (errors.native_error), naming the
    call (`origin`) and the process it was about (`pid`)."""
    if rc < 0:
        raise native_error(-rc, strerror(-rc, origin), origin=origin, pid=pid, fallback=exc)
    return rc


def check_range(vaddr: int, npages: int) -> None:
    if vaddr < 0 or vaddr % PAGE_SIZE:
        raise UsageError(f"address 0x{vaddr:x} is not page aligned")
    if npages < 0:
        raise UsageError("negative page count %d" % npages)
