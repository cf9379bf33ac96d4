"""The sha256 of the native sources, stdlib only.

native/build.py compiles it into the module (hm_sources_sha256()), and
hybridmig.bindings._ffi recomputes it at import wherever the sources sit
beside the package (an editable install), so that a module built from
other sources than these is refused instead of run.
"""

import hashlib
from pathlib import Path

NATIVE = Path(__file__).resolve().parent
PATTERNS = ("api/*.h", "src/*.c", "src/*.h", "build.py", "digest.py")


def sources_sha256(native: Path = NATIVE) -> str:
    h = hashlib.sha256()
    for path in sorted(p for pattern in PATTERNS for p in native.glob(pattern)):
        h.update(path.relative_to(native).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()
