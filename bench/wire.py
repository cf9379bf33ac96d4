"""Benchmark: the sealed wire (AES-256-GCM, the default) against
--insecure-plaintext and against a raw TCP `sendall` loop, in round 0 of
real migrations over an unshaped veth.

    .venv/bin/python -m bench.wire [--size-mb 512] [--pairs 3] [--profile DIR]
        [--modes sealed,plaintext,tcp] [--before VENV_BIN] [--rate 1gbit]
        [--streams 1,2] [--limits 0,150M] [--keeps 0,0.9] [--pace] [--compressible]

Each pair migrates a fresh memwork workload (random pages: lz4 gives up on
them, as on much real memory) once each way and runs the raw loop once, the
order rotating from pair to pair; round 0 sends every page once, so its raw
bytes over its duration is the wire's throughput. The raw loop is two
Python processes, one per namespace, moving the same number of bytes in
1 MiB `sendall`s into `recv_into`: what the veth carries for a Python
program that does nothing else; `tcpmem` (a mode) receives into fresh
memory instead, as a destination's store does: on a VM whose host backs
guest memory on first touch, that is a ceiling of its own. Reported: the median of each mode, the
median of the per-pair ratios, and round 0's breakdown (run --json).
`--profile DIR` records `run` and `serve` with py-spy (raw folded stacks,
one file per process) and prints where round 0's CPU samples went
(docs/bench-wire.md). `--before DIR`: also the modes of the hybridmig
in DIR (another checkout's .venv/bin), as sealed-before and
plaintext-before, in the same rotation: before and after in one run.
Per GiB of round 0, medians over the pairs: where each end's time went
(the source's from its round stats, the destination's from its
ROUND_ACK: `dest_*`).

`--streams 1,2`: each of sealed and plaintext once per count of page
streams (`run --streams N`, as modes sealed-s1, sealed-s2, ...), in the
same rotation as the raw loop. `--pace`: the workload writes as fast as
it can (one writer over the first 1 % of its memory: those pages stay hot
and travel in the final round) instead of 100 pages/s, and each migration
reports the workload's pace during round 0 over its pace in the 3 s
before `run` started (memwork's 100 ms timeline, read from the restored
copy). `--limits 0,150M`: each mode also once per `--bandwidth-limit`
(modes ...-l0, ...-l150M); `--keeps 0,0.9` the same per `--keep-cpu`
(modes ...-k0, ...-k0.9). `--compressible`: memwork's pages are
compressible instead of random. Each migration records the load average
(`uptime`) at its start, and what the guest reported back to its host
meanwhile (REPORTED_KIB)."""

import argparse
import collections
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
PYSPY = os.path.join(os.path.dirname(sys.executable), "py-spy")
PORT = 7790
MODES = {"sealed": [], "plaintext": ["--insecure-plaintext"]}
PACE_BEFORE_S = 3.0  # --pace: the workload's own pace is measured over this long before run starts

# The raw loop: the receiver prints its MB/s once it got every byte.
# With "fresh" it receives into fresh memory (an untouched mapping of all
# n bytes, as a destination's store is) instead of reusing one buffer.
RECEIVER = """
import mmap, socket, sys, time
n = int(sys.argv[2])
fresh = sys.argv[4] == "fresh"
ls = socket.create_server((sys.argv[1], int(sys.argv[3])))
c, _ = ls.accept()
buf = memoryview(mmap.mmap(-1, n) if fresh else bytearray(1 << 20))
got, t0 = 0, time.monotonic()
while got < n:
    r = c.recv_into(buf[got : got + (1 << 20)] if fresh else buf)
    if not r:
        break
    got += r
print(got / (time.monotonic() - t0) / 1e6)
"""
SENDER = """
import os, socket, sys, time
n = int(sys.argv[2])
for _ in range(100):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[3])))
        break
    except OSError:
        time.sleep(0.05)
data = os.urandom(1 << 20)
for _ in range(n >> 20):
    s.sendall(data)
s.close()
"""


def raw_tcp(hosts, nbytes, streams=1, fresh=False):
    """MB/s of the raw loop over the veth: `streams` connections at once,
    each a sender and a receiver process moving nbytes / streams (the
    total over the wall time from the first byte to the last); `fresh`:
    each receiver writes what it receives into fresh memory."""
    each = nbytes // streams
    recvs = [
        subprocess.Popen(
            hosts.run_in(hosts.dst)
            + [sys.executable, "-c", RECEIVER, hosts.dst_addr, str(each), str(PORT + 1 + i), "fresh" * fresh],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(streams)
    ]
    try:
        senders = [
            subprocess.Popen(
                hosts.run_in(hosts.src) + [sys.executable, "-c", SENDER, hosts.dst_addr, str(each), str(PORT + 1 + i)]
            )
            for i in range(streams)
        ]
        for p in senders:
            if p.wait(timeout=120) != 0:
                raise RuntimeError("the raw TCP sender failed")
        rates = [float(r.communicate(timeout=120)[0]) for r in recvs]
        # each receiver's rate over its own time, from its first accept: the
        # slowest sets the total's pace
        return streams * min(rates)
    finally:
        for r in recvs:
            kill_tree(r.pid)


def _spy(profile, name):
    if not profile:
        return []
    # --nonblocking: sampling does not stop the process (it would slow the wire)
    out = os.path.join(profile, name)
    return [PYSPY, "record", "--format", "raw", "--rate", "250", "--nonblocking", "-o", out, "--"]


def mode_flags(mode):
    """(serve's and run's flags, run's own) of a mode: sealed, plaintext,
    either with -sN (N page streams), -lRATE (--bandwidth-limit RATE),
    -comp (compressible memory: no flag) and/or -before."""
    base, _, keep = mode.removesuffix("-before").removesuffix("-comp").partition("-k")
    base, _, limit = base.partition("-l")
    base, _, streams = base.partition("-s")
    return MODES[base], (
        (["--streams", streams] if streams else [])
        + (["--bandwidth-limit", limit] if limit else [])
        + (["--keep-cpu", keep] if keep else [])
    )


def pace_ratio(verify, started_at, duration_s):
    """The workload's ops/s over [started_at, +duration_s] (round 0) over
    its ops/s in the PACE_BEFORE_S before started_at (memwork's timeline)."""
    tl = verify.get("timeline")
    if not tl:
        return None
    bucket = tl["bucket_ms"] / 1000

    def rate(t0, t1):
        i0, i1 = int((t0 - tl["start"]) / bucket), int((t1 - tl["start"]) / bucket)
        ops = tl["ops"][max(0, i0) : max(0, i1)]
        return sum(ops) / (len(ops) * bucket) if ops else None

    before = rate(started_at - PACE_BEFORE_S, started_at - 0.2)  # (run's start-up: its tracker attaches)
    during = rate(started_at, started_at + duration_s)
    return round(during / before, 3) if before and during is not None else None


# The guest's free page reporting (virtio-balloon): memory freed here is
# handed back to the host, which backs it again on its next first touch,
# at several times the cost of a warm page (docs/bench-wire.md). KiB
# reported so far; None where the kernel has no such counter.
REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def reported_kib():
    try:
        with open(REPORTED_KIB) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def migrate(hosts, key, work, size_mb, mode, profile=None, tag="", before=None, pace=False, compressible=False):
    """One migration; round 0 of its run --json report (with `load`, and
    with --pace `pace`: the workload's). A mode ending in -before runs the
    hybridmig in `before`."""
    exe = os.path.join(before, "hybridmig") if mode.endswith("-before") else HYBRIDMIG
    flags, run_flags = mode_flags(mode)
    serve_dir = tempfile.mkdtemp(prefix="bw-serve-", dir=work)
    listen = "%s:%d" % (hosts.dst_addr, PORT)
    serve = subprocess.Popen(
        hosts.run_in(hosts.dst)
        + _spy(profile, f"serve-{mode}{tag}.txt")
        + [exe, "serve", "--listen", listen, "--dir", serve_dir, "--key-file", key, "--once", *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kills = [psutil.Process(serve.pid)]
    wl = None
    try:
        time.sleep(1.5 if profile else 1.0)  # serve listens (it fails the run below if not)
        if pace:
            wl = Workload.start(
                size_mb, threads=1, rate=0, hot=1, netns=hosts.src, timeout=120, compressible=compressible
            )
            time.sleep(PACE_BEFORE_S + 0.5)  # its own pace first
        else:
            wl = Workload.start(size_mb, threads=1, rate=100, netns=hosts.src, timeout=120, compressible=compressible)
        kills.append(psutil.Process(wl.host_pid))
        load = os.getloadavg()
        reported = reported_kib()
        cmd = hosts.run_in(hosts.src) + _spy(profile, f"run-{mode}{tag}.txt") + [
            exe, "run", str(wl.host_pid), "--to", listen, "--key-file", key, "--json", *flags, *run_flags,
        ]  # fmt: skip
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} migration failed: {proc.stderr[-2000:]}")
        rep, _ = json.JSONDecoder().raw_decode(proc.stdout, proc.stdout.index("{"))  # py-spy may print after it
        r0 = dict(rep["rounds"][0], load=[round(x, 2) for x in load])
        after = reported_kib()
        if reported is not None and after is not None:  # (over the whole of run, its end included)
            r0["host_reported_mib"] = round((after - reported) / 1024)
        if "lz4_probes" in rep:  # (an older hybridmig has none)
            r0["lz4_probes"] = rep["lz4_probes"]
        r0["started_at"] = rep.get("precopy_started_at")  # (epoch s: to cut a system-wide profile to round 0)
        if rep.get("restored_pid"):
            kills.append(psutil.Process(rep["restored_pid"]))
            if pace and "precopy_started_at" in rep:
                new = Workload.adopt(rep["restored_pid"], report=wl)
                r0["pace"] = pace_ratio(new.verify()[0], rep["precopy_started_at"], r0["duration_s"])
        if profile:
            serve.wait(timeout=60)  # py-spy writes its file when serve exits
        return r0
    finally:
        if wl is not None:
            wl.stop()
        for p in reversed(kills):
            kill_tree(p)
        shutil.rmtree(serve_dir, ignore_errors=True)


# Where a CPU sample of round 0 goes: the first of these found in its stack
# (innermost frame first). Source samples count only inside first_round,
# destination samples only inside Session.run's PAGES handling and recv.
STEPS = [
    ("read the target's pages", ("read_run", "read_pages", "read_into", "hm_read_pages")),
    ("lz4 probe and compress", ("lz4_compress", "shrinks", "lz4.block.compress", "compress (")),
    ("seal / open (AES-GCM)", ("_frame_parts", "_recv_sealed", "encrypt", "decrypt")),
    ("MAC (HMAC-SHA256)", ("_mac (", "hmac")),
    ("socket send", ("sendall", "sendmsg", "_send_parts", "_send_frame", "send (")),
    ("socket recv", ("recv_into", "_recv_exact")),
    ("store puts", ("put_pages", "store_pages", "put (")),
    ("page bodies (head, lz4 decompress)", ("encode_pages", "decode_pages", "pages_head", "_flush", "_frame")),
]


def summarize(paths, within):
    """{step: share of round 0's samples} of py-spy raw files (every pair's)."""
    counts = collections.Counter()
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                if not any(w in stack for w in within):
                    continue
                frames = stack.split(";")[::-1]
                step = next((s for fr in frames for s, keys in STEPS if any(k in fr for k in keys)), "other")
                counts[step] += int(n)
    total = sum(counts.values()) or 1
    return {s: round(c / total, 3) for s, c in counts.most_common()} | {"samples": total}


# round 0's times, per GiB of its raw bytes (the dest_ ones: the destination's)
PER_GIB = ["duration_s", "read_s", "encode_s", "seal_s", "send_s", "ack_s", "cpu_s", "streams_s"]
PER_GIB_DEST = ["dest_recv_s", "dest_open_s", "dest_store_s", "dest_cpu_s"]


def per_gib(r0s):
    """{time: median s/GiB} of round-0 reports."""
    out = {}
    for k in PER_GIB + PER_GIB_DEST:
        vals = [r[k] * (1 << 30) / r["bytes_raw"] for r in r0s if k in r and r["bytes_raw"]]
        if vals:
            out[k] = round(statistics.median(vals), 3)
    return out


def describe(mode, rate, r0s):
    """A pair's line for one mode: its round 0's rate, and for a migration
    what the host took back meanwhile (REPORTED_KIB) and the probe's choice."""
    text = "%s %.0f MB/s" % (mode, rate)
    r0 = r0s[-1] if r0s else {}
    extra = []
    if "host_reported_mib" in r0:
        extra.append("host took %d MiB" % r0["host_reported_mib"])
    if r0.get("lz4_probes"):
        extra.append("lz4" if r0["lz4_probes"][0]["lz4"] else "raw")
    return text + (" (%s)" % ", ".join(extra) if extra else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--profile", metavar="DIR", help="record run and serve with py-spy into DIR")
    ap.add_argument("--modes", default="sealed,plaintext,tcp", help="of sealed, plaintext, tcp, tcpN, tcpmem")
    ap.add_argument("--before", metavar="DIR", help="a bin directory with another hybridmig to compare")
    ap.add_argument("--rate", help="shape the veth with tbf at this rate (tc's syntax: 1gbit); default unshaped")
    ap.add_argument("--streams", help="counts of page streams, e.g. 1,2: sealed and plaintext once with each")
    ap.add_argument("--limits", help="--bandwidth-limit values, e.g. 0,150M: each mode once with each")
    ap.add_argument("--compressible", action="store_true", help="memory lz4 shrinks (memwork --compressible)")
    ap.add_argument("--keeps", help="--keep-cpu values, e.g. 0,0.9: each mode once with each")
    ap.add_argument("--memories", help="random,compressible: each mode once with each (mode-comp: compressible)")
    ap.add_argument("--pace", action="store_true", help="an unthrottled writer; its pace during round 0 (see above)")
    args = ap.parse_args(argv)
    become_subreaper()  # restored workloads are re-parented to us
    work = tempfile.mkdtemp(prefix="bench-wire-")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    modes = args.modes.split(",")  # tcpN: N raw streams at once
    if args.streams:
        modes = [f"{m}-s{n}" if m in MODES else m for m in modes for n in args.streams.split(",")]
        modes = list(dict.fromkeys(modes))  # (tcp once)
    if args.limits:
        modes = [f"{m}-l{x}" if not m.startswith("tcp") else m for m in modes for x in args.limits.split(",")]
        modes = list(dict.fromkeys(modes))
    if args.keeps:
        modes = [f"{m}-k{x}" if not m.startswith("tcp") else m for m in modes for x in args.keeps.split(",")]
        modes = list(dict.fromkeys(modes))
    if args.memories:
        kinds = args.memories.split(",")
        modes = [
            m + ("-comp" if k == "compressible" else "") if not m.startswith("tcp") else m for m in modes for k in kinds
        ]
        modes = list(dict.fromkeys(modes))
    if args.before:
        modes += [m + "-before" for m in modes if m.removesuffix("-comp") in MODES]
    results = {m: [] for m in modes}
    rounds = {m: [] for m in modes if not m.startswith("tcp")}
    ratios = collections.defaultdict(list)
    try:
        key = os.path.join(work, "key")
        generate_key(key)
        with TwoHosts(prefix="bw", rate=args.rate) as hosts:
            for i in range(args.pairs):
                order = modes[i % len(modes) :] + modes[: i % len(modes)]
                pair = {}
                for m in order:
                    if m == "tcpmem":
                        pair[m] = raw_tcp(hosts, args.size_mb << 20, fresh=True)
                    elif m.startswith("tcp"):
                        pair[m] = raw_tcp(hosts, args.size_mb << 20, int(m[3:] or 1))
                    else:
                        r0 = migrate(
                            hosts, key, work, args.size_mb, m, args.profile, "-%d" % i, args.before, args.pace,
                            args.compressible or "-comp" in m,
                        )  # fmt: skip
                        rounds[m].append(r0)
                        pair[m] = r0["bytes_raw"] / r0["duration_s"] / 1e6
                for m, v in pair.items():
                    results[m].append(v)
                streams = args.streams.split(",") if args.streams else []
                for a, b in (
                    [("sealed", "plaintext"), ("sealed", "tcp"), ("plaintext", "tcp")]
                    + [(m, m + "-before") for m in MODES]
                    + [(m + "-comp" + b, m + b) for m in MODES for b in ("", "-before")]
                    + [(m + "-comp", m + "-comp-before") for m in MODES]
                    + [(f"{m}-s{n}", f"{m}-s{streams[0]}") for m in MODES for n in streams[1:]]
                    + [(f"{m}-s{n}", "tcp") for m in MODES for n in streams]
                ):
                    if a in pair and b in pair:
                        ratios[f"{a}/{b}"].append(pair[a] / pair[b])
                for flag, values in (("l", args.limits), ("k", args.keeps)):
                    values = values.split(",") if values else []
                    for m in list(pair):  # each value against the first, the rest of the mode the same
                        for x in values[1:]:
                            first = m.removesuffix(f"-{flag}{x}") + f"-{flag}{values[0]}"
                            if m.endswith(f"-{flag}{x}") and first in pair:
                                ratios[f"{m}/{first}"].append(pair[m] / pair[first])
                print("pair %d: " % i + ", ".join(describe(m, pair[m], rounds.get(m)) for m in order), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "size_mb": args.size_mb,
        "compressible": args.compressible,
        "link": args.rate or "unshaped",
        "round0_MBps": results,
        "median_MBps": {m: statistics.median(v) for m, v in results.items()},
        "ratios": dict(ratios),
        "median_ratios": {k: statistics.median(v) for k, v in ratios.items()},
        "round0_s_per_GiB": {m: per_gib(r) for m, r in rounds.items()},
        "load": {m: [r["load"] for r in rs] for m, rs in rounds.items()},
        "round0": rounds,
    }
    if args.pace:
        summary["pace"] = {m: [r.get("pace") for r in rs] for m, rs in rounds.items()}
        summary["median_pace"] = {
            m: statistics.median(ok) for m, v in summary["pace"].items() if (ok := [p for p in v if p is not None])
        }
    if args.profile:
        summary["profile"] = {
            f"{side}-{m}": summarize(
                [os.path.join(args.profile, f"{side}-{m}-{i}.txt") for i in range(args.pairs)], within
            )
            for m in rounds
            for side, within in (("run", ("first_round",)), ("serve", ("Session.run", "run (hybridmig/destination")))
        }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
