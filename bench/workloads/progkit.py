"""What the bench's workload programs share (they run with the system python3,
standard library only, and import this from their own directory): their
loop's timeline, pacing, and JSON-line reports."""

import json
import os
import time

SYSTEM_PYTHON = "/usr/bin/python3"  # not the venv's: the programs need nothing of it
BUCKET_S = 0.1  # as base.BUCKET_S: operations per 100 ms
MAX_BUCKETS = 36000  # one hour of timeline


class Timeline:
    """Operations per BUCKET_S on CLOCK_REALTIME (time.time(): CRIU restores
    into a time namespace whose monotonic clock hides the migration), and
    the longest pause between two operations."""

    def __init__(self):
        self.start = None
        self.buckets = []
        self.ops = 0
        self.last = None
        self.max_gap = 0.0
        self.max_gap_end = None

    def tick(self, now):
        if self.start is None:
            self.start = now
        if self.last is not None and now - self.last > self.max_gap:
            self.max_gap, self.max_gap_end = now - self.last, now
        self.last = now
        self.ops += 1
        b = int((now - self.start) / BUCKET_S)
        if b < MAX_BUCKETS:
            if b >= len(self.buckets):
                self.buckets.extend([0] * (b + 1 - len(self.buckets)))
            self.buckets[b] += 1

    def report(self):
        return {
            "ops": self.ops,
            "max_gap_ms": self.max_gap * 1000,
            "max_gap_at": self.max_gap_end,
            "timeline": {"start": self.start, "bucket_s": BUCKET_S, "ops": self.buckets},
        }


class Pacer:
    """Sleeps to hold ``rate`` operations/s (0: no pacing); after a pause it
    starts again from now rather than bursting to catch up."""

    def __init__(self, rate):
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.next_at = time.time()

    def restart(self):
        self.next_at = time.time()

    def wait(self, now):
        if not self.period:
            return
        self.next_at += self.period
        if self.next_at < now - 0.1:
            self.next_at = now
        elif self.next_at > now:
            time.sleep(self.next_at - now)


def append_line(path, obj):
    """One write() per line, the file opened and closed each time: no fd of
    it stays open for CRIU to dump."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path):
    """The complete JSON lines of a report file (a line still being
    written waits for the next look)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(raw) for raw in complete.split(b"\n") if raw.strip()]


def python_argv(program):
    """The command line that runs ``program`` (a path): no environment, no
    user site-packages, no .pyc written; not -I, which would drop the
    program's directory (and so this module) from sys.path."""
    return [SYSTEM_PYTHON, "-E", "-s", "-B", str(program)]
