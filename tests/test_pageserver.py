"""`hybridmig lazy-pages --page-server` against the page server of a real
`criu dump --lazy-pages` (criu/pageserver.py), plus the wire protocol
against a scripted page server (no root needed for those).

The real-CRIU tests dump a small Python process (PID 1 of its own PID
namespace, private anonymous memory with a known pattern per page, and
never-written holes) with --lazy-pages, so that its private anonymous pages
stay on the dump side's page server, restore it through hybridmig and make
the restored process check every page itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hybridmig import doctor

REPO = Path(__file__).resolve().parent.parent
HYBRIDMIG = REPO / ".venv" / "bin" / "hybridmig"
NPAGES = 6000  # the pattern region: 23.4 MiB, not a multiple of 2 MiB
SEED = 0x5EED
PAGE = 4096

# The workload: `python3 WL RESULT NPAGES SEED`. Page i of its region holds
# (i, seed) repeated, except every 7th page, never written (a hole: zero).
# SIGUSR1 makes it check every page and append "OK n" or "BAD ..." to RESULT
# (opened and closed each time: no file is open across the dump).
WORKLOAD = r"""
import mmap, signal, struct, sys
res, npages, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
P = 4096
Z = bytes(P)
def page(i):
    return Z if i % 7 == 3 else struct.pack("<QQ", i, seed) * (P // 16)
m = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(npages):
    if i % 7 != 3:
        m[i * P:(i + 1) * P] = page(i)
def report(line):
    with open(res, "a") as f:
        f.write(line + "\n")
def check():
    bad = [i for i in range(npages) if m[i * P:(i + 1) * P] != page(i)]
    report("OK %d" % npages if not bad else "BAD %d pages, first %d" % (len(bad), bad[0]))
# sigwait, not a handler and pause(): a signal that lands while CRIU has
# just rewound the task onto its pause() syscall runs the C handler, and
# pause() then sleeps with the Python handler never run (seen in CI).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
report("READY")
while True:
    signal.sigwait({signal.SIGUSR1})
    check()
"""


# --- helpers ----------------------------------------------------------------


def _criu():
    for path in (os.environ.get("CRIU"), shutil.which("criu"), "/usr/local/sbin/criu", "/usr/sbin/criu"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _need_root_criu():
    if os.geteuid() != 0:
        pytest.skip("needs root: criu dump/restore, PID namespaces, sysctl fs.pipe-max-size")
    if _criu() is None:
        pytest.skip("criu not found (set $CRIU)")
    for tool in ("unshare", "setsid"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool!r} on PATH to start the workload")
    if not HYBRIDMIG.exists():
        pytest.skip(f"{HYBRIDMIG} is missing: run `make setup`")


def _wait_for(cond, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port):
    """Is something listening on 127.0.0.1:port (this net namespace)?"""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in list(f)[1:])


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_reap(pid):
    """SIGKILL (a PID-namespace init ignores anything else from outside) and reap if ours."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: wait for it to go away
            if not _alive(pid):
                return
            time.sleep(0.05)
            continue
        if done:
            return
        time.sleep(0.05)


def _stop_popen(p, timeout=10):
    if p is None:
        return
    if p.poll() is None:
        p.kill()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def _log_tail(path, n=25):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no {path}: {e})"
    errs = [line for line in lines if "Error" in line and "RLIMIT_NOFILE" not in line][:10]
    return "\n".join([f"--- {path}: errors ---"] + errs + ["--- last %d lines ---" % n] + lines[-n:])


def _pids_running(script):
    """Live processes whose command line names the workload script."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if script.encode() in f.read() and _alive(int(d)):
                    out.append(int(d))
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def subreaper():
    # `criu restore -d` leaves the restored root an orphan: inherit it, to reap it.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Migration:
    """One workload, its lazy dump and everything started for it; close()
    stops all of it by pid."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.images = self.tmp / "images"
        self.images.mkdir()
        self.script = str(self.tmp / "workload.py")
        Path(self.script).write_text(WORKLOAD)
        self.result = self.tmp / "result"
        self.unshare = self.dump = self.daemon = None
        self.host_pid = self.restored_pid = None
        self.port = _free_port()

    def results(self):
        try:
            return self.result.read_text().splitlines()
        except FileNotFoundError:
            return []

    def check(self, pid, timeout=60):
        """SIGUSR1 to pid, then its new result line."""
        n = len(self.results())
        os.kill(pid, signal.SIGUSR1)
        _wait_for(lambda: len(self.results()) > n, timeout, "the check of pid %d" % pid)
        return self.results()[n]

    def start_workload(self):
        python = os.path.realpath(sys.executable)
        self.unshare = subprocess.Popen(
            ["unshare", "-p", "-f", "setsid", python, self.script, str(self.result), str(NPAGES), str(SEED)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        kids = "/proc/%d/task/%d/children" % (self.unshare.pid, self.unshare.pid)
        self.host_pid = int(_wait_for(lambda: Path(kids).read_text().split(), 20, "unshare's child")[0])
        _wait_for(lambda: "READY" in self.results() or self.unshare.poll() is not None, 60, "the workload")
        assert self.unshare.poll() is None, f"the workload died: {self.results()}"
        assert self.check(self.host_pid) == "OK %d" % NPAGES  # sanity before the dump

    def start_lazy_dump(self, *extra):
        self.dump = subprocess.Popen(
            [
                _criu(),
                "dump",
                "--lazy-pages",
                "--address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "-t",
                str(self.host_pid),
                "-D",
                str(self.images),
                "-o",
                "dump.log",
                "-v4",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        _wait_for(
            lambda: _listening(self.port) or self.dump.poll() is not None,
            60,
            "the lazy dump's page server on port %d" % self.port,
        )
        assert self.dump.poll() is None, "criu dump --lazy-pages exited {}:\n{}".format(
            self.dump.returncode, _log_tail(self.images / "dump.log")
        )

    def start_daemon(self, port, expect_listening=True):
        self.daemon_out = self.tmp / "daemon.out"
        self.stats = self.tmp / "stats.json"
        with open(self.daemon_out, "wb") as out:
            self.daemon = subprocess.Popen(
                [
                    str(HYBRIDMIG),
                    "lazy-pages",
                    "-D",
                    str(self.images),
                    "--page-server",
                    "--address",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--stats-json",
                    str(self.stats),
                    "--timeout",
                    "60",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        sock = self.images / "lazy-pages.socket"
        _wait_for(lambda: sock.exists() or self.daemon.poll() is not None, 30, "hybridmig lazy-pages to listen")
        if expect_listening:
            assert self.daemon.poll() is None, (
                f"hybridmig lazy-pages exited {self.daemon.returncode}: {self.daemon_out.read_text()}"
            )

    def restore(self):
        pidfile = self.tmp / "restore.pid"
        proc = subprocess.run(
            [
                _criu(),
                "restore",
                "-D",
                str(self.images),
                "--lazy-pages",
                "-d",
                "--pidfile",
                str(pidfile),
                "-o",
                "restore.log",
                "-v4",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if pidfile.exists():
            try:
                self.restored_pid = int(pidfile.read_text())
            except ValueError:
                pass
        return proc

    def assert_restore_gone(self):
        """Only the dumped (frozen) original is left of the workload."""

        def others():
            return [p for p in _pids_running(self.script) if p not in (self.unshare.pid, self.host_pid)]

        try:
            _wait_for(lambda: not others(), 30, "the failed restore's processes to go")
        except AssertionError:
            raise AssertionError(f"left running after the failed restore: {others()}") from None

    def close(self):
        _stop_popen(self.daemon)
        _stop_popen(self.dump)
        _kill_reap(self.restored_pid)
        if self.unshare is not None:
            _kill_reap(self.host_pid)
            _stop_popen(self.unshare)


@pytest.fixture
def migration(subreaper, pipe_max_size):
    m = Migration(tempfile.mkdtemp(prefix="hm-test-pageserver-"))
    try:
        yield m
    finally:
        m.close()
        shutil.rmtree(m.tmp, ignore_errors=True)


@pytest.fixture
def root_criu():
    _need_root_criu()


# --- real CRIU ----------------------------------------------------------------


@pytest.mark.criu
@pytest.mark.parametrize("in_place", [False, True], ids=["pipes", "in-place"])
def test_lazy_migration_through_page_server(root_criu, migration, in_place):
    """in-place: CRIU's --lazy-pages-in-place (scripts/criu-patches/0002)
    copies no lazy page at the dump; its page server reads every page asked
    for from the frozen task's memory."""
    m = migration
    if in_place and not doctor.check_criu_lazy_in_place().ok:
        pytest.skip("this CRIU lacks --lazy-pages-in-place (scripts/criu-patches/0002)")
    m.start_workload()
    m.start_lazy_dump(*(["--lazy-pages-in-place"] if in_place else []))
    m.start_daemon(m.port)

    r = m.restore()
    assert r.returncode == 0, "criu restore --lazy-pages failed (%d): %s\n%s\n%s" % (
        r.returncode,
        r.stderr,
        _log_tail(m.images / "restore.log"),
        m.daemon_out.read_text(),
    )
    assert m.restored_pid

    try:
        rc = m.daemon.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError("hybridmig lazy-pages still running 120 s after the restore") from None
    assert rc == 0, "hybridmig lazy-pages exited %d: %s" % (rc, m.daemon_out.read_text())
    try:
        rc = m.dump.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "criu dump --lazy-pages still serving after the daemon exited:\n" + _log_tail(m.images / "dump.log")
        ) from None
    assert rc == 0, "criu dump --lazy-pages exited %d:\n%s" % (rc, _log_tail(m.images / "dump.log"))
    dump_log = (m.images / "dump.log").read_text(errors="replace")
    assert "Lazy pages transfer finished successfully" in dump_log
    # the parasite drained no lazy page-pipe buffer (-v4 logs each one it drains: "PPB: N pages")
    drained = sum(int(line.split("PPB: ")[1].split()[0]) for line in dump_log.splitlines() if "PPB: " in line)
    if in_place:
        assert drained < NPAGES // 10, drained  # pages that are never lazy: file-backed data, stacks
    else:
        assert drained >= NPAGES // 2, drained

    stats = json.loads(m.stats.read_text())
    written = NPAGES - len(range(3, NPAGES, 7))
    assert stats["tasks"] == 1
    assert stats["lazy_pages"] >= written  # the region's pages, plus the interpreter's heap
    assert stats["pages_fault"] + stats["pages_prefetch"] == stats["lazy_pages"]

    # The dumped process is gone (the dump killed it); the restored one checks every page.
    _wait_for(lambda: m.unshare.poll() is not None, 10, "the dumped workload to end")
    assert m.check(m.restored_pid) == "OK %d" % NPAGES


@pytest.mark.criu
def test_wrong_port_fails_cleanly(root_criu, migration):
    m = migration
    m.start_workload()
    m.start_lazy_dump()
    wrong = _free_port()
    while wrong == m.port or _listening(wrong):
        wrong = _free_port()
    # The daemon tries its page server before it listens: it fails at once,
    # and a restore then finds no one to serve it.
    m.start_daemon(wrong, expect_listening=False)
    try:
        rc = m.daemon.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("hybridmig lazy-pages still running after its page server was refused") from None
    out = m.daemon_out.read_text()
    assert rc != 0
    assert "hybridmig: error:" in out and "127.0.0.1:%d" % wrong in out and "refused" in out.lower(), out
    assert "Traceback" not in out, out
    r = m.restore()
    assert r.returncode != 0, "criu restore succeeded without its lazy pages"

    # Nothing of the restore is left: only the dumped (frozen) original runs.
    m.assert_restore_gone()
    assert _alive(m.host_pid)
    if m.restored_pid:
        assert not _alive(m.restored_pid)

    # The dump still waits for its client; an aborted session fails it and
    # the original resumes, intact.
    assert m.dump.poll() is None
    from hybridmig.criu.pageserver import PageServerSource

    src = PageServerSource("127.0.0.1", m.port)
    src.connect()
    src.abort()
    try:
        rc = m.dump.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("criu dump did not end after the aborted session") from None
    assert rc != 0
    assert "Lazy pages transfer FAILED" in (m.images / "dump.log").read_text(errors="replace")
    assert m.check(m.host_pid) == "OK %d" % NPAGES


@pytest.mark.criu
def test_page_server_closing_early_fails_the_restore(root_criu, migration):
    """The page server closes the connection at the first request (as a
    source CRIU that fails does): the daemon must exit non-zero naming it,
    and the restore it serves must fail, not hang."""
    m = migration
    m.start_workload()
    m.start_lazy_dump()
    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen(1)
    closer.settimeout(60)
    requests = []

    def close_at_first_request():
        try:
            c, _ = closer.accept()
        except OSError:
            return
        with c:
            c.settimeout(60)
            requests.append(c.recv(PSI.size))

    server = threading.Thread(target=close_at_first_request, daemon=True)
    server.start()
    try:
        m.start_daemon(closer.getsockname()[1])
        r = m.restore()  # bounded by its own timeout: a hang fails the test
        assert r.returncode != 0, "criu restore succeeded without its lazy pages"
        try:
            rc = m.daemon.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("hybridmig lazy-pages still running after its page server closed") from None
    finally:
        closer.close()
        server.join(10)
    out = m.daemon_out.read_text()
    assert requests and requests[0], "the daemon never asked the page server for a page"
    assert rc != 0
    assert "hybridmig: error:" in out and "closed the connection" in out, out
    assert "Traceback" not in out, out

    m.assert_restore_gone()
    # the real page server was never asked: told of the failure, its dump
    # resumes the original, intact
    from hybridmig.criu.pageserver import PageServerSource

    src = PageServerSource("127.0.0.1", m.port)
    src.connect()
    src.abort()
    assert m.dump.wait(60) != 0
    assert m.check(m.host_pid) == "OK %d" % NPAGES


# --- the wire protocol against a scripted page server -----------------------

PSI = struct.Struct("@IQQQ")


class FakeServer(threading.Thread):
    """Answers PS_IOV_GET as page_server_get_pages() does: replies clamped at
    the end of the iovec holding vaddr (`iovs`), page i filled with byte i%251;
    `mode` breaks it on purpose."""

    def __init__(self, iovs, pid, mode="ok"):
        super().__init__(daemon=True)
        self.iovs, self.pid, self.mode = iovs, pid, mode
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.lsock.settimeout(10)
        self.port = self.lsock.getsockname()[1]
        self.log = []

    @staticmethod
    def content(vaddr):
        return bytes([(vaddr // PAGE) % 251]) * PAGE

    def _recv(self, c, n):
        b = b""
        while len(b) < n:
            x = c.recv(n - len(b))
            if not x:
                return None
            b += x
        return b

    def run(self):
        c, _ = self.lsock.accept()
        c.settimeout(10)
        with c:
            while True:
                h = self._recv(c, PSI.size)
                if h is None:
                    self.log.append(("eof",))
                    return
                cmd, nr, vaddr, dst = PSI.unpack(h)
                self.log.append((cmd, nr, vaddr, dst))
                if cmd == 0x1023:
                    c.sendall(struct.pack("@i", 0))
                    continue
                if cmd != 7 or dst != self.pid:
                    return
                iov = next((s, e) for s, e in self.iovs if s <= vaddr < e)
                n = min(nr, (iov[1] - vaddr) // PAGE)
                if self.mode == "garbage":
                    c.sendall(PSI.pack(1, n, vaddr, dst))
                    return
                c.sendall(PSI.pack(6 | 4 << 16, n, vaddr, dst))
                data = b"".join(self.content(vaddr + i * PAGE) for i in range(n))
                if self.mode == "truncate":
                    c.sendall(data[: len(data) // 2])
                    return
                c.sendall(data)


def _task(pid, runs):
    from hybridmig.criu.images import LazyRun, TaskImages

    return TaskImages(pid, "/nonexistent", [LazyRun(v, n, None) for v, n in runs])


@pytest.fixture
def store():
    try:
        from hybridmig.bindings.pagestore import PageStore
    except ImportError as e:
        pytest.skip(f"native module unavailable: {e}")
    return PageStore()


def test_protocol_clamped_replies_and_close(store):
    from hybridmig.bindings.pagestore import ABSENT, DATA
    from hybridmig.criu.pageserver import PageServerSource

    base = 0x7F0000000000
    # The server's iovecs split where our runs do not, and the request has a gap.
    srv = FakeServer(
        [(base, base + 3 * PAGE), (base + 3 * PAGE, base + 10 * PAGE), (base + 20 * PAGE, base + 30 * PAGE)], pid=42
    )
    srv.start()
    src = PageServerSource("127.0.0.1", srv.port)
    src.add_task(7, _task(42, [(base, 10), (base + 20 * PAGE, 10)]))
    src.read_into(store, 7, base + PAGE, 24)  # pages 1..24: 1-9 and 20-24
    src.close()
    src.close()  # once only
    srv.join(10)
    for i in range(32):
        kind, data = store.get(7, base + i * PAGE)
        if 1 <= i <= 9 or 20 <= i <= 24:
            assert kind == DATA and data == FakeServer.content(base + i * PAGE), i
        else:
            assert kind == ABSENT, i
    gets = [e for e in srv.log if e[0] == 7]
    assert gets == [(7, 9, base + PAGE, 42), (7, 5, base + 20 * PAGE, 42), (7, 7, base + 3 * PAGE, 42)]
    assert srv.log[-2:] == [(0x1023, 0, 0, 0), ("eof",)]
    assert src.short_replies == 1


@pytest.mark.parametrize("mode", ["garbage", "truncate"])
def test_protocol_errors_name_the_server(store, mode):
    from hybridmig.criu.pageserver import PageServerSource
    from hybridmig.errors import ProtocolError

    base = 0x7F0000000000
    srv = FakeServer([(base, base + 16 * PAGE)], pid=5, mode=mode)
    srv.start()
    src = PageServerSource("127.0.0.1", srv.port, io_timeout=10)
    src.add_task(5, _task(5, [(base, 16)]))
    with pytest.raises(ProtocolError, match="127.0.0.1:%d" % srv.port) as ei:
        src.read_into(store, 5, base, 16)
    assert ("protocol mismatch" if mode == "garbage" else "closed the connection") in str(ei.value)
    with pytest.raises(ProtocolError, match="unusable"):
        src.read_into(store, 5, base, 16)
    src.close()  # no PS_IOV_CLOSE on a broken stream, and no error
    srv.join(10)
    assert not any(e[0] == 0x1023 for e in srv.log)


def test_connection_refused_names_the_server():
    from hybridmig.criu.pageserver import PageServerSource
    from hybridmig.errors import ProtocolError

    port = _free_port()
    src = PageServerSource("127.0.0.1", port)
    with pytest.raises(ProtocolError, match=r"127\.0\.0\.1:%d.*refused" % port):
        src.add_task(1, _task(1, [(0x10000, 1)]))
    src.close()
