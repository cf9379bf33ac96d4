"""Benchmark: CRIU's own phases of a lazy dump against the memory size, for
one or more CRIU binaries, on throwaway dumps.

    .venv/bin/python -m bench.dump_phases --criu A,B [--sizes 1024,4096] [--dumps 3] [--out FILE]

Each of A, B is a CRIU binary, with options for its dumps after it if any
("/path/criu --early-vmas"): the same binary may be compared with itself.

For each size, one memwork (1 writer at --rate pages/s, not in a pid
namespace) is dumped --dumps times by each CRIU, the order alternating:
`criu dump --lazy-pages --lazy-pages-in-place -v4` (a CRIU without the
option: plain --lazy-pages), ended by killing CRIU once it has written its
images (the tree resumes: ptrace stops end with their tracer). Phases from
CRIU's timestamps (hybridmig.criu.command.dump_phases), ms; memwork
verifies every page at the end of each size. -v4 costs time: the numbers are
for comparing CRIUs, not blackouts. "frozen" is the sum of the phases
but early_vmas, which runs before the seize. Results: --out (JSON), and
medians printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybridmig.criu.command import dump_phases
from hybridmig.testing.workload import build_memwork

END_OF_IMAGES = "Writing image inventory"


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def start_memwork(size_mb, rate, report):
    proc = subprocess.Popen(
        [build_memwork(), "--size-mb", str(size_mb), "--rate", str(rate), "--report", str(report)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: report.exists() and '"ready"' in report.read_text(), 120, "memwork to be ready")
    time.sleep(1)  # its first pass over the region
    return proc


def has_in_place(criu):
    return "--lazy-pages-in-place" in subprocess.run([criu, "--help"], capture_output=True, text=True).stdout


def one_dump(criu_entry, pid, images, port):
    images.mkdir(parents=True)
    criu, *opts = criu_entry.split()
    extra = ["--lazy-pages-in-place"] if has_in_place(criu) else []
    extra += opts
    cmd = [criu, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4", "--lazy-pages"]
    cmd += ["--address", "127.0.0.1", "--port", str(port), *extra]
    dump = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = images / "dump.log"
    try:
        wait_for(lambda: log.exists() and END_OF_IMAGES in log.read_text(errors="replace"), 120, "the dump")
        time.sleep(0.3)  # the inventory written
    finally:
        dump.kill()
        dump.wait(10)
    return dump_phases(log)


def frozen(phases):
    """ms from the seize to the last image: every phase but the early VMA read."""
    return sum(v for k, v in phases.items() if k != "early_vmas")


def verified(report):
    """The bad pages of memwork's verify (SIGUSR1), summed over its lines."""
    lines = [json.loads(x) for x in report.read_text().splitlines() if '"event":"verify"' in x]
    return sum(x["bad"] for x in lines), len(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criu", required=True, help="comma-separated CRIU binaries")
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--dumps", type=int, default=3, help="dumps per CRIU and size")
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--out", default="bench-dump-phases.json")
    args = ap.parse_args(argv)
    crius = args.criu.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="hm-dp-", dir="/tmp"))
    results = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            report = tmp / f"memwork-{size}.jsonl"
            proc = start_memwork(size, args.rate, report)
            try:
                for rep in range(args.dumps):
                    for criu in crius if rep % 2 == 0 else crius[::-1]:
                        images = tmp / f"dump-{len(results)}"
                        phases = one_dump(criu, proc.pid, images, 27000 + len(results) % 1000)
                        shutil.rmtree(images)
                        results.append({"size_mb": size, "criu": criu, "dump": rep, "phases": phases})
                        print(size, criu, rep, round(frozen(phases), 1), phases, flush=True)
                        time.sleep(0.5)
                os.kill(proc.pid, signal.SIGUSR1)
                wait_for(lambda r=report: verified(r)[1] > 0, 60, "memwork's verify")
                bad = verified(report)[0]
                print(f"{size} MiB: memwork verified, {bad} bad pages", flush=True)
                if bad:
                    return 1
            finally:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    for size in sorted({r["size_mb"] for r in results}):
        for criu in crius:
            runs = [r["phases"] for r in results if r["size_mb"] == size and r["criu"] == criu]
            meds = {k: round(statistics.median(p.get(k, 0) for p in runs), 1) for k in runs[0]} if runs else {}
            total = round(statistics.median(frozen(p) for p in runs), 1) if runs else None
            print(f"{size} MiB {criu}: frozen {total} ms, {meds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
