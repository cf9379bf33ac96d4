"""cffi build of hybridmig's native module.

Every header in native/api/ is cdef-clean (plain declarations, integer
#defines): it is globbed here both as the cdef and as the #include list,
in the order of DEPENDS_FIRST where one header uses another's types.
The implementation is native/src/*.c. The sha256 of these sources
(digest.py) is compiled in: bindings/_ffi.py refuses a stale module.
"""

import glob
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
API = os.path.join(HERE, "api")
SRC = os.path.join(HERE, "src")

DEPENDS_FIRST = ["pagestore.h", "ranges.h"]


def _order(path):
    name = os.path.basename(path)
    return (DEPENDS_FIRST.index(name) if name in DEPENDS_FIRST else len(DEPENDS_FIRST), name)


headers = sorted(glob.glob(os.path.join(API, "*.h")), key=_order)
sources = sorted(glob.glob(os.path.join(SRC, "*.c")))

sys.path.insert(0, HERE)
from digest import sources_sha256  # noqa: E402  (beside this file, not a package)

ffibuilder = FFI()
for header in headers:
    with open(header) as f:
        ffibuilder.cdef(f.read())
ffibuilder.cdef("const char *hm_sources_sha256(void);")

ffibuilder.set_source(
    "hybridmig._native",
    "\n".join('#include "%s"' % os.path.basename(h) for h in headers)
    + '\nstatic const char *hm_sources_sha256(void) { return "%s"; }\n' % sources_sha256(),
    sources=[os.path.relpath(s) for s in sources],
    include_dirs=[API, SRC],
    extra_compile_args=[
        "-O2",
        "-g",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-pthread",
        "-std=gnu11",
        "-D_GNU_SOURCE",
    ],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
