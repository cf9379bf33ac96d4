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
It may wait for seconds (the rest of pre-copy)."""

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
MAX_ARGS = 1 << 20


class ConmonHold:
    """The wrapper for one restore, and serve's end of its FIFO."""

    def __init__(self, directory, conmon, images_dir):
        self.path = os.path.join(directory, "conmon-hold")
        self.args_file = os.path.join(directory, "conmon-hold.args")
        fifo = os.path.join(directory, "conmon-hold.fifo")
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
        self.said = None  # the word sent

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
        """`go` (conmon, then runc's restore, run) or `abort`; once."""
        if self.said is None and self.fd is not None:
            self.said = word
            os.write(self.fd, word.encode() + b"\n")

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
