"""A container root file system for the tests, the demo and the bench: no
registry is needed, only Debian's busybox-static and a statically linked
memwork (the self-verifying workload), at /bin/memwork."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from .workload import BUILD_DIR, MEMWORK_SRC, WorkloadError

BUSYBOX = "/bin/busybox"
MEMWORK_IN_ROOTFS = "/bin/memwork"
#: where the report file is bind-mounted in the container
REPORT_DIR_IN_ROOTFS = "/report"


def build_static_memwork(dest_dir: os.PathLike | None = None) -> str:
    """memwork linked statically (a busybox root has no libc), rebuilt only
    when the source is newer."""
    dest = Path(dest_dir) if dest_dir else BUILD_DIR
    dest.mkdir(parents=True, exist_ok=True)
    binary = dest / "memwork-static"
    if binary.exists() and binary.stat().st_mtime >= MEMWORK_SRC.stat().st_mtime:
        return str(binary)
    tmp = dest / f".memwork-static.{os.getpid()}"
    proc = subprocess.run(
        [os.environ.get("CC", "cc"), "-static", "-O2", "-pthread", "-o", str(tmp), str(MEMWORK_SRC)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise WorkloadError(f"building a static memwork failed (is libc6-dev's libc.a there?):\n{proc.stderr}")
    os.replace(tmp, binary)
    return str(binary)


def build_rootfs(dest: os.PathLike) -> Path:
    """A busybox root with memwork at `dest` (created)."""
    if not os.path.exists(BUSYBOX):
        raise WorkloadError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    root = Path(dest)
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", REPORT_DIR_IN_ROOTFS.lstrip("/")):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "ls", "echo", "test"):
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    shutil.copy2(build_static_memwork(), root / MEMWORK_IN_ROOTFS.lstrip("/"))
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    return root


def build_rootfs_tarball(dest: os.PathLike, work_dir: os.PathLike) -> Path:
    """The same root as a tarball, for `podman import`."""
    root = build_rootfs(Path(work_dir) / "rootfs")
    with tarfile.open(dest, "w") as tar:
        tar.add(root, arcname=".")
    shutil.rmtree(root)
    return Path(dest)
