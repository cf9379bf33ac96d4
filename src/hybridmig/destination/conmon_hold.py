"""A container's restore started before the switch-over and held where
podman starts conmon (docs/containers.md, "How it works", and its
last section).

`podman --conmon WRAPPER container restore --import` does all its own work
(the container's creation, its storage and mounts, the network, the files
podman writes into its root) and then runs WRAPPER as its conmon. The
wrapper lets any other use through, and for the restore (`--restore
DIR`) waits for one word from serve: `go` execs conmon with `--restore`
pointed at the session's images dir (which CRIU's images reach only in
the blackout); anything else, or serve's end, exits 1, and podman's
restore fails, leaving a container in "created" for serve to remove.
It may wait for seconds (the rest of pre-copy).

With a CRIU that runs its pre-restore scripts before reading any image
(`--pre-restore-first`, scripts/criu-patches/0013) the restore is let go
further ahead: `go` is said to the wrapper at once, and conmon, runc (its
CRIU version check, its cgroups, the images dir's descriptors.json, which
the source sent ahead) and CRIU itself all start during pre-copy; CRIU
then waits in its pre-restore script (HOOK) for the second word, said at
RESTORE once the images and the root's changes are in place."""

import json
import os
import shlex
import time

from ..errors import CriuError, HybridmigError

WRAPPER = """#!/bin/bash
# hybridmig serve's conmon for one container restore (destination/conmon_hold.py)
held=
for a; do [ "$a" = --restore ] && held=1; done
[ -z "$held" ] && exec {conmon} "$@"
printf '%s\\0' "$@" > {args}.part && mv {args}.part {args} || exit 1
exec {{fd}}<>{fifo}  # (read-write: never blocks on a serve already gone)
until read -r -t 1 -u "$fd" word; do
  kill -0 {serve} 2>/dev/null || exit 1  # serve is gone: no word will come
done
exec {{fd}}<&-
[ "$word" = go ] || exit 1
args=()
prev=
for a; do
  [ "$prev" = --restore ] && a={images}
  args+=("$a")
  prev=$a
done
exec {conmon} "${{args[@]}}"
"""
# CRIU's action script for a restore held in CRIU (and what serve's own
# ROOT_HOOK does: the restored root's pid at setup-namespaces, for the guard)
HOOK = """#!/bin/bash
# hybridmig serve's CRIU hook for one container restore (destination/conmon_hold.py)
case "$CRTOOLS_SCRIPT_ACTION" in
pre-restore)
  exec {{fd}}<>{fifo}
  until read -r -t 1 -u "$fd" word; do
    kill -0 {serve} 2>/dev/null || exit 1
  done
  [ "$word" = go ] || exit 1 ;;
setup-namespaces)
  echo "$CRTOOLS_INIT_PID" > {root}.tmp && mv {root}.tmp {root} ;;
esac
exit 0
"""
MAX_ARGS = 1 << 20


class ConmonHold:
    """The wrapper for one restore, and serve's end of its FIFO."""

    def __init__(self, directory, conmon, images_dir):
        self.path = os.path.join(directory, "conmon-hold")
        self.args_file = os.path.join(directory, "conmon-hold.args")
        self.fifo = fifo = os.path.join(directory, "conmon-hold.fifo")
        os.mkfifo(fifo, 0o600)
        # open for the wrapper's whole life: the word waits in the pipe if it
        # comes before the wrapper does
        self.fd: int | None = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        q = shlex.quote
        text = WRAPPER.format(
            conmon=q(conmon), args=q(self.args_file), fifo=q(fifo), serve=os.getpid(), images=q(images_dir)
        )
        with open(self.path, "w") as f:
            f.write(text)
        os.chmod(self.path, 0o700)
        self.waiting = 1  # readers still to be told: the wrapper (and CRIU's hook, hold_in_criu())

    def hold_in_criu(self, directory, root_file):
        """The restore goes on now, up to CRIU's pre-restore script, which
        waits for the next word: that script's path (CRIU's action-script)."""
        path = os.path.join(directory, "criu-hold")
        with open(path, "w") as f:
            f.write(HOOK.format(fifo=shlex.quote(self.fifo), serve=os.getpid(), root=shlex.quote(root_file)))
        os.chmod(path, 0o700)
        self.waiting += 1
        self.release("go")
        return path

    def held(self, proc, timeout):
        """Until podman's restore reaches the wrapper: the container's root
        (podman's bundle config names it, mounted) and when it got there
        (a time.time()). CriuError with podman's words if it failed first."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.args_file):
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise CriuError(f"podman's restore failed before its conmon (exit {proc.returncode}): {err[-2000:]}")
            if time.monotonic() > deadline:
                raise CriuError(f"podman's restore did not reach its conmon within {timeout}s")
            time.sleep(0.002)
        with open(self.args_file, "rb") as f:
            at = os.fstat(f.fileno()).st_mtime
            args = f.read(MAX_ARGS).decode(errors="replace").split("\0")
        try:
            bundle = args[args.index("-b") + 1]
            with open(os.path.join(bundle, "config.json")) as f:
                root = json.load(f)["root"]["path"]
        except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
            raise HybridmigError(f"podman's conmon was given no bundle with a root: {e}") from e
        return root, at

    def release(self, word):
        """`go` or `abort`, to the next reader still waiting: the wrapper
        (conmon, then runc's restore, run), then CRIU's hook if the
        restore is held there (CRIU reads the images)."""
        if self.waiting and self.fd is not None:
            self.waiting -= 1
            os.write(self.fd, word.encode() + b"\n")

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
