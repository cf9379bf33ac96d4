"""Run `criu restore --lazy-pages` served by `hybridmig lazy-pages`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from criu_util import criu_restore

# the console script installed beside the interpreter running the tests
HYBRIDMIG_BIN = os.path.join(os.path.dirname(sys.executable), "hybridmig")
HYBRIDMIG = [HYBRIDMIG_BIN]


def wait_for(predicate, timeout, what, interval=0.02):
    """Poll predicate until it returns something true (returned), or time out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class LazyDaemon:
    """`hybridmig lazy-pages` as a child process, stopped by pid on exit."""

    def __init__(self, images, *args, work_dir=None, log_dir=None):
        self.images = Path(images)
        self.work_dir = Path(work_dir or images)
        log_dir = Path(log_dir or self.work_dir)
        self.stats_path = log_dir / "lazy-stats.json"
        self.log_path = log_dir / "lazy-daemon.log"
        cmd = HYBRIDMIG + [
            "lazy-pages",
            "-D",
            str(images),
            "-W",
            str(self.work_dir),
            "--stats-json",
            str(self.stats_path),
            "--timeout",
            "60",
            *args,
        ]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout=30):
        sock = self.work_dir / "lazy-pages.socket"
        wait_for(lambda: sock.exists() or self.proc.poll() is not None, timeout, "lazy-pages.socket")
        return self.proc.poll() is None

    def wait(self, timeout=120):
        return self.proc.wait(timeout=timeout)

    def output(self):
        self.log.flush()
        return self.log_path.read_text()

    def stats(self):
        return json.loads(self.stats_path.read_text())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lazy_restore(images, *daemon_args, timeout=120):
    """Restore `images` lazily; returns (root host pid, daemon). The daemon may still be installing."""
    daemon = LazyDaemon(images, *daemon_args)
    try:
        assert daemon.wait_listening(), "daemon exited early:\n" + daemon.output()
        pid = criu_restore(images, extra=["--lazy-pages"], timeout=timeout)
    except BaseException:
        daemon.close()
        raise
    return pid, daemon


def restored_alive(report_path):
    """Host pids of live processes started with this report path (for
    asserting that a failed restore left nothing running)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(report_path).encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def lost_memory(wl):
    """What any copy of wl (memwork --check-writes) logged about memory it
    was never given: a page that no longer held what it last wrote there
    (zeros, for a page owed and never installed), or a crash (a zeroed
    pointer)."""
    return wl.reports("corrupt") + wl.reports("crash")
