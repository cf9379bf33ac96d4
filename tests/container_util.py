"""runc containers for the tests: a busybox bundle running memwork, with
its own runc state dir, removed by close()."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hybridmig.testing.leftovers import kill_cgroup, unmount_under  # noqa: F401  (the tests take them from here)
from hybridmig.testing.rootfs import MEMWORK_IN_ROOTFS, REPORT_DIR_IN_ROOTFS, build_rootfs
from hybridmig.testing.workload import Workload

RUNC = shutil.which("runc") or "/usr/sbin/runc"


def need_runc():
    """Why the runc tests cannot run here, or None."""
    if not shutil.which("runc"):
        return "runc is not installed (apt-get install runc)"
    if not Path("/bin/busybox").exists():
        return "busybox-static is not installed"
    return None


class RuncBundle:
    """A bundle (rootfs + config.json) whose process is memwork of size_mb,
    reporting to a host directory bind-mounted at /report; containers made
    of it live in a runc state dir of their own."""

    def __init__(self, size_mb: int):
        self.dir = Path(tempfile.mkdtemp(prefix="hm-runc-"))
        self.state = self.dir / "runc-state"
        self.report_dir = self.dir / "report"
        self.report_dir.mkdir()
        self.report = self.report_dir / "report.jsonl"
        self.names: list[str] = []
        self._pipes: list[int] = []
        self.image_dirs: list[Path] = []  # of checkpoints and restores, cleaned by close()
        build_rootfs(self.dir / "rootfs")
        subprocess.run([RUNC, "spec", "--bundle", str(self.dir)], check=True, timeout=30)
        config_path = self.dir / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = [
            MEMWORK_IN_ROOTFS,
            "--size-mb",
            str(size_mb),
            "--report",
            f"{REPORT_DIR_IN_ROOTFS}/report.jsonl",
        ]
        config["root"]["readonly"] = False
        config["mounts"].append(
            {
                "destination": REPORT_DIR_IN_ROOTFS,
                "type": "bind",
                "source": str(self.report_dir),
                "options": ["rbind", "rw"],
            }
        )
        config_path.write_text(json.dumps(config))

    def runc(self, *args, timeout=60):
        """runc's output goes through a file: a detached container inherits
        runc's stdio, and would hold a pipe open for its whole life."""
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                [RUNC, "--root", str(self.state), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            out.seek(0)
            proc.stdout = proc.stderr = out.read()
        return proc

    def detached(self, name: str, *args, timeout=120):
        """`runc ARGS... NAME` that leaves a container running (run, restore):
        its stdio is a pipe whose read end stays here until close(), as
        CRIU can dump a pipe (runc passes it as external) but not a file of
        the host's mounts; runc's own messages come through it too."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pipes.append(read_end)
        self.names.append(name)
        try:
            proc = subprocess.run(
                [RUNC, "--root", str(self.state), *args, name],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                timeout=timeout,
            )
        finally:
            os.close(write_end)
        try:
            proc.stdout = os.read(read_end, 65536).decode(errors="replace")
        except BlockingIOError:
            proc.stdout = ""
        return proc

    def start(self, name: str) -> Workload:
        """Run the container detached; its memwork once it reported ready."""
        r = self.detached(name, "run", "--detach", "--bundle", str(self.dir))
        assert r.returncode == 0, f"runc run failed: {r.stdout}"
        wl = Workload(self.pid(name), self.report, 1)
        deadline = time.monotonic() + 60
        while not wl.reports("ready"):
            assert time.monotonic() < deadline, "memwork in the container never reported ready"
            time.sleep(0.05)
        return wl

    def state_of(self, name: str) -> dict:
        r = self.runc("state", name)
        assert r.returncode == 0, f"runc state {name}: {r.stderr}"
        return json.loads(r.stdout)

    def pid(self, name: str) -> int:
        return self.state_of(name)["pid"]

    def close(self):
        for name in self.names:
            self.runc("delete", "--force", name)
            kill_cgroup(name)
        for fd in self._pipes:
            os.close(fd)
        # a restore that failed leaves CRIU's root yard mounted in runc's
        # state dir, and its cgroup yard in the images dir
        for d in [self.dir, *self.image_dirs]:
            unmount_under(d)
        shutil.rmtree(self.dir, ignore_errors=True)
