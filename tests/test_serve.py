"""serve's guard around its criu restore: the command dies with serve, and
does not start at all under a parent other than the serve that built it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from hybridmig.destination.serve import dies_with_me

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/bin/setpriv") and not os.path.exists("/bin/setpriv"), reason="needs setpriv (util-linux)"
)


def test_runs_under_its_own_parent(tmp_path):
    marker = tmp_path / "ran"
    proc = subprocess.run(dies_with_me(["touch", str(marker)]), timeout=10)
    assert proc.returncode == 0 and marker.exists()


def test_does_not_start_under_another_parent(tmp_path):
    """What a serve that died before setpriv set the parent-death signal
    leaves: the command, reparented, whose parent is not the one it names."""
    marker = tmp_path / "ran"
    cmd = dies_with_me(["touch", str(marker)])  # names this test's pid
    spawner = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    proc = subprocess.run([sys.executable, "-c", spawner, *cmd], timeout=10)
    assert proc.returncode == 111 and not marker.exists()


def test_dies_with_its_parent(tmp_path):
    """A parent SIGKILLed while the command runs takes the command with it."""
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import subprocess, sys
        from hybridmig.destination.serve import dies_with_me
        script = "echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 60"
        subprocess.run(dies_with_me(["sh", "-c", script]))
    """),
        ]
    )
    child = None
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            assert time.monotonic() < deadline and parent.poll() is None, "the command did not start"
            time.sleep(0.01)
        child = psutil.Process(int(pidfile.read_text()))
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        child.wait(5)  # psutil.TimeoutExpired if it outlives its parent
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and child.is_running():
            child.kill()
