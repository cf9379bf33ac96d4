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
    #: throttle a tree whose rounds do not converge (source/converge.py);
    #: None: only with --switchover precopy (auto switches to post-copy instead)
    auto_converge: bool | None = None
    #: precopy (rounds, then everything frozen), postcopy (after
    #: postcopy_after rounds the copy resumes and pulls the rest), auto
    #: (pre-copy while rounds shrink, post-copy once they stop). precopy
    #: until post-copy's pauses are as short: 1 GiB at 20000 pages/s over
    #: 1 Gbit/s, the copy paused 685 ms against pre-copy's 323 ms
    #: (docs/results.md)
    switchover: str = "precopy"
    #: rounds before a --switchover postcopy resumes the copy (round 0 included)
    postcopy_after: int = 1
    #: seconds for the dump, for the restore, and for any silence of the destination
    timeout: float = 120.0
    #: pages travel lz4-compressed
    compress: bool = True


DEFAULTS = RunOptions()
SWITCHOVERS = ("precopy", "postcopy", "auto")
