"""What hybridmig reads of a CRIU image directory: the process tree, and per
task its VMAs and the pages its pagemap says are lazy, with where each run of
pages lies in the pages image. Everything is checked before any page is
served, so that a broken image fails the restore instead of leaving a process
running on zero-filled memory."""

import contextlib
import os
import struct
from dataclasses import dataclass, field

from ..bindings import PAGE_SIZE
from ..errors import ImageError

_I32 = struct.Struct("<i")


def load_reader():
    """Import what reads images ahead of the first read (a frozen step's);
    if it cannot be, that read says why."""
    with contextlib.suppress(ImportError):
        _pycriu()


def _pycriu():
    """pycriu.images, built from CRIU's source by `make setup` (it is not on
    PyPI): imported on first use, so that what reads no image runs without it."""
    import pycriu.images

    return pycriu.images


# Pagemap entry flags (criu/include/pagemap.h).
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2


@dataclass(frozen=True)
class LazyRun:
    """Lazy pages [vaddr, vaddr + npages pages) of one VMA; `offset` is their
    place in the pages image, or None when they are not in the images (a lazy
    dump keeps them on the source's page server)."""

    vaddr: int
    npages: int
    offset: int | None = None

    @property
    def end(self):
        return self.vaddr + self.npages * PAGE_SIZE


@dataclass
class TaskImages:
    pid: int
    pages_path: str
    runs: list = field(default_factory=list)

    @property
    def lazy_pages(self):
        return sum(r.npages for r in self.runs)


def _load(path, what):
    if not os.path.exists(path):
        raise ImageError(f"{path}: missing ({what})")
    try:
        with open(path, "rb") as f:
            return _pycriu().load(f)
    except ImageError:
        raise
    except Exception as e:  # pycriu raises bare exceptions of several kinds
        raise ImageError(f"{path}: unreadable or corrupted {what} image ({e or type(e).__name__})") from e


# compel/include/uapi/task-state.h: CRIU writes a zombie's state as TASK_DEAD
# (2) in core-N.img; TASK_ZOMBIE (6) is taken as well.
ZOMBIE_STATES = (0x02, 0x06)


def task_pids(images_dir):
    """Pids of the dumped processes, in pstree order (zombies included)."""
    img = _load(os.path.join(images_dir, "pstree.img"), "pstree")
    pids = [e["pid"] for e in img["entries"]]
    if not pids:
        raise ImageError("{}: no processes".format(os.path.join(images_dir, "pstree.img")))
    return pids


def is_zombie(images_dir, pid):
    """A zombie has no memory: CRIU sends -pid for it and no uffd."""
    path = os.path.join(images_dir, "core-%d.img" % pid)
    core = _load(path, "core")
    try:
        return core["entries"][0]["tc"]["task_state"] in ZOMBIE_STATES
    except (IndexError, KeyError) as e:
        raise ImageError(f"{path}: no task state") from e


def _pagemap(path):
    """pages_id and the (vaddr, npages, flags) entries of a pagemap image.
    Parsed with the protobuf classes directly: pycriu's dict conversion
    takes 60 ms for the 1000 entries of a 4 GiB task, and the source reads
    this image while its tasks are frozen."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: missing (pagemap)")
    with open(path, "rb") as f:
        data = f.read()
    pos = 4
    (magic,) = _I32.unpack_from(data, 0) if len(data) >= 4 else (None,)
    if magic in (_pycriu().magic.by_name["IMG_COMMON"], _pycriu().magic.by_name["IMG_SERVICE"]):
        (magic,) = _I32.unpack_from(data, 4) if len(data) >= 8 else (None,)
        pos = 8
    if magic != _pycriu().magic.by_name["PAGEMAP"]:
        raise ImageError(f"{path}: not a pagemap image (magic {magic!r})")
    messages: list = []  # pycriu pagemap entries
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageError("%s: truncated at byte %d" % (path, pos))
        (size,) = _I32.unpack_from(data, pos)
        pos += 4
        if size < 0 or pos + size > len(data):
            raise ImageError("%s: truncated: an entry of %d bytes at byte %d" % (path, size, pos))
        msg = _pycriu().pb.pagemap_entry() if messages else _pycriu().pb.pagemap_head()
        try:
            msg.ParseFromString(data[pos : pos + size])
        except Exception as e:  # protobuf's DecodeError, and missing required fields
            raise ImageError("%s: corrupted entry at byte %d (%s)" % (path, pos, e)) from e
        messages.append(msg)
        pos += size
    if not messages:
        raise ImageError(f"{path}: no pagemap head")
    return messages[0].pages_id, [(e.vaddr, e.nr_pages or e.compat_nr_pages, e.flags) for e in messages[1:]]


def _vmas(images_dir, pid):
    path = os.path.join(images_dir, "mm-%d.img" % pid)
    img = _load(path, "mm")
    try:
        return sorted((v["start"], v["end"]) for v in img["entries"][0].get("vmas", []))
    except (IndexError, KeyError) as e:
        raise ImageError(f"{path}: no mm entry") from e


def read_task(images_dir, pid):
    """The lazy pages of task `pid`, split at VMA boundaries (one UFFDIO_COPY
    cannot cross VMAs), with their place in the pages image checked."""
    pm_path = os.path.join(images_dir, "pagemap-%d.img" % pid)
    pages_id, entries = _pagemap(pm_path)
    pages_path = os.path.join(images_dir, "pages-%d.img" % pages_id)
    vmas = _vmas(images_dir, pid)

    task = TaskImages(pid, pages_path)
    offset = 0
    vi = 0
    for vaddr, npages, flags in entries:
        if vaddr % PAGE_SIZE or npages <= 0:
            raise ImageError("%s: malformed entry: vaddr 0x%x, %d pages" % (pm_path, vaddr, npages))
        if flags & PE_PARENT:
            raise ImageError(f"{pm_path}: pages in a parent snapshot (pre-dump images) are not supported")
        here = offset if flags & PE_PRESENT else None
        if flags & PE_PRESENT:
            offset += npages * PAGE_SIZE
        if not flags & PE_LAZY:
            continue
        start, end = vaddr, vaddr + npages * PAGE_SIZE
        while start < end:
            while vi < len(vmas) and vmas[vi][1] <= start:
                vi += 1
            if vi == len(vmas) or vmas[vi][0] > start:
                raise ImageError(
                    f"{pm_path}: lazy pages at 0x{start:x} lie outside every VMA of {os.path.basename(images_dir) or images_dir}"  # noqa: E501
                )
            stop = min(end, vmas[vi][1])
            n = (stop - start) // PAGE_SIZE
            task.runs.append(LazyRun(start, n, None if here is None else here + (start - vaddr)))
            start = stop

    if any(r.offset is not None for r in task.runs):
        try:
            size = os.path.getsize(pages_path)
        except OSError as e:
            raise ImageError("%s: missing (pages image of pid %d)" % (pages_path, pid)) from e
        if size < offset:
            raise ImageError(
                "%s: truncated: holds %d pages, %s lists %d"
                % (pages_path, size // PAGE_SIZE, os.path.basename(pm_path), offset // PAGE_SIZE)
            )
    return task
