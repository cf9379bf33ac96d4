"""Running podman, on either side: its global options (the operator's:
`run --podman-opt`, `serve --podman-opt`), bounded waits, and what it says
when it fails. Container migration itself: source/container.py and
destination/container.py (docs/containers.md)."""

import json
import re
import shutil
import subprocess

from .errors import HybridmigError, SetupError

# podman's own rule for container names (libpod/define.NameRegex)
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
MAX_NAME = 253
# The annotation naming CRIU's per-container config file: runc passes it
# to CRIU, which reads it in RPC mode too (docs/containers.md).
CRIU_CONFIG_ANNOTATION = "org.criu.config"
# What podman's `checkpoint --export` archive holds besides CRIU's images
# that `restore --import` needs, and that the source sends: the container's
# configuration and its OCI spec (in CONTAINER_START, before the freeze),
# the root file system's changes (FILE frames by these names, frozen).
CONFIG_DUMP, SPEC_DUMP, ROOTFS_DIFF, DELETED_FILES = "config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files"
PODMAN_FILES = (ROOTFS_DIFF, DELETED_FILES)
# runc's record of the container's stdio, in CRIU's images dir (runc reads
# it on restore before it starts CRIU)
DESCRIPTORS = "descriptors.json"


def check_name(name):
    """A podman container name, or SetupError."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise SetupError(f"{str(name)[:80]!r} is not a podman container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")
    return name


class Podman:
    """podman with the operator's global options (e.g. --root, --runroot)."""

    def __init__(self, opts=(), binary=None):
        self.opts = list(opts)
        self.binary = binary or shutil.which("podman")
        self._runtime = None
        self._conmon = None

    def command(self, *args):
        if not self.binary:
            raise SetupError("podman is not installed (apt-get install podman)")
        return [self.binary, *self.opts, *args]

    def run(self, *args, timeout=60.0, check=True):
        """`podman OPTS ARGS`: CompletedProcess (text). HybridmigError, with
        what podman said, if it fails and `check`."""
        cmd = self.command(*args)
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise HybridmigError(f"`{' '.join(cmd)}` did not finish within {timeout}s") from e
        if check and proc.returncode != 0:
            raise HybridmigError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {said(proc)}")
        return proc

    def version(self):
        """podman's version, or SetupError naming why podman cannot run
        with these options."""
        proc = self.run("version", "--format", "{{.Client.Version}}", check=False, timeout=30)
        if proc.returncode != 0:
            raise SetupError(f"`{' '.join(self.command('version'))}` failed: {said(proc)}")
        return proc.stdout.strip()

    def runtime(self):
        """The OCI runtime this podman runs containers with: its --runtime
        option, else its default (podman info)."""
        runtime = None
        for i, opt in enumerate(self.opts):  # the last one counts, as for podman
            if opt.startswith("--runtime="):
                runtime = opt.split("=", 1)[1]
            elif opt == "--runtime" and i + 1 < len(self.opts):
                runtime = self.opts[i + 1]
        if runtime:
            return runtime
        if self._runtime is None:  # asked once (serve: at its start, not in a blackout)
            self._runtime = self.run("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=30).stdout.strip()
        return self._runtime

    def conmon(self):
        """The conmon this podman starts containers with: its --conmon
        option, else its configured one (podman info)."""
        for i, opt in enumerate(self.opts):  # the last one counts, as for podman
            if opt.startswith("--conmon="):
                self._conmon = opt.split("=", 1)[1]
            elif opt == "--conmon" and i + 1 < len(self.opts):
                self._conmon = self.opts[i + 1]
        if self._conmon is None:  # asked once (serve: at its start, not in a blackout)
            self._conmon = self.run("info", "--format", "{{.Host.Conmon.Path}}", timeout=30).stdout.strip()
        return self._conmon

    def inspect(self, name):
        """`podman container inspect NAME` as a dict; None if there is no
        such container."""
        proc = self.run("container", "inspect", "--format", "json", name, check=False)
        if proc.returncode != 0:
            if "no such container" in proc.stderr.lower():
                return None
            raise HybridmigError(f"podman container inspect {name} failed: {said(proc)}")
        try:
            found = json.loads(proc.stdout)
        except ValueError as e:
            raise HybridmigError(f"podman container inspect {name} printed no JSON: {proc.stdout[:200]!r}") from e
        return found[0] if found else None


def said(proc):
    """The gist of what a failed podman printed (its last lines)."""
    lines = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
    return " / ".join(lines[-4:])[-2000:] or "(nothing)"
