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
    #: throttle a tree whose rounds do not converge (source/converge.py)
    auto_converge: bool = True
    #: seconds for the dump, for the restore, and for any silence of the destination
    timeout: float = 120.0
    #: pages travel lz4-compressed
    compress: bool = True


DEFAULTS = RunOptions()
