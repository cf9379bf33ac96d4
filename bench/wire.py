"""Benchmark: the sealed wire (AES-256-GCM, the default) against
--insecure-plaintext, in round 0 of real migrations over an unshaped veth.

    .venv/bin/python -m bench.wire [--size-mb 512] [--pairs 3]

Each pair migrates a fresh memwork workload (random pages: lz4 gives up on
them, as on most real memory) once each way, the order alternating from pair
to pair; round 0 sends every page once, so its raw bytes over its duration
is the wire's throughput. Reported: the median of each mode and the median of
the per-pair ratios sealed / plaintext (docs/bench-wire.md)."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from hybridmig.keys import generate_key
from hybridmig.testing.netns import TwoHosts
from hybridmig.testing.workload import Workload, become_subreaper, kill_tree

HYBRIDMIG = os.path.join(os.path.dirname(sys.executable), "hybridmig")
PORT = 7790
MODES = {"sealed": [], "plaintext": ["--insecure-plaintext"]}


def migrate(hosts, key, work, size_mb, mode):
    """One migration; round 0's throughput in MB/s of raw pages."""
    serve_dir = tempfile.mkdtemp(prefix="bw-serve-", dir=work)
    listen = "%s:%d" % (hosts.dst_addr, PORT)
    serve = subprocess.Popen(
        hosts.run_in(hosts.dst)
        + [HYBRIDMIG, "serve", "--listen", listen, "--dir", serve_dir, "--key-file", key, "--once", *MODES[mode]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kills = [psutil.Process(serve.pid)]
    wl = None
    try:
        time.sleep(1.0)  # serve listens (it fails the run below if not)
        wl = Workload.start(size_mb, threads=1, rate=100, netns=hosts.src, timeout=120)
        kills.append(psutil.Process(wl.host_pid))
        cmd = hosts.run_in(hosts.src) + [
            HYBRIDMIG, "run", str(wl.host_pid), "--to", listen, "--key-file", key, "--json", *MODES[mode],
        ]  # fmt: skip
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} migration failed: {proc.stderr[-2000:]}")
        rep = json.loads(proc.stdout)
        if rep.get("restored_pid"):
            kills.append(psutil.Process(rep["restored_pid"]))
        r0 = rep["rounds"][0]
        return r0["bytes_raw"] / r0["duration_s"] / 1e6
    finally:
        if wl is not None:
            wl.stop()
        for p in reversed(kills):
            kill_tree(p)
        shutil.rmtree(serve_dir, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args(argv)
    become_subreaper()  # restored workloads are re-parented to us
    work = tempfile.mkdtemp(prefix="bench-wire-")
    results = {m: [] for m in MODES}
    ratios = []
    try:
        key = os.path.join(work, "key")
        generate_key(key)
        with TwoHosts(prefix="bw") as hosts:  # unshaped
            for i in range(args.pairs):
                order = ["sealed", "plaintext"] if i % 2 == 0 else ["plaintext", "sealed"]
                pair = {m: migrate(hosts, key, work, args.size_mb, m) for m in order}
                for m, v in pair.items():
                    results[m].append(v)
                ratios.append(pair["sealed"] / pair["plaintext"])
                print("pair %d: sealed %.0f MB/s, plaintext %.0f MB/s" % (i, pair["sealed"], pair["plaintext"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "size_mb": args.size_mb,
        "round0_MBps": results,
        "median_MBps": {m: statistics.median(v) for m, v in results.items()},
        "sealed_over_plaintext": ratios,
        "median_ratio": statistics.median(ratios),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
