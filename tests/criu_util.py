"""Small helpers that run the real CRIU binary for tests.

``criu_dump`` / ``criu_restore`` raise CriuError carrying the interesting
part of CRIU's log, so a failing test says why CRIU failed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hybridmig.errors import CriuError

#: Where setup.sh installs CRIU when the distribution's is too old.
_FALLBACK_CRIU = ("/usr/local/sbin/criu", "/usr/sbin/criu")


def criu_binary() -> str:
    """Path of the criu binary: $CRIU if set, else the one on PATH, else the
    usual install locations (root's PATH may lack /usr/local/sbin)."""
    env = os.environ.get("CRIU")
    if env:
        return env
    found = shutil.which("criu")
    if found:
        return found
    for path in _FALLBACK_CRIU:
        if os.access(path, os.X_OK):
            return path
    return "criu"


@functools.cache
def require_root_and_criu() -> str | None:
    """None if CRIU tests can run here, else the reason to skip them."""
    if os.geteuid() != 0:
        return "CRIU tests need root (dumping and restoring other processes)"
    criu = criu_binary()
    if not (os.path.isabs(criu) and os.access(criu, os.X_OK)) and not shutil.which(criu):
        return f"criu binary not found (looked for {criu!r}; set $CRIU)"
    try:
        proc = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{criu} check` could not run: {exc}"
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return f"`{criu} check` failed: " + " | ".join(out)
    return None


def _nsenter(netns: str | None) -> list[str]:
    # nsenter, not `ip netns exec`, which would add a mount namespace.
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def log_excerpt(log: Path, tail: int = 25, errors: int = 15) -> str:
    """The error lines and the last lines of a CRIU log, for messages."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log {log}: {exc})"
    errs = [line for line in lines if "Error" in line]
    out = []
    if errs:
        out.append(f"--- errors in {log} ---")
        out += errs[:errors]
    out.append(f"--- last {tail} lines of {log} ---")
    out += lines[-tail:]
    return "\n".join(out)


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CriuError(f"{' '.join(cmd)}: timed out after {timeout}s\n" + log_excerpt(log)) from None
    if proc.returncode != 0:
        raise CriuError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr.strip()}\n" + log_excerpt(log))


def criu_dump(
    pid: int, images_dir: os.PathLike, extra: Sequence[str] = (), netns: str | None = None, timeout: float = 300
) -> None:
    """`criu dump -t PID -D DIR -o dump.log -v4 EXTRA...` (which kills the
    tree unless EXTRA has --leave-running).  ``netns``: run CRIU inside
    /run/netns/NETNS, so that the workload's net namespace is CRIU's own
    and is not dumped."""
    images = Path(images_dir)
    images.mkdir(parents=True, exist_ok=True)
    cmd = _nsenter(netns) + [criu_binary(), "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4", *extra]
    _run(cmd, images / "dump.log", timeout)


def criu_restore(
    images_dir: os.PathLike, extra: Sequence[str] = (), netns: str | None = None, timeout: float = 300
) -> int:
    """`criu restore -D DIR -d --pidfile FILE -o restore.log -v4 EXTRA...`;
    returns the host pid of the restored root (from the pidfile)."""
    images = Path(images_dir).resolve()
    pidfile = images / "restore.pid"
    if pidfile.exists():
        pidfile.unlink()
    cmd = _nsenter(netns) + [
        criu_binary(),
        "restore",
        "-D",
        str(images),
        "-d",
        "--pidfile",
        str(pidfile),
        "-o",
        "restore.log",
        "-v4",
        *extra,
    ]
    _run(cmd, images / "restore.log", timeout)
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise CriuError(
            f"restore succeeded but pidfile {pidfile} is unusable: {exc}\n" + log_excerpt(images / "restore.log")
        ) from None
