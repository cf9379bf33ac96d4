"""The destination's side of a podman container's migration (`serve
--podman`): from the configuration the source sent during pre-copy, the
archive `podman container restore --import` takes, and that restore,
started then and held at its conmon (conmon_hold.py); at RESTORE the root
file system's changes applied (rootfs.py), and the restore let go, made
lazy by a CRIU config file of serve's own so that the session's lazy-pages
daemon serves every page from the page store (docs/containers.md).

What the source chooses is the container (its configuration, as podman
wrote it on the source) and its name; never podman's options, storage or
runtime (serve's operator gives those: --podman-opt), nor the CRIU config
file, whose annotation serve rewrites to its own (docs/security.md)."""

import datetime
import json
import logging
import os
import posixpath
import re
import subprocess
import tarfile
import time

import psutil

from ..cgroup_yard import ahead
from ..criu.command import log_tail
from ..doctor import check_criu_pre_restore_first
from ..errors import CriuError, HybridmigError, ProtocolError
from ..podman import (
    CONFIG_DUMP,
    CRIU_CONFIG_ANNOTATION,
    DELETED_FILES,
    DESCRIPTORS,
    PODMAN_FILES,
    ROOTFS_DIFF,
    SPEC_DUMP,
    said,
)
from ..proctree import end_tree
from .conmon_hold import ConmonHold
from .rootfs import ChangesApplier, has_members

log = logging.getLogger("hybridmig.destination.container")
MAX_JSON_FILE = 16 << 20  # deleted.files: at most MAX_DELETED paths
MAX_DELETED = 1 << 16
FAILED_GRACE_S = 5  # a podman restore whose root went away, to end and say why
# config.dump's host paths of the source's podman that podman would reuse
# instead of making its own: the conmon pidfile under the source's runroot
# fails the restore, and podman unmounts the paths of `mounts` (the
# source's /dev/shm dir) when it cleans the container up. podman sets its
# own when they are absent.
SOURCE_PATHS = (
    "conmonPidFile", "pid_file", "mounts", "ShmDir", "sdnotifySocket", "logPath", "staticDir", "secretsPath",
)  # fmt: skip
# config.dump's fields that would make podman use or create host data the
# source names: refused (the source refuses such containers already)
REFUSED = {"rootfs": "a --rootfs container (its root is a host path)", "namedVolumes": "named volumes"}


class ContainerRestore:
    """One container's restore into serve's podman."""

    def __init__(self, podman, name, session_dir, images_dir, files_dir, root_hook, root_file, dies_with_me):
        self.podman = podman
        self.name = name
        self.dir = session_dir
        self.images = images_dir
        self.files = files_dir
        self.root_hook = root_hook
        self.root_file = root_file  # the restored root's pid, written by root_hook
        self.dies_with_me = dies_with_me
        self.config_file = os.path.join(session_dir, "criu.conf")
        self.archive = os.path.join(session_dir, "checkpoint.tar")
        self.id = None  # of the container this restore created
        self.image = None  # its ID, checked at CONTAINER
        self.started = None  # when podman's restore started: a container of this name made since is ours
        self.proc: subprocess.Popen | None = None  # podman's restore
        self.hold: ConmonHold | None = None  # where that restore waits, from start() to release()
        self.applier: ChangesApplier | None = None  # applies the root's changes there
        self.held_at = self.released_at = None  # when podman got there, when it went on (time.time())
        self.applied_s = 0.0  # applying the root file system's changes took
        self.changes = None  # rootfs-diff.tar, if it holds anything
        self.deleted: list[str] = []
        self.restored_pid = None
        self.criu_opts: list[str] = []  # the source's, from CONTAINER_START
        self.held_in_criu = False  # the restore waits in CRIU's pre-restore script, not at conmon
        self.yard = None  # this host's cgroup hierarchies, mounted before the freeze

    def _load_json(self, name, kind):
        path = os.path.join(self.files, name)
        if not os.path.exists(path):
            raise HybridmigError(f"the source sent no {name} for container {self.name}")
        if os.path.getsize(path) > MAX_JSON_FILE:
            raise HybridmigError(f"{name} of container {self.name} is over {MAX_JSON_FILE >> 20} MiB")
        try:
            with open(path) as f:
                value = json.load(f)
        except ValueError as e:
            raise HybridmigError(f"{name} of container {self.name} is no JSON: {e}") from e
        if not isinstance(value, kind):
            raise HybridmigError(f"{name} of container {self.name} is no JSON {kind.__name__}")
        return value

    def check(self, image):
        """At CONTAINER, before any page: the image is here, the name free.
        (Not again in the blackout: podman's restore fails on either.)"""
        if not re.fullmatch(r"[0-9a-f]{64}", image):
            raise HybridmigError(f"container {self.name}: {image[:80]!r} is no image ID")
        if self.podman.run("image", "exists", image, check=False).returncode != 0:
            raise HybridmigError(
                "container %s's image %s is not in the destination's podman storage: copy it there first "
                "(podman save / podman load)" % (self.name, image[:12])
            )
        if self.podman.inspect(self.name) is not None:
            raise HybridmigError(f"the destination's podman has a container named {self.name} already")
        self.image = image

    def start(self, config, spec, criu_opts):
        """At CONTAINER_START, before the freeze: `podman container restore
        --import` of an archive with the source's config.dump and spec.dump
        (`config`, `spec`: rewritten for this host) and no images yet,
        under the same name (a new container ID: the source's container,
        frozen, still holds its own, and runc's state and cgroups are by
        ID), held where podman starts conmon (conmon_hold.py) until
        release(). With a CRIU that can (check_criu_pre_restore_first) and
        runc's descriptors.json sent ahead, held further: in CRIU, before it
        reads the images (conmon_hold.py)."""
        if config.get("rootfsImageID") != self.image:
            raise HybridmigError(f"config.dump of container {self.name} names another image than CONTAINER did")
        for key, what in REFUSED.items():
            if config.get(key):
                raise HybridmigError(f"container {self.name} has {what}: not migrated")
        for key in SOURCE_PATHS:
            config.pop(key, None)
        # podman restores with the runtime the archive names unless told one:
        # serve's own, never a program the source names
        config["runtime"] = self.podman.runtime()
        # OCI hooks are programs runc runs as root: the destination's podman
        # applies its own hooks dirs, the source's list is not taken
        spec.pop("hooks", None)
        if isinstance(config.get("spec"), dict):
            config["spec"].pop("hooks", None)
        annotations = spec.get("annotations")
        if not isinstance(annotations, dict):
            raise HybridmigError(f"spec.dump of container {self.name} has no annotations")
        annotations[CRIU_CONFIG_ANNOTATION] = self.config_file  # serve's file, not the source's path
        if isinstance(config.get("spec"), dict) and isinstance(config["spec"].get("annotations"), dict):
            config["spec"]["annotations"][CRIU_CONFIG_ANNOTATION] = self.config_file
        placeholder = os.path.join(self.dir, "checkpoint")
        os.mkdir(placeholder)
        # podman only checks that the images have an inventory: CRIU reads
        # the real ones from the session's images dir (the wrapper's --restore)
        open(os.path.join(placeholder, "inventory.img"), "w").close()
        with tarfile.open(self.archive, "w") as tar:
            for name, value in ((CONFIG_DUMP, config), (SPEC_DUMP, spec)):
                path = os.path.join(self.dir, name)
                with open(path, "w") as f:
                    json.dump(value, f)
                tar.add(path, arcname=name)
            tar.add(placeholder, arcname="checkpoint")
        # CRIU's restore opens them instead of mounting each, runc's container frozen
        self.yard = ahead()
        self.hold = ConmonHold(self.dir, self.podman.conmon(), self.images)
        self.criu_opts = list(criu_opts)
        # runc reads the images dir's descriptors.json before it starts CRIU
        if os.path.exists(os.path.join(self.images, DESCRIPTORS)) and check_criu_pre_restore_first().ok:
            hook = self.hold.hold_in_criu(self.dir, self.root_file)
            self._write_config(hook, ["pre-restore-first"])
            self.held_in_criu = True
        self.applier = ChangesApplier(self.dies_with_me)
        cmd = self.dies_with_me(
            self.podman.command(
                "--conmon", self.hold.path, "container", "restore", "--import", self.archive, "--name", self.name
            )
        )
        self.started = time.time()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def _write_config(self, hook, extra=()):
        """CRIU's config file for the restore (the annotation names it)."""
        option_lines = config_lines(self.criu_opts)
        # CRIU (run by runc) connects to the daemon's lazy-pages.socket in
        # its work dir, and runs serve's hook (the restored root, for the guard)
        lines = ["lazy-pages", "work-dir " + self.images, "action-script " + hook, *extra]
        if self.yard is not None:
            lines.append("cgroup-yard " + self.yard.path)
        lines += option_lines
        # Last, over any the source gave: the netns is new, made by this
        # podman, and CRIU restores no rule into it, so none of the dump's
        # lock is there; with our CRIU (scripts/criu-patches/0007) no
        # iptables-restore runs in the blackout (47-124 ms measured).
        # Older CRIUs take the dump's method and unlock as before.
        lines.append("network-lock skip")
        with open(self.config_file, "w") as f:
            f.write("\n".join(lines) + "\n")

    def prepare(self, criu_opts):
        """At RESTORE: CRIU's config file, the root file system's changes
        checked. HybridmigError says what is wrong."""
        if list(criu_opts) != self.criu_opts:
            raise HybridmigError(f"container {self.name}: RESTORE's CRIU options are not CONTAINER_START's")
        if not self.held_in_criu:  # (else CRIU has read it already)
            self._write_config(self.root_hook)
        diff = os.path.join(self.files, ROOTFS_DIFF)
        if os.path.exists(diff):
            check_rootfs_diff(diff)
            if has_members(diff):
                self.changes = diff
        if os.path.exists(os.path.join(self.files, DELETED_FILES)):
            deleted = self._load_json(DELETED_FILES, list)
            if len(deleted) > MAX_DELETED or not all(
                isinstance(p, str) and p.startswith("/") and "\0" not in p for p in deleted
            ):
                raise HybridmigError(f"deleted.files of container {self.name} is no list of absolute paths")
            self.deleted = deleted

    def release(self, timeout):
        """The held restore goes on: once podman is at its conmon, the root
        file system's changes applied to the container's root (podman
        applies an archive's there), then conmon, runc and CRIU run (or,
        held in CRIU, CRIU reads the images); its CRIU connects to the
        lazy-pages socket tens of ms later (or ~10)."""
        if self.hold is None or self.applier is None:
            raise ProtocolError(f"RESTORE of container {self.name} without CONTAINER_START")
        root, self.held_at = self.hold.held(self.proc, timeout)
        # Held in CRIU, podman's restore went on at CONTAINER_START: its
        # runc or CRIU may have failed since, and podman's teardown then
        # unmounts (and may remove) the root the changes would go to.
        # Its words, not the missing root's, say what went wrong.
        self._raise_if_failed(0)
        t = time.time()
        try:
            self.applier.apply(root, self.changes, self.deleted, timeout)
        except HybridmigError:
            # a teardown under way when the changes went in: held in CRIU
            # only (at conmon podman cannot end), and only if the root is
            # gone (else the failure is the changes' own)
            if self.held_in_criu and not os.path.ismount(root):
                self._raise_if_failed(FAILED_GRACE_S)
            raise
        self.applied_s = time.time() - t
        self.hold.release("go")
        self.released_at = time.time()

    def wait(self, timeout):
        """The restore's end: the restored init's pid; CriuError with
        podman's and CRIU's words if it failed."""
        proc = self.proc
        assert proc is not None, "start() first"
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CriuError(f"podman container restore of {self.name} did not finish within {timeout}s") from e
        finally:
            self._drop_yard()
        if proc.returncode != 0:
            raise self._failed(out, err)
        # No `podman inspect` here: it would be one more podman in the
        # downtime. podman's restore printed the ID, and serve's hook (run
        # by CRIU) wrote the restored init's pid, the one podman records.
        printed = out.split()
        if not printed or not re.fullmatch(r"[0-9a-f]{64}", printed[-1]):
            raise CriuError(f"podman restored {self.name}, but printed no container ID: {out[-200:]!r}")
        self.id = printed[-1]
        self.restored_pid = self._hooked_pid()
        if self.restored_pid is None:
            raise CriuError(f"podman restored {self.name}, but CRIU's hook gave no pid of its init")
        return self.restored_pid

    def _raise_if_failed(self, grace):
        """CriuError with podman's and CRIU's words if its restore has
        ended (within grace seconds): before RESTORE, only by failing."""
        proc = self.proc
        assert proc is not None, "start() first"
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            return
        # podman's conmon (the hold's wrapper, while it waits for a word)
        # has podman's stdout and stderr: told to abort, it lets them go
        assert self.hold is not None
        self.hold.release("abort")
        try:
            out, err = proc.communicate(timeout=FAILED_GRACE_S)
        except subprocess.TimeoutExpired:
            out, err = "", "(its output still held by its conmon)"
        raise self._failed(out, err)

    def _failed(self, out, err):
        code = self.proc.returncode if self.proc is not None else -1
        return CriuError(
            "podman container restore of %s failed (exit %d): %s%s"
            % (
                self.name,
                code,
                said(subprocess.CompletedProcess([], code, out, err)),
                log_tail(os.path.join(self.images, "restore.log")),
            )
        )

    def _hooked_pid(self):
        try:
            with open(self.root_file) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def remove(self, pid=None):
        """End and remove the restored container (not committed to): its
        tasks by pid at once, then podman's record of it, if this restore
        made it (a container of that name before ours is not touched)."""
        if self.hold is not None and self.hold.waiting and self.proc is not None:
            self.hold.release("abort")  # a held restore fails at once, podman's own way
            log.info("container %s: podman's held restore told to abort", self.name)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is None:
            # a restore under way: podman first (its CRIU then fails at the
            # closed lazy-pages socket), then what CRIU may have forked
            self.proc.kill()
            self.proc.communicate(timeout=30)
        self._drop_yard()
        for p in (pid, self.restored_pid, self._hooked_pid()):
            if p:
                try:
                    end_tree(psutil.Process(p))
                except psutil.NoSuchProcess:
                    pass
        if self.started is None:
            return
        info = self.podman.inspect(self.name)
        if info is None or (self.id is not None and info.get("Id") != self.id):
            return
        if self.id is None and _created(info) < self.started - 1:
            return  # not made by our restore: a container that took the name since check()
        proc = self.podman.run("container", "rm", "--force", "--time", "0", info["Id"], check=False)
        if proc.returncode != 0:
            log.error("could not remove the restored container %s: %s", self.name, said(proc))

    def _drop_yard(self):
        if self.yard is not None:
            self.yard.close()
            self.yard = None

    def cleanup(self):
        self._drop_yard()
        if self.applier is not None:
            self.applier.close()
        if self.hold is not None:
            self.hold.close()
        for path in (self.archive, self.config_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _created(info):
    """When podman created the container (seconds since the epoch; 0 if it does not say)."""
    try:
        stamp = info["Created"][:26].rstrip("Z")  # 2026-12-05T23:16:54.073439, to the microsecond
        return datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.UTC).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def config_lines(criu_opts):
    """The source's CRIU options (already checked against serve's
    allowlist) as config file lines: long names only, one word each, so
    that no option brings a line of its own into the file."""
    lines = []
    for opt in criu_opts:
        if not re.fullmatch(r"--[a-z][a-z-]*(=[!-~]+)?", opt):
            raise HybridmigError(f"CRIU option {opt[:80]!r}: a container's options are --name or --name=VALUE")
        lines.append(opt[2:].replace("=", " ", 1))
    return lines


def check_rootfs_diff(path):
    """The source's rootfs-diff.tar holds plain files, directories and links
    below the container's root, nothing else (no device, no path out)."""
    try:
        links = set()  # symlinks the tar makes: nothing may be written through one
        with tarfile.open(path) as tar:
            for m in tar:
                name = posixpath.normpath(m.name)
                if name.startswith("/") or name == ".." or name.startswith("../"):
                    raise HybridmigError(f"rootfs-diff.tar names {m.name!r}, outside the container's root")
                parts = name.split("/")
                if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                    raise HybridmigError(f"rootfs-diff.tar writes {m.name!r} through a symbolic link of its own")
                if m.issym():
                    links.add(name)
                if not (m.isfile() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
                    raise HybridmigError(f"rootfs-diff.tar holds {m.name!r}, a device or special file")
                if m.islnk():
                    target = posixpath.normpath(m.linkname)
                    if target.startswith("/") or target == ".." or target.startswith("../"):
                        raise HybridmigError(f"rootfs-diff.tar links {m.name!r} to {m.linkname!r}, outside the root")
    except tarfile.TarError as e:
        raise HybridmigError(f"rootfs-diff.tar is no tar: {e}") from e


def is_podman_file(name):
    return name in PODMAN_FILES
