"""The self-verifying memory workload (src/hybridmig/testing/memwork.c) for the bench."""

from __future__ import annotations

from hybridmig.testing.workload import Workload

from .base import BenchWorkload, Finish


class Memwork(BenchWorkload):
    """``size_mb`` of private memory rewritten at ``rate`` pages/s by each of
    ``threads`` writers, over the first ``hot`` percent of the region; every
    page is checked after the migration."""

    kind = "memwork"

    def __init__(self, size_mb: int, rate: float = 500, hot: float = 100, threads: int = 1):
        super().__init__(size_mb)
        self.rate, self.hot, self.threads = rate, hot, threads
        self._wl = None
        self._source = None

    @property
    def label(self) -> str:
        return "memwork-%dM-r%g%s" % (self.size_mb, self.rate, "" if self.hot == 100 else f"-hot{self.hot:g}")

    def params(self) -> dict:
        return {**super().params(), "rate": self.rate, "hot": self.hot, "threads": self.threads}

    def start(self, hosts) -> None:
        self._wl = Workload.start(
            self.size_mb,
            threads=self.threads,
            rate=self.rate,
            hot=self.hot,
            netns=hosts.src,
            timeout=120 + self.size_mb / 20,
        )
        self.host_pid = self._wl.host_pid

    def adopt(self, host_pid: int) -> None:
        # The source tree is gone once the migration committed; its report
        # file (outside the namespaces) carries on with the restored tree.
        self._source = self._wl
        self._source.wait_gone(30)
        self._wl = Workload.adopt(host_pid, report=self._source)
        self.host_pid = host_pid

    def finish(self) -> Finish:
        reports = self._wl.verify(timeout=120 + self.size_mb / 20)
        bad = sum(r["bad"] + r.get("zero_pages_bad", 0) for r in reports)
        pages = sum(r["pages"] for r in reports)
        worst = max(reports, key=lambda r: r["max_gap_ms"])
        tl = worst["timeline"]
        return Finish(
            ok=bad == 0,
            detail="%d pages verified, %d bad" % (pages, bad),
            max_gap_ms=worst["max_gap_ms"],
            max_gap_end=worst.get("max_gap_at"),
            timeline_start=tl["start"],
            timeline_ops=list(tl["ops"]),
            unit="page writes",
        )

    def stop(self) -> None:
        for wl in (self._wl, self._source):
            if wl is not None:
                wl.stop()
        self._wl = self._source = None
