"""hybridmig's exceptions: one base, each also a builtin that fits."""


class HybridmigError(Exception):
    """Base of every error hybridmig raises on purpose."""


class NativeError(HybridmigError, OSError):
    """A native call failed; errno and the originating call are kept."""


class StoreError(NativeError):
    """The page store refused an operation."""


class UffdError(NativeError):
    """A userfaultfd operation of the fault loop failed."""


class ImageError(HybridmigError, ValueError):
    """A CRIU image is missing, truncated or inconsistent."""


class CriuError(HybridmigError, RuntimeError):
    """CRIU is missing, too old, or one of its commands failed."""


class ProtocolError(HybridmigError, ConnectionError):
    """A peer broke a protocol: CRIU's lazy-pages socket, its page server, or hybridmig's wire."""


class StaleNativeModule(HybridmigError, ImportError):
    """The compiled module was built from other native sources than the tree holds."""


class UsageError(HybridmigError, ValueError):
    """What the user asked for is malformed or not allowed (an address, an option)."""


class SetupError(HybridmigError, RuntimeError):
    """This machine cannot run the engine (no root, no userfaultfd, ...)."""
