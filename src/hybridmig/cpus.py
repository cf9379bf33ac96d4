"""Whether the data path's extra threads pay on this machine: a reader
thread on the source (the next frame read while this one is sealed and
sent) and an inbound thread on the destination (the next frame received
and opened while this one is stored). They overlap work only where a core
is free for them: on this project's 2-CPU test machine, with both ends and
the workload on it, they cost more than they overlapped (docs/bench-wire.md:
sealed round 0 at 0.69 of its pace without them, 0.1-0.3 CPU s/GiB more).
HYBRIDMIG_DATA_THREADS=1 (or 0) decides instead: the tests and the bench."""

import os

MIN_CPUS = 4  # CPUs this process may run on for the threads to be used


def data_threads() -> bool:
    forced = os.environ.get("HYBRIDMIG_DATA_THREADS")
    if forced in ("0", "1"):
        return forced == "1"
    return len(os.sched_getaffinity(0)) >= MIN_CPUS
