"""hybridmig's exceptions: one base, each also a builtin that fits.

Errors of native calls follow psutil's model: the errno decides the class
(`native_error`, used by bindings/_ffi.check), so callers catch
`ProcessGone` or `AccessDenied` of a process instead of comparing errnos, and every one
carries the call it came from (`.origin`) and the process it was about
(`.pid`), when there is one.
"""

import errno as _errno
import os


class HybridmigError(Exception):
    """Base of every error hybridmig raises on purpose."""


class NativeError(HybridmigError, OSError):
    """A native call (or a system call on its behalf) failed: `.errno`, and
    `.origin` (the call) and `.pid` (its process) when known."""

    def __init__(self, *args: object, origin: str | None = None, pid: int | None = None) -> None:
        super().__init__(*args)
        self.origin = origin
        self.pid = pid


class ProcessGone(NativeError, ProcessLookupError):
    """The process does not exist, or exited meanwhile (ESRCH)."""


class AccessDenied(NativeError, PermissionError):
    """Not permitted (EPERM, EACCES): root or ptrace rights are missing, or another tracer holds the process."""


class StoreError(NativeError):
    """The page store refused an operation."""


class UffdError(NativeError):
    """A userfaultfd operation of the fault loop failed."""


def native_error(
    code: int,
    message: str,
    *,
    origin: str | None = None,
    pid: int | None = None,
    fallback: type[NativeError] = NativeError,
) -> NativeError:
    """The exception for errno `code` of a call about process `pid`:
    ProcessGone, AccessDenied, else `fallback`. A call about no process (the
    page store reading a file) keeps its module's class, whatever the errno."""
    if pid is not None and code == _errno.ESRCH:
        cls: type[NativeError] = ProcessGone
    elif pid is not None and code in (_errno.EPERM, _errno.EACCES):
        cls = AccessDenied
    else:
        cls = fallback
    return cls(code, message, origin=origin, pid=pid)


def strerror(code: int, origin: str) -> str:
    """The message of a native error: the errno's text and the call it came from."""
    return f"{os.strerror(code)} (originated from {origin})"


class ImageError(HybridmigError, ValueError):
    """A CRIU image is missing, truncated or inconsistent."""


class CriuError(HybridmigError, RuntimeError):
    """CRIU is missing, too old, or one of its commands failed."""


class ProtocolError(HybridmigError, ConnectionError):
    """A peer broke a protocol: CRIU's lazy-pages socket, its page server, or hybridmig's wire."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (as opposed to going silent or away)."""


class PeerError(ProtocolError):
    """The peer said why it ends the session (ERROR)."""


class StaleNativeModule(HybridmigError, ImportError):
    """The compiled module was built from other native sources than the tree holds."""


class UsageError(HybridmigError, ValueError):
    """What the user asked for is malformed or not allowed (an address, an option)."""


class SetupError(HybridmigError, RuntimeError):
    """This machine cannot run the engine (no root, no userfaultfd, ...)."""


class InDoubtError(HybridmigError):
    """After COMMIT, the source could not learn whether the destination kept
    its copy: the source is left frozen for the operator to settle."""


class WorkloadError(HybridmigError, RuntimeError):
    """A test or demo workload did not start, died, or did not answer in time."""
