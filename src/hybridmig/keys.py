"""The shared key of `run` and `serve`: made by `hybridmig keygen`, read by both.

Whoever holds it can make root on the destination restore any image
(docs/security.md), and one recorded handshake lets an attacker test guessed
keys offline: so only a file of at least 32 bytes that nobody else can read
is accepted."""

import os
import stat

from .errors import UsageError

KEY_BYTES = 32
# 32 random bytes hold ~30 distinct values, a hex string 16: fewer than this
# is a typed-in pattern ("kkkk...", "abab..."), not a secret.
_MIN_DISTINCT_BYTES = 8
_HOW = "make one with `hybridmig keygen FILE` (32 random bytes, mode 0600) and copy it to both hosts"


def generate_key(path):
    """Write a new key to path (mode 0600); an existing file is never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as e:
        raise UsageError(f"{path} exists already: refusing to overwrite a key (remove it first)") from e
    except OSError as e:
        raise UsageError(f"cannot create key file {path}: {e.strerror}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(KEY_BYTES))


def read_key(path):
    """The shared secret: the whole key file, checked to be one."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read()
    except OSError as e:
        raise UsageError(f"cannot read key file {path}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            "key file %s has mode %04o: group or others can read it, so it is no secret; "
            "`chmod 600 %s`, or %s" % (path, stat.S_IMODE(mode), path, _HOW)
        )
    if len(key) < KEY_BYTES:
        raise UsageError(f"key file {path} holds {len(key)} bytes, fewer than {KEY_BYTES} bytes: {_HOW}")
    if len(set(key)) < _MIN_DISTINCT_BYTES:
        raise UsageError(f"key file {path} holds a repeated pattern, not a random secret: {_HOW}")
    return key
