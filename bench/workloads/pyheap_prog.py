"""A large Python heap that keeps changing, and checks itself on SIGUSR1.

Run with the system python3 (standard library only) by bench/workloads/pyheap.py,
as PID 1 of its own PID namespace.  It builds a dict of ``--items`` objects
of four kinds (a 2 KiB bytearray twice, a list of ints, a small object with
a str and a tuple), each a function of (index, generation), then updates
random items (a seeded PRNG) at ``--rate`` per second: the item's generation
goes up by one and the item is rewritten for it.

On SIGUSR1 it checks every item against its generation and appends a
"verify" JSON line to ``--report``; "ready" once the heap is built.  The
report file is opened and closed for each line (one write() each), so no
fd of it stays open across a checkpoint.  Throughput is counted per 100 ms
bucket on CLOCK_REALTIME, with the longest pause between two updates.
"""

import argparse
import gc
import os
import random
import signal
import struct
import sys
import time
import traceback
from array import array

from progkit import Pacer, Timeline, append_line

BLOB_MAGIC = b"PYHEAP01"  # first bytes of every blob, to find one in the process's memory
BLOB_SIZE = 2048
LIST_LEN = 16
GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


class Record:
    __slots__ = ("index", "gen", "name", "pair")

    def __init__(self, index, gen):
        self.index, self.gen = index, gen
        self.name = "item-%d/gen-%d" % (index, gen)
        self.pair = (index * 3 + 1, gen * 5 + 2)


def blob(index, gen):
    """BLOB_MAGIC, index, generation, then a filler word of both."""
    head = BLOB_MAGIC + struct.pack("<QQ", index, gen)
    fill = struct.pack("<Q", (index * GOLDEN + gen) & MASK)
    return head + fill * ((BLOB_SIZE - len(head)) // 8)


def ints(index, gen):
    return [index * 1000003 + gen * 7919 + k for k in range(LIST_LEN)]


def kind(index):
    return ("blob", "blob", "list", "record")[index % 4]


def make(index, gen):
    k = kind(index)
    if k == "blob":
        return bytearray(blob(index, gen))
    if k == "list":
        return ints(index, gen)
    return Record(index, gen)


def rewrite(heap, index, gen):
    """Rewrite the item in place where it can be (dirtying its memory)."""
    k = kind(index)
    if k == "blob":
        heap[index][:] = blob(index, gen)
    elif k == "list":
        heap[index][:] = ints(index, gen)
    else:
        heap[index] = Record(index, gen)


def item_ok(heap, index, gen):
    k = kind(index)
    item = heap.get(index)
    if k == "blob":
        return isinstance(item, bytearray) and item == blob(index, gen)
    if k == "list":
        return isinstance(item, list) and item == ints(index, gen)
    want = Record(index, gen)
    return (
        isinstance(item, Record)
        and item.index == index
        and item.gen == gen
        and item.name == want.name
        and item.pair == want.pair
    )


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1000, help="updates/s, 0: unlimited")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()

    want_verify = []
    signal.signal(signal.SIGUSR1, lambda s, f: want_verify.append(1))
    signal.signal(signal.SIGTERM, lambda s, f: os._exit(0))  # PID 1 ignores it otherwise

    t0 = time.time()
    heap = {i: make(i, 0) for i in range(args.items)}
    gens = array("Q", bytes(8 * args.items))
    # The heap never becomes garbage: keep the cyclic collector from walking
    # it in every full collection (pauses that would look like loop gaps).
    gc.freeze()
    append_line(
        args.report,
        {"event": "ready", "pid": os.getpid(), "items": args.items, "build_s": time.time() - t0, "rss": rss_bytes()},
    )

    rng = random.Random(args.seed)
    loop = Timeline()
    pacer = Pacer(args.rate)
    while True:
        if want_verify:
            del want_verify[:]
            t = time.time()
            bad = [i for i in range(args.items) if not item_ok(heap, i, gens[i])]
            append_line(
                args.report,
                {
                    "event": "verify",
                    "pid": os.getpid(),
                    "items": args.items,
                    "bad": len(bad),
                    "first_bad": bad[:10],
                    "verify_s": time.time() - t,
                    "rss": rss_bytes(),
                    **loop.report(),
                },
            )
            loop.last = None  # the check's own pause is not a gap of the loop
            pacer.restart()
        i = rng.randrange(args.items)
        gens[i] += 1
        rewrite(heap, i, gens[i])
        now = time.time()
        loop.tick(now)
        pacer.wait(now)


def main_reporting_errors():
    # Its stdout and stderr are /dev/null: a log file would be written to
    # by unshare when the dump kills its child, and CRIU refuses to restore
    # an open file whose size changed.  A failure goes to the report.
    try:
        main()
    except Exception:
        report = sys.argv[sys.argv.index("--report") + 1] if "--report" in sys.argv else None
        if report:
            append_line(report, {"event": "error", "pid": os.getpid(), "traceback": traceback.format_exc()})
        raise


if __name__ == "__main__":
    sys.exit(main_reporting_errors())
