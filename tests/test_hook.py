"""The CRIU hook: its verdicts, asked of a `run` that answers, refuses,
says nothing or is gone, for both programs (native/hook/criu_hook.c and
hook.py, which stands in where it is not built); a stale compiled hook
refused; and its last resort: when CRIU's page server cannot be reached to
end the session, the hook's child does what CRIU would have done. Real
migrations (test_migrate, test_commit_in_doubt) run the post-dump verdicts
through real CRIU."""

import os
import shutil
import socket
import subprocess
import threading
import time

import psutil
import pytest

from hybridmig import doctor
from hybridmig.criu import command, hook


@pytest.fixture(params=["compiled", "hook.py"])
def program(request):
    if request.param == "hook.py":
        return ""
    built = command.hook_program()
    assert built, "the compiled hook is not built or stale (make setup builds it)"
    return built


class FakeRun:
    """run's end of the hook socket: hears one question, answers `verdict`
    (None: closes without one)."""

    def __init__(self, path, verdict):
        self.asked = None
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.server.settimeout(10)
        self.thread = threading.Thread(target=self._answer, args=(verdict,))
        self.thread.start()

    def _answer(self, verdict):
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            self.asked = conn.recv(64)
            if verdict is not None:
                conn.sendall(verdict)

    def close(self):
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes an accept that nothing came to
        except OSError:
            pass
        self.server.close()
        self.thread.join(15)


def run_hook(tmp_path, program, action, verdict=b"0", in_script=True, listening=True):
    """CRIU's way: `sh -c SCRIPT` with CRTOOLS_SCRIPT_ACTION. Returns its exit
    status, what run was asked and its stderr."""
    sock = str(tmp_path / "run.sock")
    script = command.write_hook(str(tmp_path), sock if in_script else None, program=program)
    env = dict(os.environ, CRTOOLS_SCRIPT_ACTION=action)
    env.pop(hook.HOOK_ENV, None)
    if not in_script:
        env[hook.HOOK_ENV] = sock
    run = FakeRun(sock, verdict) if listening else None
    try:
        proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    finally:
        if run:
            run.close()
    return proc.returncode, run and run.asked, proc.stderr


@pytest.mark.parametrize("in_script", [True, False], ids=["socket-in-script", "socket-in-env"])
@pytest.mark.parametrize("verdict,status", [(b"0", 0), (b"1", 1)])
def test_pre_dump_verdict(tmp_path, program, verdict, status, in_script):
    rc, asked, err = run_hook(tmp_path, program, "pre-dump", verdict, in_script)
    assert (rc, asked) == (status, b"pre-dump\n"), err


def test_pre_dump_with_run_gone_gives_up(tmp_path, program):
    rc, asked, err = run_hook(tmp_path, program, "pre-dump", listening=False)
    assert rc == 1 and "cannot reach hybridmig run" in err, err


def test_pre_dump_without_a_verdict_gives_up(tmp_path, program):
    rc, asked, err = run_hook(tmp_path, program, "pre-dump", verdict=None)
    assert rc == 1 and asked == b"pre-dump\n", err


def test_post_dump_in_doubt_lets_criu_wait(tmp_path, program):
    """Verdict 2: exit 0 and start no child (CRIU waits for `settle`)."""
    rc, asked, err = run_hook(tmp_path, program, "post-dump", verdict=hook.IN_DOUBT)
    assert (rc, asked) == (0, b"post-dump\n"), err


def test_other_actions_ask_nothing(tmp_path, program):
    rc, asked, err = run_hook(tmp_path, program, "post-restore")
    assert (rc, asked) == (0, None), err


def test_a_stale_compiled_hook_is_refused(tmp_path, monkeypatch):
    """A program not built from native/hook/criu_hook.c as it is: hook.py
    stands in, and `hybridmig doctor` says so."""
    stale = tmp_path / "_hook"
    shutil.copy(command.HOOK_PROGRAM, stale)
    data = stale.read_bytes()
    stale.write_bytes(data.replace(b"hybridmig-hook-sha256:", b"hybridmig-hook-sha256:0"))
    monkeypatch.setattr(command, "HOOK_PROGRAM", str(stale))
    assert command.hook_program() is None
    assert open(command.write_hook(str(tmp_path))).readline().endswith(" -S\n")
    check = doctor.check_criu_hook()
    assert not check.ok and "make setup" in check.detail, check


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
