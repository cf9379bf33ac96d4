"""The CRIU hook's last resort: when CRIU's page server cannot be reached to
end the session, the hook's child does what CRIU would have done."""

import subprocess
import time

import psutil

from hybridmig.criu import hook


def _sleeper(cleanup):
    proc = subprocess.Popen(["sleep", "60"])
    cleanup.append(proc)
    return proc


def _ended(proc):
    try:
        proc.wait(5)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_commit_ends_the_tree_and_criu(monkeypatch):
    procs = []
    grandchild = None
    try:
        criu = _sleeper(procs)
        root = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        procs.append(root)
        grandchild = psutil.Process(int(root.stdout.readline()))
        monkeypatch.setenv("CRTOOLS_INIT_PID", str(root.pid))
        hook._end_without_page_server(criu.pid, commit=True)
        assert _ended(root) and _ended(criu)
        grandchild.wait(5)  # psutil.TimeoutExpired if the tree's child survived
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if grandchild is not None and grandchild.is_running():
            grandchild.kill()


def test_abort_ends_only_criu(monkeypatch):
    """Uncommitted, the tree runs on once CRIU (its tracer) is gone."""
    procs = []
    try:
        criu, root = _sleeper(procs), _sleeper(procs)
        monkeypatch.setenv("CRTOOLS_INIT_PID", str(root.pid))
        hook._end_without_page_server(criu.pid, commit=False)
        assert _ended(criu)
        assert root.poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_no_page_server_from_a_criu_that_exited_unreaped():
    """run killed, its CRIU exited and not reaped yet (a zombie lists no
    socket, and raises nothing): the hook's child must not wait out its
    minute for a page server (the soak found it left behind)."""
    criu = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while psutil.Process(criu.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        assert hook.page_server_port(criu.pid, timeout=30) is None
        assert time.monotonic() - t0 < 5
    finally:
        criu.wait()
