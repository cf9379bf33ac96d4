"""The options of `hybridmig run`, each default written once: the CLI's
flags, Migration and PreCopy read them from here."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    #: pre-copy rounds at most
    max_rounds: int = 30
    #: ms: pre-copy stops once the last transfer is estimated to fit
    target_downtime_ms: float = 300.0
    #: bytes/s for pre-copy (0: no limit)
    bandwidth_limit: int = 0
    #: pre-copy slows down while the tree gets less than this share of the
    #: CPU it asks for (source/pacing.py; 0: never). A CPU-bound writer's
    #: pace during round 0 followed its share within about 0.1, and issue 16
    #: asks for 0.8 of its pace (docs/bench-wire.md)
    keep_cpu: float = 0.85
    #: throttle a tree whose rounds do not converge (source/converge.py);
    #: None: only with --switchover precopy (auto switches to post-copy instead)
    auto_converge: bool | None = None
    #: precopy (rounds, then everything frozen), postcopy (after
    #: postcopy_after rounds the copy resumes and pulls the rest), auto
    #: (pre-copy while rounds shrink, post-copy once they stop). auto: at
    #: 500 pages/s it is pre-copy (no remote fault, the same blackout); at
    #: 20000 pages/s over 1 Gbit/s it pauses the process less than pre-copy
    #: and keeps it near its pace after the resume, where pre-copy throttles
    #: it for tens of seconds (docs/results.md, "The fault channel").
    #: A container (run --container) migrates with precopy.
    switchover: str = "auto"
    #: rounds before a --switchover postcopy resumes the copy (round 0
    #: included); below 1, the share of round 0 sent before it (0: none)
    postcopy_after: float = 1
    #: seconds for the dump, for the restore, and for any silence of the destination
    timeout: float = 120.0
    #: pages travel lz4-compressed
    compress: bool = True
    #: page streams of the pre-copy rounds; None: default_streams()
    streams: int | None = None


DEFAULTS = RunOptions()
#: the most page streams `run --streams` asks for (serve refuses more: destination/streams.py)
MAX_STREAMS = 8


def default_streams(cpus: int) -> int:
    """--streams unless told: 1 below 4 CPUs (on 2 vCPUs the extra threads
    cost more than they brought: docs/bench-wire.md), else half the CPUs, at
    most 4 (the workload keeps the rest)."""
    return 1 if cpus < 4 else min(4, cpus // 2)


SWITCHOVERS = ("precopy", "postcopy", "auto")
