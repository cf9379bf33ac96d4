"""Driver for memwork (``memwork.c`` beside this file), the self-verifying
workload of the demo, the tests and the bench.

A workload is a tree of ``procs`` memwork processes, the root being PID 1 of
a PID namespace of its own (so that CRIU can dump and restore the tree with
its pids).  Each process fills a private region with pages whose content is a
function of (page index, generation) and keeps rewriting them; on a signal it
checks every page and appends one JSON line to a shared report file.  This
module starts such trees, adopts restored ones, asks them to verify
themselves and reads the answers.

Only processes are ever signalled by pid (through psutil, which refuses a
pid that has been reused), never by name.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from ..errors import WorkloadError

# memwork.c ships as package data, so that `hybridmig demo` works from a
# wheel too; binaries go to a cache of root's (every user of them is root).
MEMWORK_SRC = Path(__file__).resolve().with_name("memwork.c")
BUILD_DIR = Path(os.environ.get("HYBRIDMIG_BUILD_DIR", "/var/cache/hybridmig/workload"))

#: First header word of every written page ("MEMWORK1"), see memwork.c.
PAGE_MAGIC = 0x4D454D574F524B31
#: comm of the short-lived children of a fork-verify: not part of the tree.
FORK_VERIFY_COMM = "memwork-fv"
#: Signal that makes memwork churn its mappings (glibc's SIGRTMIN).
CHURN_SIGNAL = signal.SIGRTMIN

PR_SET_CHILD_SUBREAPER = 36


def build_program(src: os.PathLike, name: str, dest_dir: os.PathLike | None = None) -> str:
    """Compile the C program src into ``dest_dir`` (default BUILD_DIR)
    as ``name`` and return the binary's path.  It is rebuilt only when the
    source is newer: a dumped image refers to the binary, which must not
    change under it."""
    dest = Path(dest_dir) if dest_dir else BUILD_DIR
    dest.mkdir(parents=True, exist_ok=True)
    binary = dest / name
    try:
        if binary.stat().st_mtime >= Path(src).stat().st_mtime:
            return str(binary)
    except FileNotFoundError:
        pass
    cc = os.environ.get("CC", "cc")
    # Built under a temporary name and renamed: concurrent builders and
    # running instances never see a half-written binary.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
    os.close(fd)
    try:
        proc = subprocess.run(
            # -z now: every symbol bound at start, so that a copy running on
            # zeroed memory does not fault in the dynamic linker before it
            # can report it (memwork's "crash" and "corrupt" lines)
            [cc, "-O2", "-pthread", "-Wall", "-Wl,-z,now", "-o", tmp, str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise WorkloadError(f"building {name} failed:\n{proc.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(binary)


def build_memwork(dest_dir: os.PathLike | None = None) -> str:
    return build_program(MEMWORK_SRC, "memwork", dest_dir)


def kill_tree(pid_or_proc) -> None:
    """SIGKILL a process and its descendants, by pid (psutil refuses reused
    pids), and reap what is ours to reap."""
    try:
        proc = pid_or_proc if isinstance(pid_or_proc, psutil.Process) else psutil.Process(pid_or_proc)
        procs = proc.children(recursive=True) + [proc]
    except psutil.ZombieProcess:  # (a NoSuchProcess): still to be reaped
        procs = [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.wait(10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            pass


def become_subreaper() -> None:
    """Make the calling process a child subreaper.

    ``criu restore -d`` leaves the restored root an orphan once criu exits;
    as a subreaper the test process inherits it, can reap it, and zombies do
    not pile up on the machine's init (which here does not reap promptly).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def ns_pid(host_pid: int) -> int:
    """The pid of ``host_pid`` inside its own (innermost) PID namespace."""
    with open(f"/proc/{host_pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise WorkloadError(f"no NSpid for pid {host_pid}")


class Workload:
    """A running memwork tree, started here or adopted after a restore.

    Use as a context manager: leaving it always stops the tree (SIGTERM,
    then SIGKILL) and removes the report directory if this object owns it.
    """

    def __init__(
        self,
        host_pid: int,
        report: os.PathLike,
        procs: int,
        popen: subprocess.Popen | None = None,
        owned_dir: str | None = None,
    ):
        self.host_pid = host_pid
        self.report_path = Path(report)
        self.procs = procs
        self._popen = popen
        self._owned_dir = owned_dir
        self._root_reaped = False
        self._root: psutil.Process | None
        try:
            self._root = psutil.Process(host_pid)
        except psutil.NoSuchProcess:
            self._root = None
        # Everything of the tree seen so far, to be stopped even if the root
        # is gone; psutil.Process objects refuse to signal a reused pid.
        self._known: dict[int, psutil.Process] = {}
        self._remember_tree()

    # --- construction -------------------------------------------------------
    @classmethod
    def start(
        cls,
        size_mb: int,
        threads: int = 1,
        procs: int = 1,
        rate: float = 0,
        hot: float = 100,
        netns: str | None = None,
        report: os.PathLike | None = None,
        timeout: float = 60,
        binary: str | None = None,
        check_writes: bool = False,
        compressible: bool = False,
    ) -> Workload:
        """Start a tree of ``procs`` processes of ``size_mb`` MiB and
        ``threads`` writers each, rate-limited to ``rate`` pages/s/thread
        (0: unlimited) over the first ``hot`` percent of each writer's
        slice, in a new PID namespace, optionally inside network
        namespace /run/netns/``netns``.  ``check_writes``: each writer checks
        a page before rewriting it and reports the first wrong one
        (``reports("corrupt")``). ``compressible``: pages lz4 shrinks
        (~1/7), random ones if not.  Returns once every process reported
        "ready"."""
        binary = binary or build_memwork()
        owned_dir = None
        if report is None:
            owned_dir = tempfile.mkdtemp(prefix="memwork-")
            report = Path(owned_dir) / "report.jsonl"
        report = Path(report).resolve()
        report.parent.mkdir(parents=True, exist_ok=True)
        start_offset = report.stat().st_size if report.exists() else 0

        cmd = []
        if netns is not None:
            nspath = f"/run/netns/{netns}"
            if not os.path.exists(nspath):
                raise WorkloadError(f"network namespace {nspath} does not exist")
            # nsenter and not `ip netns exec`: the latter also enters a mount
            # namespace of its own, which CRIU then refuses to dump.
            cmd += ["nsenter", f"--net={nspath}"]
        # No --mount-proc (a mount namespace CRIU would have to dump) and no
        # --kill-child: the root's pdeath signal would be restored by CRIU
        # and delivered as soon as `criu restore -d` exits.
        cmd += [
            "unshare",
            "--pid",
            "--fork",
            binary,
            "--size-mb",
            str(size_mb),
            "--threads",
            str(threads),
            "--procs",
            str(procs),
            "--rate",
            repr(float(rate)),
            "--hot",
            repr(float(hot)),
            "--report",
            str(report),
        ]
        if check_writes:
            cmd += ["--check-writes", "1"]
        if compressible:
            cmd += ["--compressible", "1"]
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        try:
            root = cls._find_ns_init(popen, timeout)
            wl = cls(root, report, procs, popen=popen, owned_dir=owned_dir)
            wl._wait_events("ready", procs, start_offset, timeout, key="pid")
            wl._remember_tree()
            return wl
        except BaseException:
            _kill_popen_tree(popen)
            if owned_dir:
                shutil.rmtree(owned_dir, ignore_errors=True)
            raise

    @classmethod
    def adopt(cls, host_pid: int, report, procs: int | None = None, timeout: float = 10) -> Workload:
        """A Workload for a restored tree whose root has ``host_pid`` (e.g.
        from ``criu restore --pidfile``).  ``report`` is the report path, or
        the Workload that was dumped: then its report file, process count and
        ownership of the report directory are taken over."""
        owned_dir = None
        if isinstance(report, Workload):
            old = report
            report, owned_dir = old.report_path, old._owned_dir
            old._owned_dir = None
            if procs is None:
                procs = old.procs
        wl = cls(host_pid, report, procs or 1, owned_dir=owned_dir)
        if wl._root is None:
            wl._cleanup_dir()
            raise WorkloadError(f"restored root {host_pid} does not exist")
        if procs is None:
            # Count the tree once it is complete (CRIU restores it whole
            # before resuming, so this is immediate).
            wl.procs = len(wl.pids())
        deadline = time.monotonic() + timeout
        while len(wl.pids()) < wl.procs:
            if time.monotonic() > deadline:
                raise WorkloadError(f"restored tree of {host_pid} has {len(wl.pids())} of {wl.procs} processes")
            time.sleep(0.05)
        wl._remember_tree()
        return wl

    @staticmethod
    def _find_ns_init(popen: subprocess.Popen, timeout: float) -> int:
        """The host pid of the PID namespace init: the only child of unshare."""
        deadline = time.monotonic() + timeout
        parent = psutil.Process(popen.pid)
        while True:
            rc = popen.poll()
            if rc is not None:
                raise WorkloadError(f"unshare exited with {rc} before memwork started")
            try:
                kids = parent.children()
            except psutil.NoSuchProcess:
                kids = []
            if kids:
                return kids[0].pid
            if time.monotonic() > deadline:
                raise WorkloadError("memwork did not start in time")
            time.sleep(0.01)

    # --- processes ---------------------------------------------------------------
    def _tree(self) -> list[psutil.Process]:
        if self._root is None or not self._root.is_running():
            return []
        try:
            procs = [self._root] + self._root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in procs:
            try:
                if p.name() == FORK_VERIFY_COMM or p.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            out.append(p)
        return out

    def _remember_tree(self) -> None:
        for p in self._tree():
            self._known.setdefault(p.pid, p)

    def pids(self) -> list[int]:
        """Host pids of the live processes of the tree, root first."""
        return [p.pid for p in self._tree()]

    def ns_pids(self) -> dict[int, int]:
        """{host pid: pid inside the workload's PID namespace}."""
        out = {}
        for pid in self.pids():
            try:
                out[pid] = ns_pid(pid)
            except (OSError, WorkloadError):
                pass
        return out

    def alive(self) -> bool:
        return bool(self._tree())

    # --- reports -----------------------------------------------------------------
    def _read_from(self, offset: int) -> tuple[list[dict], int]:
        """Complete lines from ``offset`` on, and the offset after them (a line
        still being written is left for the next read)."""
        try:
            with open(self.report_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n")
        if end < 0:
            return [], offset
        lines = []
        for raw in data[:end].split(b"\n"):
            if raw.strip():
                lines.append(json.loads(raw))
        return lines, offset + end + 1

    def _offset(self) -> int:
        return self._read_from(0)[1]

    def reports(self, event: str | None = None) -> list[dict]:
        """Every complete line of the report file (of one event if given)."""
        lines = self._read_from(0)[0]
        return [r for r in lines if event is None or r.get("event") == event]

    def _wait_events(self, event: str, count: int, offset: int, timeout: float, key: str = "pid") -> list[dict]:
        """Wait for ``count`` lines of ``event`` from distinct ``key`` values
        appended after ``offset``; return them sorted by pid."""
        deadline = time.monotonic() + timeout
        found: dict[int, dict] = {}
        while True:
            lines, offset = self._read_from(offset)
            for r in lines:
                if r.get("event") == event:
                    found[r[key]] = r
                elif r.get("event") == "child-exit":
                    raise WorkloadError(f"a workload process died: {r}")
            if len(found) >= count:
                return sorted(found.values(), key=lambda r: r["pid"])
            if not self.alive():
                raise WorkloadError(
                    f"workload {self.host_pid} is gone while waiting for {event!r} ({len(found)}/{count} arrived)"
                )
            if time.monotonic() > deadline:
                raise WorkloadError(
                    f"timed out after {timeout}s waiting for {event!r} "
                    f"({len(found)}/{count} arrived) from workload {self.host_pid}"
                )
            time.sleep(0.02)

    def _signal(self, sig: int) -> None:
        if self._root is None:
            raise WorkloadError("workload has no root process")
        try:
            self._root.send_signal(sig)  # the root forwards it to the tree
        except psutil.NoSuchProcess:
            raise WorkloadError(f"workload root {self.host_pid} is gone") from None

    def _signal_and_wait(self, sig: int, event: str, timeout: float, key: str = "pid") -> list[dict]:
        offset = self._offset()
        self._signal(sig)
        return self._wait_events(event, self.procs, offset, timeout, key=key)

    def verify(self, timeout: float = 60) -> list[dict]:
        """Every process pauses its writers, checks all its pages and reports;
        returns one "verify" dict per process (fields: pages, bad, first_bad,
        zero_pages_bad, bad_detail, ops, max_gap_ms, timeline, ...)."""
        return self._signal_and_wait(signal.SIGUSR1, "verify", timeout)

    def fork_verify(self, timeout: float = 60) -> list[dict]:
        """Every process forks a child that checks the inherited snapshot;
        returns one "fork-verify" dict per process ("parent" = its ns pid)."""
        return self._signal_and_wait(signal.SIGUSR2, "fork-verify", timeout, key="parent")

    def churn_verify(self, timeout: float = 60) -> list[dict]:
        """Every process moves (mremap), unmaps and zaps (MADV_DONTNEED) 16
        pages each, then checks all pages; one "churn-verify" dict each."""
        return self._signal_and_wait(CHURN_SIGNAL, "churn-verify", timeout)

    def fork_and_churn_verify(self, timeout: float = 60) -> tuple[list[dict], list[dict]]:
        """fork_verify() and churn_verify() at once: every process forks,
        then churns while its child checks what it inherited. Returns
        (fork-verify dicts, churn-verify dicts)."""
        offset = self._offset()
        self._signal(signal.SIGUSR2)  # a standard signal: taken before the real-time one
        self._signal(CHURN_SIGNAL)
        forks = self._wait_events("fork-verify", self.procs, offset, timeout, key="parent")
        return forks, self._wait_events("churn-verify", self.procs, offset, timeout)

    # --- memory access from outside (as root) ---------------------------------------
    def page_address(self, page: int, pid: int | None = None) -> int:
        """Address of ``page`` in process ``pid`` (host pid, default the root),
        found by its header in /proc/PID/mem.  Pages not written with a valid
        header (zeroed ones) cannot be found."""
        pid = pid or self.host_pid
        needle = struct.pack("<QQ", PAGE_MAGIC, page)
        psize = os.sysconf("SC_PAGE_SIZE")
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for start, end in _anon_rw_mappings(pid):
                chunk = 64 << 20
                for base in range(start, end, chunk):
                    mem.seek(base)
                    data = mem.read(min(chunk, end - base))
                    at = data.find(needle)
                    while at >= 0:
                        if at % psize == 0:
                            return base + at
                        at = data.find(needle, at + 1)
        raise WorkloadError(f"page {page} not found in pid {pid}")

    def poke(self, page: int, offset: int, data: bytes, pid: int | None = None) -> int:
        """Write ``data`` at ``offset`` into ``page`` of a live process behind
        its back (to prove that verification catches it); returns the address."""
        pid = pid or self.host_pid
        addr = self.page_address(page, pid)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        try:
            if os.pwrite(fd, data, addr + offset) != len(data):
                raise WorkloadError("short write to /proc/PID/mem")
        finally:
            os.close(fd)
        return addr

    # --- end of life -----------------------------------------------------------------
    def wait_gone(self, timeout: float = 30) -> None:
        """Wait until every process of the tree is gone (e.g. after `criu dump`
        killed it), reaping what is ours to reap."""
        deadline = time.monotonic() + timeout
        while True:
            root_settled = self._reap()
            if root_settled and not any(_running(p) for p in self._known.values()):
                break
            if time.monotonic() > deadline:
                raise WorkloadError(f"workload {self.host_pid} still alive after {timeout}s")
            time.sleep(0.02)
        if self._popen is not None:
            try:
                self._popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise WorkloadError("unshare did not exit") from None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the root (which stops its children), then SIGKILL whatever
        is left after ``timeout``; reap; remove the owned report directory."""
        try:
            self._remember_tree()
            if self._root is not None and _running(self._root):
                try:
                    self._root.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            try:
                self.wait_gone(timeout)
            except WorkloadError:
                self._remember_tree()
                for p in self._known.values():
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
                if self._popen is not None:
                    _kill_popen_tree(self._popen)
                self.wait_gone(timeout)
        finally:
            self._cleanup_dir()

    def _reap(self) -> bool:
        """Reap unshare, and the root if it is our child: inherited as a
        subreaper after a restore, or after unshare died before it.  Only
        these pids: a waitpid(-1) would steal exit statuses from unrelated
        subprocesses.  Returns False while the root is our child and not yet
        reaped (a multi-threaded root can look like a zombie while its other
        threads still exit, before waitpid can take it)."""
        if self._popen is not None:
            self._popen.poll()
        if self._root is None or self._root_reaped:
            return True
        try:
            pid, _ = os.waitpid(self.host_pid, os.WNOHANG)
        except ChildProcessError:
            return True  # not ours (still unshare's, or init's)
        if pid == 0:
            return False
        self._root_reaped = True
        return True

    def _cleanup_dir(self) -> None:
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Workload root={self.host_pid} procs={self.procs} report={self.report_path}>"


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_popen_tree(popen: subprocess.Popen) -> None:
    """SIGKILL the unshare process started here and its descendants, by pid."""
    try:
        parent = psutil.Process(popen.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _anon_rw_mappings(pid: int) -> Iterable[tuple[int, int]]:
    """(start, end) of the private anonymous writable mappings of ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            perms = fields[1]
            path = fields[5] if len(fields) > 5 else ""
            if perms.startswith("rw") and perms[3] == "p" and path in ("", "[heap]"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                yield start, end
