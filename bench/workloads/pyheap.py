"""A Python program with a heap of ``size_mb`` MiB of many small objects
(pyheap_prog.py) for the bench: updated at a fixed rate, checked item by
item after the migration."""

from __future__ import annotations

import shutil
import signal
import struct
import tempfile
import time
from pathlib import Path

import psutil

from hybridmig.testing.workload import _anon_rw_mappings as anon_rw_mappings
from hybridmig.testing.workload import kill_tree

from .base import BenchWorkload, Finish
from .nsproc import NsProc, adopt_root, running
from .progkit import python_argv, read_lines

PROGRAM = Path(__file__).with_name("pyheap_prog.py")
ITEM_BYTES = 1500  # resident bytes per item, measured (2 blobs, a list, a record per 4 items)
BLOB_MAGIC = b"PYHEAP01"  # as in pyheap_prog.py


class PyHeapError(RuntimeError):
    """The program did not start, died, or did not answer in time."""


class PyHeap(BenchWorkload):
    """``size_mb`` MiB of Python objects, ``rate`` random items rewritten
    per second (0: as fast as it can), PRNG seeded with ``seed``."""

    kind = "pyheap"

    def __init__(self, size_mb: int, rate: float = 1000, seed: int = 1):
        super().__init__(size_mb)
        self.rate, self.seed = rate, seed
        self.items = max(4, size_mb * (1 << 20) // ITEM_BYTES)
        self.ready: dict | None = None
        self._dir: str | None = None
        self._proc: NsProc | None = None
        self._root: psutil.Process | None = None  # the program running now

    @property
    def label(self) -> str:
        return "pyheap-%dM-r%g" % (self.size_mb, self.rate)

    def params(self) -> dict:
        return {**super().params(), "rate": self.rate, "items": self.items, "rss": self.ready and self.ready["rss"]}

    @property
    def report_path(self) -> Path:
        return Path(self._dir, "report.jsonl")

    # --- life cycle -------------------------------------------------------------
    def start(self, hosts) -> None:
        self._dir = tempfile.mkdtemp(prefix="hm-pyheap-")
        argv = [
            *python_argv(PROGRAM),
            "--items",
            str(self.items),
            "--rate",
            repr(float(self.rate)),
            "--seed",
            str(self.seed),
            "--report",
            str(self.report_path),
        ]
        self._proc = NsProc(argv, hosts.src)  # errors come as "error" lines of the report
        self._root = self._proc.root
        self.host_pid = self._proc.host_pid
        self.ready = self._wait_event("ready", 0, 60 + self.size_mb / 5)

    def adopt(self, host_pid: int) -> None:
        self._root = adopt_root(host_pid)  # first: stop() must know it whatever happens next
        self.host_pid = host_pid
        if self._proc is not None and not self._proc.wait_gone(30):
            raise PyHeapError("source pyheap %d still alive 30 s after the migration" % self._proc.host_pid)

    def verify(self) -> dict:
        """The program checks every item; its "verify" report."""
        seen = len(self._lines())
        self._root.send_signal(signal.SIGUSR1)
        return self._wait_event("verify", seen, 60 + self.size_mb / 5)

    def finish(self) -> Finish:
        r = self.verify()
        tl = r["timeline"]
        detail = "%d items verified, %d bad%s" % (
            r["items"],
            r["bad"],
            " (first {})".format(r["first_bad"]) if r["bad"] else "",
        )
        return Finish(
            ok=r["bad"] == 0,
            detail=detail,
            max_gap_ms=r["max_gap_ms"],
            max_gap_end=r["max_gap_at"],
            timeline_start=tl["start"],
            timeline_ops=list(tl["ops"]),
            unit="object updates",
        )

    def stop(self) -> None:
        try:
            if self._root is not None:
                kill_tree(self._root)
            if self._proc is not None:
                self._proc.stop()
        finally:
            self._root = self._proc = None
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    # --- for tests: corrupt an item behind the program's back ---------------------
    def poke_blob(self, index: int, offset: int = 100, data: bytes = b"\xff") -> int:
        """Overwrite ``data`` at ``offset`` into the blob of item ``index``
        (index % 4 in (0, 1)) through /proc/PID/mem; returns how many copies
        were hit: stale copies (freed buffers of earlier generations) look
        alike, so every one is hit.  The generation is left as it is: the
        program would repair the item if it updated it before the check."""
        if index % 4 not in (0, 1):
            raise ValueError("item %d is not a blob (index %% 4 must be 0 or 1)" % index)
        if offset < 24:
            raise ValueError("offset %d would hit the blob's header, by which it is found" % offset)
        needle = BLOB_MAGIC + struct.pack("<Q", index)
        hits = []
        chunk = 64 << 20
        with open("/proc/%d/mem" % self.host_pid, "r+b", buffering=0) as mem:
            for start, end in anon_rw_mappings(self.host_pid):
                for base in range(start, end, chunk):
                    mem.seek(base)
                    mem_data = mem.read(min(chunk + len(needle), end - base))
                    at = mem_data.find(needle)
                    while 0 <= at < chunk:
                        hits.append(base + at)
                        at = mem_data.find(needle, at + 1)
            for addr in hits:
                mem.seek(addr + offset)
                mem.write(data)
        if not hits:
            raise PyHeapError("blob of item %d not found in the memory of %d" % (index, self.host_pid))
        return len(hits)

    # --- reports -----------------------------------------------------------------
    def _lines(self) -> list:
        return read_lines(self.report_path)

    def _wait_event(self, event: str, since: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            gone = not running(self._root)  # before reading: its last line may come with its end
            for r in self._lines()[since:]:
                if r["event"] == event:
                    return r
                if r["event"] == "error":
                    raise PyHeapError("pyheap {} failed: {}".format(self.host_pid, r["traceback"]))
            if gone:
                raise PyHeapError(f"pyheap {self.host_pid} exited while waiting for {event!r}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise PyHeapError(f"pyheap {self.host_pid}: no {event!r} within {timeout}s")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        errors = [r["traceback"] for r in self._lines() if r["event"] == "error"]
        return errors[-1] if errors else "(no error reported)"
