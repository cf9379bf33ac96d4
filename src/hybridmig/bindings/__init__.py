"""The only code that touches the cffi `ffi` and `lib` objects.

Each module here wraps one native module (native/api/NAME.h), checks
lengths and alignment before calling in, and returns plain Python values.
"""

from ._ffi import PAGE_SIZE as PAGE_SIZE
