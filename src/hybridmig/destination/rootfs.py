"""The root file system's changes (rootfs-diff.tar, deleted.files) applied
to a restored container's mounted root, as podman's restore does before
conmon: extracted first, then the deleted paths removed. serve does it
itself when podman's restore was started before the changes were known
(destination/conmon_hold.py).

It is done by a helper process chrooted into the root: the container's
own symbolic links (absolute ones too, e.g. an image's /bin -> /usr/bin)
then resolve inside it, never on the host. The helper is started ahead,
with the held restore, and waits on its stdin for one line (JSON: root,
diff, deleted): a fork of serve in the blackout would copy the page
tables of its page store (30-35 ms at 1 GiB, measured)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

from ..errors import HybridmigError


def has_members(diff_tar):
    with tarfile.open(diff_tar) as tar:
        return tar.next() is not None


class ChangesApplier:
    """The helper, started; apply() once."""

    def __init__(self, dies_with_me):
        self.proc = subprocess.Popen(
            dies_with_me([sys.executable, "-m", __name__]),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def apply(self, root, diff_tar, deleted, timeout):
        """diff_tar: a path or None (checked by check_rootfs_diff); deleted:
        absolute paths (checked). HybridmigError if it failed."""
        line = json.dumps({"root": root, "diff": diff_tar, "deleted": deleted}).encode() + b"\n"
        try:
            _, err = self.proc.communicate(line, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise HybridmigError(f"applying the root file system's changes to {root} took over {timeout}s") from None
        if self.proc.returncode != 0:
            why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {self.proc.returncode}"]
            raise HybridmigError(f"could not apply the root file system's changes to {root}: {why[0][-2000:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _remove(path):
    """As podman's os.RemoveAll: a directory with its content, anything else itself, nothing if absent."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def main():
    line = sys.stdin.buffer.readline()
    if not line:  # serve let it go unused (the restore aborted)
        return 0
    task = json.loads(line)
    f = open(task["diff"], "rb") if task["diff"] else None  # opened here: chrooted, only the root is seen
    os.chroot(task["root"])
    os.chdir("/")
    if f is not None:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # (uncompressed: no compressor's import now)
            # the chroot is the confinement; owners by number, as podman's
            # untar (no name lookup in the container's /etc)
            tar.extractall("/", numeric_owner=True, filter="fully_trusted")
    for path in task["deleted"]:
        _remove(path)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as e:  # noqa: BLE001 -- said on stderr, for serve
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)  # no interpreter teardown: serve waits for this exit in the blackout
