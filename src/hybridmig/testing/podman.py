"""podman "hosts" for the container tests and the bench: each its own storage root,
runroot and tmpdir (`--root`/`--runroot`/`--tmpdir`), holding the busybox
image with memwork (testing/rootfs.py); close() removes every container,
image, mount, cgroup and directory it made."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .leftovers import kill_cgroup, unmount_under
from .rootfs import MEMWORK_IN_ROOTFS, REPORT_DIR_IN_ROOTFS, build_rootfs_tarball
from .workload import Workload

IMAGE = "localhost/hm-busybox:latest"
# root lacks CAP_SYS_RESOURCE here: podman's default limits would fail ("error setting rlimit")
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def need_podman():
    """Why the podman tests cannot run here, or None."""
    for tool in ("podman", "runc"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make setup)"
    if not Path("/bin/busybox").exists():
        return "busybox-static is not installed (make setup)"
    return None


class PodmanHost:
    """One podman storage, as a host of its own would have."""

    def __init__(self, base: Path, name: str, tarball: Path | None = None):
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.opts = [
            f"--root={self.dir / 'root'}",
            f"--runroot={self.dir / 'run'}",
            f"--tmpdir={self.dir / 'tmp'}",
        ]
        self.ids: set[str] = set()
        if tarball is not None:
            self.podman("import", str(tarball), IMAGE, timeout=120)

    def podman(self, *args, timeout=60, check=True):
        proc = subprocess.run(
            ["podman", *self.opts, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
        return proc

    def podman_opt_args(self):
        return [f"--podman-opt={o}" for o in self.opts]

    def inspect(self, name):
        proc = self.podman("container", "inspect", "--format", "json", name, check=False)
        if proc.returncode != 0:
            return None
        info = json.loads(proc.stdout)[0]
        self.ids.add(info["Id"])
        return info

    def status(self, name):
        info = self.inspect(name)
        return info and info["State"]["Status"]

    def names(self):
        out = self.podman("ps", "-a", "--format", "{{.Names}} {{.ID}}").stdout.split("\n")
        return [line.split()[0] for line in out if line.strip()]

    def start(
        self, name, report_dir: Path, size_mb=64, rate=2000, threads=2, annotate=True, before="", network="none",
        run_opts=(),
    ) -> Workload:  # fmt: skip
        """A container running memwork (reporting to report_dir, bind-mounted
        at /report), created with the org.criu.config annotation unless
        told not to; `before`: a shell command the container runs first;
        `run_opts`: more options of `podman run`."""
        args = ["run", "-d", "--name", name, f"--network={network}", *ULIMITS, *run_opts]
        if annotate:
            args += ["--annotation", f"org.criu.config={self.dir / 'criu' / name}.conf"]
        args += ["-v", f"{report_dir}:{REPORT_DIR_IN_ROOTFS}", IMAGE, "/bin/sh", "-c"]
        memwork = f"exec {MEMWORK_IN_ROOTFS} --size-mb {size_mb} --threads {threads} --rate {rate}"
        args.append(f"{before}{memwork} --report {REPORT_DIR_IN_ROOTFS}/report.jsonl")
        self.podman(*args, timeout=120)
        info = self.inspect(name)
        wl = Workload(info["State"]["Pid"], report_dir / "report.jsonl", 1)
        deadline = time.monotonic() + 60
        while not wl.reports("ready"):
            assert time.monotonic() < deadline, "memwork in the container never reported ready"
            time.sleep(0.05)
        return wl

    def close(self):
        """Every container (by ID), the image, the storage's mounts, the
        containers' cgroups, the directories."""
        proc = self.podman("ps", "-aq", "--no-trunc", check=False)
        self.ids.update(proc.stdout.split())
        for cid in self.ids:
            self.podman("rm", "--force", "--time", "0", cid, check=False, timeout=120)
        self.podman("rmi", "--all", "--force", check=False, timeout=120)
        for cid in self.ids:
            kill_cgroup(f"libpod-{cid}")
        unmount_under(str(self.dir))
        shutil.rmtree(self.dir, ignore_errors=True)


class PodmanPair:
    """Two podman hosts (src, dst) under one temp dir, the image in each
    (dst without it if told), and a report dir bind-mounted into containers
    (the same path on both "hosts": it is one machine)."""

    def __init__(self, image_on_dst=True):
        self.base = Path(tempfile.mkdtemp(prefix="hm-podman-"))
        self.report_dir = self.base / "report"
        self.report_dir.mkdir()
        tarball = build_rootfs_tarball(self.base / "rootfs.tar", self.base)
        self.hosts: list[PodmanHost] = []
        self.src = self._host("src", tarball)
        self.dst = self._host("dst", tarball if image_on_dst else None)
        tarball.unlink()

    def _host(self, name, tarball):
        host = PodmanHost(self.base, name, tarball)
        self.hosts.append(host)
        return host

    def close(self):
        for host in self.hosts:
            host.close()
        shutil.rmtree(self.base, ignore_errors=True)
