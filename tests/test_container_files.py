"""The root file system's changes of a container: what the source reads
from overlay's upper dir (source/container.py), and what serve takes of
the tar a source sends (destination/container.py)."""

import io
import json
import os
import tarfile

import pytest

from hybridmig.destination.container import ContainerRestore, check_rootfs_diff
from hybridmig.destination.rootfs import ChangesApplier
from hybridmig.errors import HybridmigError
from hybridmig.podman import Podman
from hybridmig.source.container import rootfs_changes


def _tar(path, *members):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name, kind=tarfile.REGTYPE, data=b"", linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def test_plain_files_dirs_and_links_pass(tmp_path):
    check_rootfs_diff(
        _tar(
            tmp_path / "ok.tar",
            _member("tmp", tarfile.DIRTYPE),
            _member("tmp/a", data=b"x"),
            _member("tmp/l", tarfile.SYMTYPE, linkname="/etc/passwd"),  # resolved in the root by the container
            _member("tmp/h", tarfile.LNKTYPE, linkname="tmp/a"),
        )
    )


@pytest.mark.parametrize(
    ("member", "error"),
    [
        (_member("/etc/passwd", data=b"x"), "outside the container's root"),
        (_member("../../etc/passwd", data=b"x"), "outside the container's root"),
        (_member("tmp/../../x", data=b"x"), "outside the container's root"),
        (_member("dev/sda", tarfile.CHRTYPE), "a device or special file"),
        (_member("dev/sdb", tarfile.BLKTYPE), "a device or special file"),
        (_member("tmp/h", tarfile.LNKTYPE, linkname="../../etc/shadow"), "outside the root"),
        (_member("tmp/h", tarfile.LNKTYPE, linkname="/etc/shadow"), "outside the root"),
    ],
)
def test_what_would_leave_the_root_or_add_a_device_is_refused(tmp_path, member, error):
    with pytest.raises(HybridmigError, match=error):
        check_rootfs_diff(_tar(tmp_path / "bad.tar", member))


def test_nothing_is_written_through_a_link_of_the_tar(tmp_path):
    """A symlink to the host's /etc, then a file below it: the untar would
    follow the link out of the root."""
    path = _tar(tmp_path / "via.tar", _member("x", tarfile.SYMTYPE, linkname="/etc"), _member("x/passwd", data=b"r"))
    with pytest.raises(HybridmigError, match="through a symbolic link of its own"):
        check_rootfs_diff(path)


def test_a_non_tar_is_refused(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(HybridmigError, match="no tar"):
        check_rootfs_diff(path)


@pytest.mark.root
def test_changes_from_an_upper_dir(tmp_path):
    """Added and changed files go into the tar (podman's own files do
    not), whiteouts and what an opaque directory hides into deleted.files."""
    upper, lower, out = tmp_path / "upper", tmp_path / "lower", tmp_path / "out"
    for d in (upper / "tmp", upper / "etc", upper / "opaque", lower / "opaque", out):
        d.mkdir(parents=True)
    (upper / "tmp" / "new").write_text("new")
    (upper / "etc" / "hosts").write_text("podman's")
    os.mknod(upper / "tmp" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    (lower / "opaque" / "hidden").write_text("lower")
    (upper / "opaque" / "kept").write_text("upper")
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    files = rootfs_changes(str(upper), [str(lower)], str(out))
    assert files == ["rootfs-diff.tar", "deleted.files"]
    with tarfile.open(out / "rootfs-diff.tar") as tar:
        names = set(tar.getnames())
    assert {"tmp/new", "opaque/kept", "tmp", "opaque"} <= names
    assert "etc/hosts" not in names and "tmp/gone" not in names
    assert sorted(json.loads((out / "deleted.files").read_text())) == ["/opaque/hidden", "/tmp/gone"]
    check_rootfs_diff(out / "rootfs-diff.tar")


def test_restore_config_skips_the_network_lock_whatever_the_source_asks(tmp_path):
    """serve's CRIU config for a container's restore ends with `network-lock
    skip` (the netns is new: nothing of the dump's lock is there; CRIU
    patch 0007), after the source's options, a --network-lock among them."""
    files, images = tmp_path / "files", tmp_path / "images"
    files.mkdir()
    images.mkdir()
    image = "ab" * 32
    (files / "config.dump").write_text(json.dumps({"rootfsImageID": image}))
    (files / "spec.dump").write_text(json.dumps({"annotations": {}}))
    restore = ContainerRestore(
        Podman(["--runtime=/usr/bin/runc"]), "c", str(tmp_path), str(images), str(files), "/hook", "/pid", list
    )
    restore.image = image
    restore.criu_opts = ["--network-lock=iptables", "--tcp-close"]  # (CONTAINER_START's)
    restore.prepare(["--network-lock=iptables", "--tcp-close"])
    lines = (tmp_path / "criu.conf").read_text().splitlines()
    assert lines[-1] == "network-lock skip" and "network-lock iptables" in lines, lines


def test_changes_land_inside_the_root_through_its_absolute_links(tmp_path):
    """serve applies a container's changes to its root itself (its podman
    restore started before they were known): the root's own links, an
    absolute one like an image's /bin -> /usr/bin among them, resolve inside
    the root, never on the host; then the deleted paths go, dirs whole."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "gone" / "sub").mkdir(parents=True)
    (root / "gone" / "sub" / "f").write_text("x")
    (root / "gone-file").write_text("x")
    outside.mkdir()
    os.symlink("/usr/bin", root / "bin")  # absolute: on the host it would be the host's /usr/bin
    os.symlink(str(outside), root / "escape")  # a host path: in the container, a path of its own root
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    diff = _tar(
        tmp_path / "rootfs-diff.tar",
        _member("bin/tool", data=b"tool"),
        _member("escape/planted", data=b"planted"),
        _member("etc", kind=tarfile.DIRTYPE),
        _member("etc/new", data=b"new"),
    )
    check_rootfs_diff(diff)
    ChangesApplier(list).apply(str(root), str(diff), ["/gone", "/gone-file", "/never-was"], timeout=30)
    assert (root / "usr" / "bin" / "tool").read_bytes() == b"tool"
    assert (root / "etc" / "new").read_bytes() == b"new"
    assert (root / str(outside).lstrip("/") / "planted").read_bytes() == b"planted"  # inside the root
    assert os.listdir(outside) == []
    assert not (root / "gone").exists() and not (root / "gone-file").exists()
    assert not os.path.exists("/usr/bin/tool") or open("/usr/bin/tool", "rb").read() != b"tool"


def test_changes_that_cannot_be_applied_are_an_error(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").write_text("a file where the diff wants a directory")
    diff = _tar(tmp_path / "rootfs-diff.tar", _member("etc/new", data=b"new"))
    with pytest.raises(HybridmigError, match="could not apply the root file system's changes"):
        ChangesApplier(list).apply(str(root), str(diff), [], timeout=30)


def test_restore_options_must_be_those_of_container_start(tmp_path):
    """The CRIU options RESTORE names are the ones CONTAINER_START gave (a
    restore held in CRIU has read its config file already)."""
    restore = ContainerRestore(
        Podman(["--runtime=/usr/bin/runc"]), "c", str(tmp_path), str(tmp_path), str(tmp_path), "/hook", "/pid", list
    )
    with pytest.raises(HybridmigError, match="not CONTAINER_START's"):
        restore.prepare(["--tcp-close"])
