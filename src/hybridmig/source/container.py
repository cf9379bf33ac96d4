"""`hybridmig run --container NAME`: live-migrate a running podman
container (docs/containers.md).

Pre-copy runs on the container's init as on any process tree. The
switch-over goes through podman's own `container checkpoint`, so that
podman's state stays true: the file named by the container's
`org.criu.config` annotation (runc hands it to CRIU) makes that dump lazy
and gives it hybridmig's hook; at post-dump the hook's answer decides, as
for a process tree, whether CRIU ends the container (podman then marks it
exited) or resumes it (podman's checkpoint fails, the container runs on).
After pre-copy's first round `run` sends podman's config.dump and
spec.dump, and the destination starts `podman container restore --import`
with them, held at its conmon; at post-dump `run` sends the root file
system's changes, which the destination applies before letting that
restore go on."""

import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import time

import psutil

from .. import scratch
from ..cgroup_yard import ahead
from ..criu.command import (
    CRIU_LONG_OPTS,
    NO,
    LazyDump,
    early_vmas_opts,
    in_place_opts,
    log_tail,
    resolve_criu_opts,
    write_hook,
)
from ..errors import HybridmigError, ProtocolError, SetupError, UsageError
from ..messages import Container, ContainerStart
from ..podman import (
    CONFIG_DUMP,
    CRIU_CONFIG_ANNOTATION,
    DELETED_FILES,
    DESCRIPTORS,
    ROOTFS_DIFF,
    SPEC_DUMP,
    Podman,
    check_name,
    said,
)
from ..wire import Msg
from .migration import Migration

log = logging.getLogger("hybridmig.source.container")
DESCRIPTORS_WAIT_S = 0.5  # at a round's end, for runc's descriptors.json (_start_destination)
# Files podman writes into a container's root itself, on either host: not
# part of the container's changes (podman diff leaves them out too).
PODMAN_MANAGED = {"etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab", "run/.containerenv"}
# overlayfs marks a directory that hides the lower layers' content so
OPAQUE_XATTR = "trusted.overlay.opaque"


def _appears(path, timeout):
    """Whether path exists, or comes to within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def how_to_create(name, path):
    return (
        "create it with `podman run --annotation %s=%s ...` (any path: the file need not exist; "
        "hybridmig writes it for the migration and removes it after); runc reads the annotation "
        "only when the container is created" % (CRIU_CONFIG_ANNOTATION, path)
    )


def check_container(podman, name):
    """podman's inspect of a container that can be migrated, or SetupError
    saying why not (before anything is touched)."""
    check_name(name)
    info = podman.inspect(name)
    if info is None:
        raise SetupError(f"no podman container named {name!r} (podman {' '.join(podman.opts)})".rstrip())
    state = info.get("State") or {}
    if not state.get("Running") or state.get("Paused"):
        raise SetupError(
            "container %s is %s, not running: there is nothing live to migrate"
            % (name, state.get("Status") or "not running")
        )
    annotations = (info.get("Config") or {}).get("Annotations") or {}
    conf = annotations.get(CRIU_CONFIG_ANNOTATION)
    if not conf:
        raise SetupError(
            "container %s was created without the %s annotation, through which hybridmig makes podman's "
            "checkpoint lazy and hooks it: %s"
            % (name, CRIU_CONFIG_ANNOTATION, how_to_create(name, f"/run/hybridmig/criu/{name}.conf"))
        )
    if not os.path.isabs(conf):
        raise SetupError(f"container {name}: its {CRIU_CONFIG_ANNOTATION} annotation {conf!r} is no absolute path")
    if os.path.lexists(conf):
        raise SetupError(
            "container %s: its CRIU config file %s exists already (another migration or checkpoint of it under "
            "way?); remove it if not" % (name, conf)
        )
    if info.get("Pod"):
        raise SetupError(f"container {name} is in a pod: podman restores a pod's containers only into a pod")
    if (info.get("HostConfig") or {}).get("AutoRemove"):
        raise SetupError(f"container {name} was started with --rm: podman does not checkpoint those in place")
    for mount in info.get("Mounts") or []:
        if mount.get("Type") == "volume":
            raise SetupError(
                "container %s uses the named volume %s: volumes are not migrated (a bind mount whose source "
                "exists on the destination is)" % (name, mount.get("Name"))
            )
    if (info.get("GraphDriver") or {}).get("Name") != "overlay":
        raise SetupError(
            "container %s is stored with podman's %s driver: its root file system's changes are read from "
            "overlay's upper directory" % (name, (info.get("GraphDriver") or {}).get("Name"))
        )
    if not state.get("Pid"):
        raise SetupError(f"podman gives no pid for container {name}")
    return info


def config_lines(criu_opts):
    """`run --criu-opt`s as lines of a CRIU config file (long names:
    `--tcp-established`, `--ext-unix-sk=ID`)."""
    lines = []
    resolve_criu_opts(criu_opts)  # CRIU's reading, for its errors
    for word in criu_opts:
        if not word.startswith("--"):
            raise UsageError(f"--criu-opt {word}: with --container, give CRIU options by their long name (--name)")
        name, eq, value = word[2:].partition("=")
        if name not in CRIU_LONG_OPTS:
            raise UsageError(f"--criu-opt {word}: with --container, give the option's full long name")
        if CRIU_LONG_OPTS[name] != NO and not eq:
            raise UsageError(f"--criu-opt {word}: with --container, give its argument as --{name}=VALUE")
        lines.append(f"{name} {value}" if eq else name)
    return lines


def rootfs_changes(upper, lowers, out_dir):
    """The root file system's changes, as podman's export has them: a tar
    of what was added or changed (rootfs-diff.tar) and a JSON list of what
    was deleted (deleted.files), read from overlay's upper directory (a
    whiteout is a deletion; an opaque directory hides all below it).
    Returns the files written."""
    deleted = []
    tar_path = os.path.join(out_dir, ROOTFS_DIFF)
    with tarfile.open(tar_path, "w") as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            if rel_dir and _opaque(dirpath):
                deleted += _hidden_below(lowers, rel_dir, set(dirnames) | set(filenames))
            for name in sorted(dirnames) + sorted(filenames):
                rel = os.path.join(rel_dir, name)
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout
                    deleted.append("/" + rel)
                elif rel not in PODMAN_MANAGED:
                    tar.add(path, arcname=rel, recursive=False)
    files = [ROOTFS_DIFF]
    if deleted:
        with open(os.path.join(out_dir, DELETED_FILES), "w") as f:
            json.dump(deleted, f)
        files.append(DELETED_FILES)
    return files


def _opaque(path):
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _hidden_below(lowers, rel_dir, kept):
    """What the lower layers hold in rel_dir that an opaque directory hides."""
    gone: set[str] = set()
    for lower in lowers:
        try:
            gone.update(n for n in os.listdir(os.path.join(lower, rel_dir)) if n not in kept)
        except OSError:
            continue
    return ["/" + os.path.join(rel_dir, n) for n in sorted(gone)]


class PodmanCheckpoint(LazyDump):
    """`podman container checkpoint NAME` made lazy by the container's CRIU
    config file (the org.criu.config annotation), with hybridmig's hook:
    the same hook points as LazyDump (criu/command.py). podman writes its
    export archive only after the dump, i.e. after the verdict; it is
    thrown away."""

    def __init__(self, podman, info, work, criu_opts=()):
        self.podman = podman
        self.name = info["Name"]
        self.userdata = info["StaticDir"]  # podman's bundle dir: config.dump, spec.dump, checkpoint/
        self.images_dir = os.path.join(self.userdata, "checkpoint")
        self.log = os.path.join(self.userdata, "dump.log")
        self.config_file = info["Config"]["Annotations"][CRIU_CONFIG_ANNOTATION]
        self.export = os.path.join(work, "podman-export.tar")
        os.makedirs(work, exist_ok=True)  # (run --work-dir: made here, as LazyDump makes its images dir)
        hook_sock = self._listen()
        self.yard = ahead(info["State"]["Pid"])
        try:
            self._configure(work, hook_sock, criu_opts)
        except BaseException:
            self.close()
            raise

    def _configure(self, work, hook_sock, criu_opts):
        """The container's CRIU config file, then podman's checkpoint."""
        lines = [
            "lazy-pages",
            "address 127.0.0.1",  # no port: CRIU binds where it can (criu/hook.py)
            "action-script " + write_hook(work, hook_sock),
            *(o.removeprefix("--") for o in in_place_opts() + early_vmas_opts()),
            # No iptables lock of the container's netns for the freeze: it
            # guards TCP connections in repair, and run refuses
            # --tcp-established (2 iptables-restore runs, 4-11 ms measured,
            # the container frozen). Before the user's: a --network-lock wins.
            "network-lock skip",
            # the hierarchies mounted now, not by CRIU with the container frozen
            *(["cgroup-yard " + self.yard.path] if self.yard else []),
            *config_lines(criu_opts),
        ]
        self.in_place = [o for o in lines if o.endswith("lazy-pages-in-place")][-1:] == ["lazy-pages-in-place"]
        os.makedirs(os.path.dirname(self.config_file), mode=0o700, exist_ok=True)
        # O_EXCL: a file that appeared since check_container is not ours to overwrite
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._own_config = True
        cmd = self.podman.command("container", "checkpoint", self.name, "--export", self.export, "--compress", "none")
        # podman's stdout (the container's name) is of no use; its stderr says why it failed
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def failed(self):
        rc = self.proc.poll()
        if rc in (None, 0):
            return None
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            text = os.read(fd, 65536).decode(errors="replace")
        except BlockingIOError:
            text = ""
        return "podman container checkpoint %s failed (exit %d): %s%s" % (
            self.name,
            rc,
            said(subprocess.CompletedProcess([], rc, "", text)),
            log_tail(self.log) if os.path.exists(self.log) else "",  # CRIU's reason
        )

    def kill(self):
        """CRIU first: podman killed alone may leave runc's CRIU waiting. A
        CRIU that dies before post-dump resumes what it froze."""
        if self.criu_pid:
            try:
                criu = psutil.Process(self.criu_pid)
                if criu.name().startswith("criu"):  # not a pid reused since
                    criu.kill()
            except psutil.NoSuchProcess:
                pass
        super().kill()

    def close(self):
        super().close()
        if getattr(self, "yard", None) is not None:
            self.yard.close()
            self.yard = None
        if getattr(self, "_own_config", False):
            try:
                os.unlink(self.config_file)
            except FileNotFoundError:
                pass
            self._own_config = False
        try:
            os.unlink(self.export)
        except FileNotFoundError:
            pass


class ContainerMigration(Migration):
    """Migration of a podman container: the process tree is its init's,
    the dump podman's checkpoint, and the destination restores it into its
    podman under the same name."""

    def __init__(self, name, to, key, podman_opts=(), remove=False, **kw):
        self.podman = Podman(podman_opts)
        self.name = name
        self.remove = remove
        self.container_started = False  # CONTAINER_START sent
        self.info = check_container(self.podman, name)
        super().__init__(self.info["State"]["Pid"], to, key, **kw)
        config_lines(self.criu_opts)  # refused now, not at the switch-over
        if any(o.split("=")[0] == "--tcp-established" for o in self.criu_opts):
            # Tried: the copy's network namespace is a new one of the
            # destination's podman (runc treats it as external), its address
            # another on a bridge and its loopback still down while CRIU
            # restores on --network=none ("Can't connect inet socket back:
            # Network is unreachable"): no connection's socket can be restored.
            raise UsageError(
                "container %s: --tcp-established cannot carry a container's connections: its copy gets a new "
                "network namespace from the destination's podman (another address on network %s)"
                % (name, (self.info.get("HostConfig") or {}).get("NetworkMode") or "unknown")
            )

    def _connect(self):
        same_host = super()._connect()
        if "podman" not in self.host.containers:
            raise SetupError(
                "the destination's serve does not restore podman containers: start it with --podman "
                "(and --podman-opt for its podman's options, e.g. --podman-opt=--root=DIR)"
            )
        # before any page: the destination checks its image and the name,
        # and answers the same (or ERROR, why not) before the container is touched
        said = Container("podman", self.name, self.info["Image"])
        self.channel.send(Msg.CONTAINER, said.encode())
        kind, payload = self.channel.recv()
        if kind != Msg.CONTAINER or Container.decode(payload) != said:
            raise ProtocolError(f"{self.channel.peer} answered CONTAINER with {kind.name}")
        return same_host

    def _start_dump(self, work):
        return PodmanCheckpoint(self.podman, self.info, work, self.criu_opts)

    def _round_done(self, rnd):
        super()._round_done(rnd)
        if not self.container_started:
            self._start_destination(wait=False)

    def _before_freeze(self):
        if not self.container_started:  # (pre-copy converged at its first round)
            self._start_destination(wait=True)

    def _start_destination(self, wait):
        """CONTAINER_START with podman's config.dump and spec.dump (podman
        writes them before CRIU's start, as --export was given): the
        destination's podman starts its restore now, its own start-up out
        of the blackout and of the freeze's CPU, and waits at its conmon
        for the images (RESTORE). Not yet if podman has not written them
        whole, or runc its descriptors.json (`wait`: at the pre-dump hook,
        both have)."""
        dumps = []
        for name in (CONFIG_DUMP, SPEC_DUMP):
            path = os.path.join(self.dump.userdata, name)
            try:
                with open(path) as f:
                    dumps.append(json.load(f))
            except (OSError, ValueError) as e:  # not yet there, or still being written
                if wait:
                    raise HybridmigError(f"podman wrote no {name} for container {self.name}: {e}") from e
                return
        # runc's record of the container's stdio, written before its CRIU
        # started: runc reads it on the destination before starting CRIU,
        # so the restore can start now (it comes again with the images).
        # Without it the destination cannot hold its restore in CRIU, only
        # at conmon; podman's checkpoint may not have reached runc by the
        # end of a short first round (seen: 64 MiB), so a round's end
        # waits for it a little, then leaves CONTAINER_START to the next
        # (at the freeze, the pre-dump hook, runc has written it).
        descriptors = os.path.join(self.dump.images_dir, DESCRIPTORS)
        if not wait and not _appears(descriptors, DESCRIPTORS_WAIT_S):
            log.info("container %s: runc has not started its CRIU yet: CONTAINER_START later", self.name)
            return
        if os.path.exists(descriptors):
            self._send_file(DESCRIPTORS, descriptors)
        self.channel.send(Msg.CONTAINER_START, ContainerStart(dumps[0], dumps[1], list(self.criu_opts)).encode())
        self.container_started = True

    def _send_extra(self):
        """The root file system's changes, read with the container frozen:
        the files it wrote until the freeze are in them."""
        data = self.info["GraphDriver"]["Data"]
        lowers = [p for p in (data.get("LowerDir") or "").split(":") if p]
        out = scratch.make("hybridmig-rootfs-")
        try:
            for name in rootfs_changes(data["UpperDir"], lowers, out):
                self._send_file(name, os.path.join(out, name))
        except OSError as e:  # the verdict is then 1: CRIU resumes the container
            raise HybridmigError(f"cannot read the root file system's changes of {self.name}: {e}") from e
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def run(self):
        report = super().run()
        report.update(container=self.name, container_id=self.info["Id"])
        if self.remove:
            proc = self.podman.run("container", "rm", self.name, check=False)
            if proc.returncode != 0:
                self._warn(f"podman rm {self.name} failed after the migration: {said(proc)}")
        report["warnings"] = self.warnings
        return report
