"""What the research bench needs from a workload.

A bench workload runs in its own PID namespace (so that the restored copy can
take the same pids while the frozen source still exists) inside the source
"host" (a network namespace), keeps doing work in a loop, and can tell
afterwards (1) whether its state survived the migration intact and (2) how
its loop went over time, on CLOCK_REALTIME (CRIU restores a PID namespace
into a time namespace whose CLOCK_MONOTONIC hides the gap).

Life cycle, as the bench drives it:

    wl.start(hosts)          # running in hosts.src, loaded, warmed up
    wl.criu_opts()           # extra `criu dump` options it needs
    wl.before()              # just before the migration starts
    ... a strategy migrates wl.host_pid to hosts.dst ...
    wl.adopt(new_host_pid)   # the restored root, in hosts.dst
    res = wl.finish()        # a Finish: integrity and the loop's timeline
    wl.stop()                # always, also after a failure (idempotent)

When a strategy fails and the source resumes instead, the bench calls
``finish()`` without ``adopt()``: the check then runs on the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUCKET_S = 0.1  # every workload reports its throughput per 100 ms


@dataclass
class Finish:
    """What a workload says after the migration."""

    ok: bool  # state intact (every page, the digest, ...)
    detail: str  # one line for the report, saying what was checked
    max_gap_ms: float  # the longest pause of its loop (CLOCK_REALTIME)
    max_gap_end: float | None  # CLOCK_REALTIME seconds when that pause ended
    timeline_start: float  # CLOCK_REALTIME seconds of the first bucket
    timeline_ops: list = field(default_factory=list)  # operations per BUCKET_S bucket
    unit: str = "ops"  # what one operation is ("page writes", "GETs+SETs", ...)


class BenchWorkload:
    """Base class; see the module docstring for the protocol."""

    kind = "?"
    host_pid: int | None = None

    def __init__(self, size_mb: int):
        self.size_mb = size_mb

    @property
    def label(self) -> str:
        """Short and unique among the configurations of one bench run."""
        return "%s-%dM" % (self.kind, self.size_mb)

    def params(self) -> dict:
        """The parameters, for the JSON results."""
        return {"kind": self.kind, "size_mb": self.size_mb}

    def start(self, hosts) -> None:
        raise NotImplementedError

    def criu_opts(self) -> list:
        return []

    def before(self) -> dict:
        return {}

    def adopt(self, host_pid: int) -> None:
        raise NotImplementedError

    def finish(self) -> Finish:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError
