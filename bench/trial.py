"""One migration of the research bench: the processes a strategy starts on
either "host", their CPU time, the destination's memory, and the clean-up.

Every process is started here, on the source ("src") or the destination
("dst") side, inside that side's network namespace; it is reaped with
wait4() to get its CPU time, and whatever is still running when the trial
ends is killed by pid with its descendants.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil

from hybridmig.testing.workload import kill_tree


class StrategyError(RuntimeError):
    """A strategy could not migrate; the message says which step and why."""


def log_tail(path: Path, lines: int = 6) -> str:
    """The error lines of a log, else its last lines, joined on one line."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log {path})"
    errs = [line for line in text if "Error" in line or "error" in line][:4]
    return " | ".join(line.strip() for line in (errs or text[-lines:]))


class DestinationMemory(threading.Thread):
    """Samples, every 50 ms, the resident memory of the destination's tool
    processes (and their descendants still in our pid namespace: the tasks
    CRIU is restoring belong to the workload once they run in theirs)."""

    def __init__(self, roots):
        super().__init__(daemon=True)
        self.roots, self.peak = roots, 0
        self._done = threading.Event()
        self._own_pidns = os.stat("/proc/self/ns/pid").st_ino

    def _ours(self, p):
        try:
            return os.stat("/proc/%d/ns/pid" % p.pid).st_ino == self._own_pidns
        except OSError:
            return False

    def run(self):
        while not self._done.wait(0.05):
            total = 0
            for pid in list(self.roots):
                try:
                    root = psutil.Process(pid)
                    procs = [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for p in procs:
                    try:
                        if self._ours(p):
                            total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            self.peak = max(self.peak, total)

    def stop(self):
        self._done.set()
        self.join(5)


class Trial:
    """Where a strategy runs: ``hosts`` (engine.netns.TwoHosts), ``work``
    (a temp dir of this trial), ``logs`` (kept), ``timeout`` for each step."""

    def __init__(self, hosts, work: Path, logs: Path, timeout: float, workload):
        self.hosts, self.work, self.logs, self.timeout = hosts, work, logs, timeout
        self.workload = workload
        self.cpu_s = {"src": 0.0, "dst": 0.0}
        self.restored: list[int] = []  # host pids of restored roots (criu restore -d detaches them)
        self._live: list[tuple[str, subprocess.Popen]] = []
        self.dst_memory = DestinationMemory([])
        self.dst_memory.start()

    def ns(self, side: str) -> str:
        return self.hosts.src if side == "src" else self.hosts.dst

    def spawn(self, side: str, argv: list, log_name: str, **kw) -> subprocess.Popen:
        """Start ``argv`` in ``side``'s namespace, output to logs/LOG_NAME."""
        with open(self.logs / log_name, "ab") as log:
            proc = subprocess.Popen(
                self.hosts.run_in(self.ns(side)) + [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=kw.pop("stdout", log),
                stderr=log,
                **kw,
            )
        self._live.append((side, proc))
        if side == "dst":
            self.dst_memory.roots.append(proc.pid)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float | None = None, what: str = "") -> int:
        """Reap ``proc`` (wait4: its CPU time goes to its side); raise
        StrategyError when it runs longer than ``timeout``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        side = next(s for s, p in self._live if p is proc)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                kill_tree(proc.pid)
                raise StrategyError(f"{what or proc.args[2:4]} did not finish within {timeout or self.timeout:.0f} s")
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s[side] += usage.ru_utime + usage.ru_stime
        self._live = [(s, p) for s, p in self._live if p is not proc]
        return proc.returncode

    def run(self, side: str, argv: list, log_name: str, what: str, timeout: float | None = None, criu_log=None) -> None:
        """spawn + wait; a non-zero exit is a StrategyError naming ``what``
        with the errors or last lines of ``criu_log`` (CRIU's own log file),
        else of the output in logs/LOG_NAME."""
        proc = self.spawn(side, argv, log_name)
        rc = self.wait(proc, timeout, what)
        if rc != 0:
            raise StrategyError("%s failed (exit %d): %s" % (what, rc, log_tail(criu_log or self.logs / log_name)))

    def discard_restored(self) -> None:
        """Kill, by pid, the restored copies of a strategy that failed after
        restoring: nobody adopts them, and `criu restore -d` left them to us."""
        for pid in self.restored:
            kill_tree(pid)
        self.restored = []

    def close(self) -> None:
        """Kill what is still running (by pid, with descendants) and reap it."""
        for _side, proc in list(self._live):
            kill_tree(proc.pid)
            try:
                self.wait(proc, 10, "clean-up")
            except (StrategyError, ChildProcessError):
                pass
        self._live = []
        self.dst_memory.stop()
