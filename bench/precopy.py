"""Benchmark: pre-copy — dirty tracking overhead, scan cost, and real
migrations over a veth shaped to 1 Gbit/s.

    cd /work/main && .venv/bin/python -m bench.precopy [--quick] [--out DIR]

All parts run in one invocation, so every ratio is against a baseline of the
same run (same machine load, same build).

1. Tracking overhead.  A memwork workload (native/workload/memwork.c) of
   --overhead-mb MiB (256), 1 writer thread, unthrottled (rate=0).  Windows
   of --window s of each kind in MODES, --repeats times, interleaved (the
   order rotates every repeat); the main kind is "per-round", pre-copy's
   rhythm as `hybridmig run` has it: engine/precopy.py's own PreCopy and
   Sender, with the tracker run uses (precopy.track: hot pages kept for the
   final round), rounds one after the other (round 0 every tracked VMA,
   then what each scan found to send), paced to --link-mbit (1000) by the
   Sender's Throttle, into a sink that drops the frames and acknowledges
   each round at once; no decision to stop (PreCopy.round).
   "per-round-exact" is the same without hot pages (every page found
   written is protected again and sent).  The others split the cost:
   reading alone, no tracker (the Sender sending every VMA round after
   round); attached and never scanned; the scan's walk without re-protection
   ("peek"); a scan every 0.5 s (the issue's original figure) and every 2 s,
   nothing read.  Throughput of a window = ops delta / realtime delta of the
   two verify() reports framing it (verify pauses the writer to check every
   page: the same cost in every kind of window); also the mean 100 ms bucket
   of memwork's own timeline, which leaves out the verify pauses, and ops per
   CPU second the target got (other load on the 2 CPUs lowers ops/s, not
   this).  Also: the target's minor faults per second (each write to a
   re-protected page is one), the CPU time lost per extra fault, and its
   AnonHugePages.  Target: per-round / untracked >= 95 %.
2. Scan cost.  TreeTracker.scan() on a --scan-mb MiB (1024) workload:
   (a) rate 100 pages/s: right after attach(), then every 0.5 s (few pages
       written);
   (b) rate 0 (unthrottled writer): attach, let the writer run 2 s, scan —
       three times;
   reported as ms per GiB of tracked VMAs.  Injection stop: the value
   attach() returns (ms the target was held), 10 attach/detach cycles, on
   both workloads.
3. Migrations.  For each size of --sizes (1024,4096; --quick: 256,1024) and
   each rate of --rates (500,20000 pages/s, 1 writer thread): TwoHosts
   (rate="1gbit", tbf on both ends of the veth), `hybridmig serve --once`
   in the destination namespace, the workload in the source one,
   `hybridmig run PID --to ... --json` there; from its JSON report: rounds,
   pages per round, bytes_sent, downtime and breakdown, remote_faults.  The
   restored tree is adopted, verified (bad must be 0) and stopped.

Results: OUT/results.json (raw, rewritten after each step) and OUT/results.md
(the tables, also printed).  Everything started here is stopped by pid; temp
dirs are removed; namespaces go with TwoHosts; also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hybridmig import wire  # noqa: E402
from hybridmig.keys import generate_key  # noqa: E402
from hybridmig.messages import RoundStats  # noqa: E402
from hybridmig.source.precopy import PreCopy, Round, Sender, Throttle, track  # noqa: E402
from hybridmig.source.tracker import PAGE_SIZE, TreeTracker, merge, pages_in, read_vmas  # noqa: E402
from hybridmig.testing.netns import TwoHosts  # noqa: E402
from hybridmig.testing.workload import Workload, become_subreaper, build_memwork, kill_tree  # noqa: E402

from . import lazy_pages  # noqa: E402  (machine_info)

HYBRIDMIG = str(REPO / ".venv" / "bin" / "hybridmig")
GIB = 1 << 30
TARGET_OVERHEAD = 0.95
PORT = 7777
SCAN_EVERY_S = 0.5
MIN_ROUND_S = 0.1  # per-round windows: rounds at most this often


# --- helpers ---------------------------------------------------------------------------


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt_mmm(vals, digits=1):
    """median (min–max)"""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    m = statistics.median(vals)
    if len(vals) == 1:
        return "%.*f" % (digits, m)
    return "%.*f (%.*f–%.*f)" % (digits, m, digits, min(vals), digits, max(vals))


def timeline_rate(verify: dict, t_from: float, t_to: float, how=statistics.median) -> float | None:
    """Median (or `how`) ops/s over the 100 ms buckets of memwork's timeline lying wholly in [t_from, t_to]."""
    tl = verify.get("timeline") or {}
    ops, start, bucket = tl.get("ops"), tl.get("start"), tl.get("bucket_ms", 100) / 1000.0
    if not ops or start is None:
        return None
    vals = [n / bucket for i, n in enumerate(ops) if start + i * bucket >= t_from and start + (i + 1) * bucket <= t_to]
    return how(vals) if vals else None


def machine_info() -> dict:
    info = lazy_pages.machine_info()
    info["loadavg_at_start"] = os.getloadavg()
    return info


class Results:
    def __init__(self, out: Path, args):
        self.out = out
        self.data = {
            "command": " ".join([".venv/bin/python -m bench.precopy"] + (args or [])),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(),
            "overhead": None,
            "scan": None,
            "migrations": [],
            "errors": [],
        }

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.out / "results.json")


# --- 1. tracking overhead ---------------------------------------------------------------

#: the kinds of overhead window, in the order of the first repeat
MODES = ("untracked", "reading", "attached", "per-round", "per-round-exact", "peek-0.5s", "every-0.5s", "every-2s")
MODE_DOC = {
    "untracked": "no tracker",
    "reading": "no tracker; the Sender sends its whole memory over and over at the link rate: the cost of "
    "sending alone",
    "attached": "attached (every page write-protected once), never scanned",
    "per-round": "pre-copy's rounds as `hybridmig run` makes them (PreCopy, Sender, precopy.track): hot pages "
    "left unprotected and owed to the final round, the rest sent, paced to the link rate",
    "per-round-exact": "the same without hot pages (before issue 3's last step): every page found written is "
    "protected again and sent",
    "peek-0.5s": "attached; every 0.5 s the same PAGEMAP_SCAN walk without PM_SCAN_WP_MATCHING (nothing "
    "re-protected): the cost of the walk and its locks alone",
    "every-0.5s": "a scan every 0.5 s, nothing read (the issue's original figure)",
    "every-2s": "a scan every 2 s, nothing read",
}
INTERVALS = {"peek-0.5s": 0.5, "every-0.5s": 0.5, "every-2s": 2.0}
TARGET_MODE = "per-round"


def _minor_faults(pid: int) -> int:
    """Minor faults of every thread of pid so far (field 10 of each task's stat)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        with contextlib.suppress(FileNotFoundError):
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                total += int(f.read().rsplit(")", 1)[1].split()[7])
    return total


def _cpu_s(pid: int) -> float:
    """CPU time of every thread of process pid so far, in s (its process
    CPU clock: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), ns resolution)."""
    return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9


def _anon_huge_kib(pid: int) -> int | None:
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return None


def _peek(tracker: TreeTracker) -> int:
    """The written pages of every tracked VMA, as TreeTracker.scan() finds
    them but without protecting them again; their number."""
    found = 0
    for pid, ranges in tracker.vmas().items():
        for start, end in ranges:
            found += pages_in(tracker.trackers[pid]._tracker.scan(start, end, protect=False))
    return found


class SinkChannel:
    """Where the bench's rounds go: frames counted and dropped, each round
    marker acknowledged at once (a destination that stores instantly)."""

    def __init__(self):
        self.bytes_sent = 0
        self._acks = []

    def send(self, kind, body=b""):
        self.bytes_sent += len(body)
        if kind == wire.Msg.ROUND:
            self._acks.append(RoundStats.decode(body).number)

    def recv(self):
        return wire.Msg.ROUND_ACK, wire.encode_ack(self._acks.pop(0), 0)


def _rounds(tracker: TreeTracker | None, pid: int, t_end: float, link_bytes_s: float, scans: list) -> None:
    """Pre-copy's rounds until t_end (the last one may end after it): with a
    tracker, PreCopy's round 0 and then PreCopy.round() after round; without,
    the Sender sends every VMA of pid round after round. Paced to link_bytes_s."""
    sender = Sender(SinkChannel(), {pid: pid}, pid, throttle=Throttle(link_bytes_s))
    if tracker is None:
        while time.monotonic() < t_end:
            sender.send_ranges(pid, merge(read_vmas(pid)), Round(0))
        return
    precopy = PreCopy(tracker, sender)
    precopy.first_round()
    number, t_round = 1, time.monotonic()
    while time.monotonic() < t_end:
        rnd = precopy.round(number)
        scans.append(
            {
                "ms": rnd.scan_s * 1000,
                "dirty_pages": rnd.pages_written,
                "hot_pages": rnd.pages_hot,
                "sent_pages": rnd.pages_sent,
                "round_s": time.monotonic() - t_round,
            }
        )
        number, t_round = number + 1, time.monotonic()
        # Little to send (the hot pages wait for the final round): a run
        # would stop here, or throttle; the bench goes on, not spinning.
        time.sleep(max(0.0, MIN_ROUND_S - rnd.duration_s))


def window(wl: Workload, seconds: float, mode: str, link_bytes_s: float) -> dict:
    """One measurement window of the given MODE; returns its throughput, the
    target's minor faults and its huge pages, and the scans."""
    pid, tracker, scans, stop_ms = wl.host_pid, None, [], None
    if mode not in ("untracked", "reading"):
        tracker = track(pid, keep_hot=mode == "per-round")
        stop_ms = tracker.attach()
    try:
        v1 = wl.verify()[0]
        cpu, faults = _cpu_s(pid), _minor_faults(pid)
        t_end = time.monotonic() + seconds
        if mode in ("per-round", "per-round-exact", "reading"):
            _rounds(tracker, pid, t_end, link_bytes_s, scans)
        every = INTERVALS.get(mode)
        nxt = time.monotonic() + (every or seconds)
        while time.monotonic() < t_end:
            time.sleep(max(0.0, min(nxt, t_end) - time.monotonic()))
            if every and time.monotonic() >= nxt:
                t = time.perf_counter()
                dirty = _peek(tracker) if mode.startswith("peek") else tracker.scan().dirty_pages
                scans.append({"ms": (time.perf_counter() - t) * 1000, "dirty_pages": dirty})
                nxt += every
        cpu = _cpu_s(pid) - cpu
        t_signal = time.time()
        faults = _minor_faults(pid) - faults
        huge = _anon_huge_kib(pid)
        v2 = wl.verify()[0]
    finally:
        if tracker is not None:
            tracker.detach()
    dt = v2["realtime"] - v1["realtime"]
    return {
        "mode": mode,
        "tracked": tracker is not None,
        "seconds": dt,
        "ops": v2["ops"] - v1["ops"],
        "ops_per_s": (v2["ops"] - v1["ops"]) / dt,
        # the writer's work per CPU second it got: other load on the machine
        # (it shares 2 CPUs) lowers ops/s, not this
        "ops_per_cpu_s": (v2["ops"] - v1["ops"]) / cpu if cpu > 0 else None,
        "cpu_share": cpu / (t_signal - v1["realtime"]),
        "timeline_ops_per_s": timeline_rate(v2, v1["realtime"] + 0.2, t_signal - 0.05),
        "timeline_mean_ops_per_s": timeline_rate(v2, v1["realtime"] + 0.2, t_signal - 0.05, statistics.mean),
        "faults_per_s": faults / (t_signal - v1["realtime"]),
        "anon_huge_kib": huge,
        "bad": v1["bad"] + v2["bad"],
        "attach_stop_ms": stop_ms,
        "scans": scans,
    }


def bench_overhead(
    res: Results, size_mb: int, seconds: float, repeats: int, link_bytes_s: float, modes_run=MODES
) -> None:
    """`repeats` times every mode of modes_run, one window each, the order
    rotated each repeat so that a drift of the machine favours none."""
    wl = Workload.start(size_mb, threads=1, rate=0)
    try:
        wl.verify()  # warm: every page written once
        runs = []
        for i in range(repeats):
            for mode in modes_run[i % len(modes_run) :] + modes_run[: i % len(modes_run)]:
                runs.append(window(wl, seconds, mode, link_bytes_s))
                runs[-1]["repeat"] = i
                print(
                    "  overhead %-10s %9.0f ops/s, %7.0f faults/s%s"
                    % (
                        mode,
                        runs[-1]["ops_per_s"],
                        runs[-1]["faults_per_s"],
                        ", %d scans" % len(runs[-1]["scans"]) if runs[-1]["scans"] else "",
                    ),
                    flush=True,
                )
    finally:
        wl.stop()
    base = med([r["ops_per_s"] for r in runs if r["mode"] == "untracked"])
    base_tl = med([r["timeline_mean_ops_per_s"] for r in runs if r["mode"] == "untracked"])
    base_cpu = med([r["ops_per_cpu_s"] for r in runs if r["mode"] == "untracked"])
    modes = {}
    for mode in modes_run:
        mine = [r for r in runs if r["mode"] == mode]
        ratio = med([r["ops_per_s"] for r in mine]) / base
        faults = med([r["faults_per_s"] for r in mine])
        # each repeat's window against that repeat's untracked window
        pairs = [
            r["ops_per_s"] / u["ops_per_s"]
            for r in mine
            for u in runs
            if u["mode"] == "untracked" and u["repeat"] == r["repeat"]
        ]
        tl = med([r["timeline_mean_ops_per_s"] for r in mine])
        modes[mode] = {
            "ratio": ratio,
            "pair_ratios": pairs,
            "ratio_per_cpu_s": med([r["ops_per_cpu_s"] for r in mine]) / base_cpu,
            "cpu_share": [r["cpu_share"] for r in mine],
            "ratio_timeline_mean": tl / base_tl if tl and base_tl else None,
            "faults_per_s": faults,
            # the throughput lost, as CPU time per fault taken beyond the untracked ones
            "us_per_fault": (1 - ratio) / (faults - modes["untracked"]["faults_per_s"]) * 1e6
            if mode != "untracked" and ratio < 1 and faults > modes["untracked"]["faults_per_s"] + 100
            else None,
            "scan_ms": [s["ms"] for r in mine for s in r["scans"]],
            "round_s": [s["round_s"] for r in mine for s in r["scans"] if "round_s" in s],
            "dirty_pages": [s["dirty_pages"] for r in mine for s in r["scans"]],
            "hot_pages": [s["hot_pages"] for r in mine for s in r["scans"] if "hot_pages" in s],
            "anon_huge_kib": [r["anon_huge_kib"] for r in mine],
        }
    res.data["overhead"] = {
        "size_mb": size_mb,
        "window_s": seconds,
        "repeats": repeats,
        "link_bytes_s": link_bytes_s,
        "runs": runs,
        "modes": modes,
        "target_mode": TARGET_MODE,
        "ratio": modes[TARGET_MODE]["ratio"],
        "ratio_per_cpu_s": modes[TARGET_MODE]["ratio_per_cpu_s"],
        # tracking's own share: per-round against reading the same pages untracked
        "ratio_vs_reading": (modes[TARGET_MODE]["ratio"] / modes["reading"]["ratio"]) if "reading" in modes else None,
        "ratio_per_cpu_s_vs_reading": (modes[TARGET_MODE]["ratio_per_cpu_s"] / modes["reading"]["ratio_per_cpu_s"])
        if "reading" in modes
        else None,
    }


# --- 2. scan cost and stop time ------------------------------------------------------------


def scan_record(res, t_ms):
    pages = sum(r.pages_scanned for r in res.values())
    return {
        "ms": t_ms,
        "pages_scanned": pages,
        "dirty_pages": res.dirty_pages,
        "ms_per_gib": t_ms / (pages * PAGE_SIZE / GIB) if pages else None,
    }


def timed_scan(tracker):
    t = time.perf_counter()
    r = tracker.scan()
    return scan_record(r, (time.perf_counter() - t) * 1000)


def stop_times(pid, n=10):
    out = []
    for _ in range(n):
        t = TreeTracker(pid)
        try:
            out.append(t.attach())
        finally:
            t.detach()
        time.sleep(0.05)
    return out


def bench_scan(res: Results, size_mb: int) -> None:
    out = {"size_mb": size_mb}
    wl = Workload.start(size_mb, threads=1, rate=100)
    try:
        tracker = TreeTracker(wl.host_pid)
        tracker.attach()
        try:
            few = [timed_scan(tracker)]
            for _ in range(5):
                time.sleep(SCAN_EVERY_S)
                few.append(timed_scan(tracker))
        finally:
            tracker.detach()
        out["few_writes"] = few
        out["stop_ms_idle"] = stop_times(wl.host_pid)
        out["bad_idle"] = wl.verify()[0]["bad"]
    finally:
        wl.stop()
    print("  scan few writes: %s ms/GiB" % [round(s["ms_per_gib"], 1) for s in few], flush=True)
    wl = Workload.start(size_mb, threads=1, rate=0)
    try:
        out["stop_ms_busy"] = stop_times(wl.host_pid)
        many = []
        for _ in range(3):
            tracker = TreeTracker(wl.host_pid)
            tracker.attach()
            try:
                time.sleep(2.0)
                many.append(timed_scan(tracker))
            finally:
                tracker.detach()
        out["many_writes"] = many
        out["bad_busy"] = wl.verify()[0]["bad"]
    finally:
        wl.stop()
    print(
        "  scan many writes: {} ms/GiB, dirty {}".format(
            [round(s["ms_per_gib"], 1) for s in many], [s["dirty_pages"] for s in many]
        ),
        flush=True,
    )
    res.data["scan"] = out


# --- 3. migrations --------------------------------------------------------------------------


def wait_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(
                "serve exited ({}): {}".format(proc.returncode, path.read_text(errors="replace")[-2000:])
            )
        time.sleep(0.05)
    raise RuntimeError(f"serve did not listen within {timeout}s")


def one_migration(size_mb: int, rate: float, tmp_root: Path, logs: Path, timeout: float) -> dict:
    rec = {"size_mb": size_mb, "rate": rate, "threads": 1}
    tag = "%dM-r%d" % (size_mb, rate)
    work = Path(tempfile.mkdtemp(prefix=f"pc-{tag}-", dir=str(tmp_root)))
    kills, wls = [], []

    def cleanup():
        for wl in reversed(wls):
            try:
                wl.stop()
            except Exception as e:  # noqa: BLE001
                rec.setdefault("cleanup_errors", []).append(repr(e))
        for p in reversed(kills):
            kill_tree(p)
        del wls[:], kills[:]

    try:
        key = work / "key"
        key.unlink(missing_ok=True)  # a work directory reused
        generate_key(key)
        serve_dir = work / "serve"
        serve_dir.mkdir()
        with TwoHosts(prefix="pc", rate="1gbit") as h, contextlib.ExitStack() as stack:
            stack.callback(cleanup)  # processes end before the namespaces go
            rec["link"] = f"veth {h.src} <-> {h.dst}, tbf 1gbit burst 256kb latency 50ms"
            serve_log = logs / (f"serve-{tag}.log")
            with open(serve_log, "w") as slog:
                listen = "%s:%d" % (h.dst_addr, PORT)
                serve = subprocess.Popen(
                    h.run_in(h.dst)
                    + [
                        HYBRIDMIG,
                        "serve",
                        "--listen",
                        listen,
                        "--dir",
                        str(serve_dir),
                        "--key-file",
                        str(key),
                        "--once",
                        "-v3",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=slog,
                    stderr=subprocess.STDOUT,
                )
                kills.append(psutil.Process(serve.pid))
                wait_log(serve_log, "listening on", serve, 30)
                t = time.monotonic()
                wl = Workload.start(size_mb, threads=1, rate=rate, netns=h.src, timeout=120)
                wls.append(wl)
                rec["workload_start_s"] = time.monotonic() - t
                kills.append(psutil.Process(wl.host_pid))
                time.sleep(1.0)  # the writer settles at its rate
                cmd = h.run_in(h.src) + [
                    HYBRIDMIG,
                    "run",
                    str(wl.host_pid),
                    "--to",
                    listen,
                    "--key-file",
                    str(key),
                    "--json",
                    "--timeout",
                    "120",
                    "-v3",
                ]
                t = time.monotonic()
                run_err = logs / (f"run-{tag}.err")
                with open(run_err, "w") as err:
                    proc = subprocess.Popen(
                        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True
                    )
                    kills.append(psutil.Process(proc.pid))
                    try:
                        out, _ = proc.communicate(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        kill_tree(kills[-1])
                        raise RuntimeError(f"hybridmig run did not finish within {timeout}s") from None
                rec["run_wall_s"] = time.monotonic() - t
                rec["run_rc"] = proc.returncode
                try:
                    rep = json.loads(out)
                except ValueError:
                    rep = {"result": "no-json", "stdout": out[-2000:]}
                rec["report"] = rep
                if proc.returncode != 0 or rep.get("result") != "migrated":
                    rec["error"] = rep.get("error") or f"run rc {proc.returncode}"
                    rec["run_stderr_tail"] = run_err.read_text(errors="replace")[-3000:]
                    return rec
                rounds = rep["rounds"]
                pre = [r for r in rounds if not r.get("final")]
                fin = [r for r in rounds if r.get("final")]
                rec.update(
                    {
                        "precopy_rounds": len(pre),
                        "pages_sent_per_round": [r["pages_sent"] for r in pre],
                        "pages_written_per_round": [r["pages_written"] for r in pre],
                        "final_pages_sent": fin[0]["pages_sent"] if fin else None,
                        "bytes_sent": rep["bytes_sent"],
                        "bytes_per_workload_byte": rep["bytes_sent"] / (size_mb << 20),
                        "downtime_ms": rep["downtime_ms"],
                        "breakdown": rep["breakdown"],
                        "remote_faults": rep["remote_faults"],
                        "precopy_s": rep["precopy_s"],
                        "attach_stop_ms": rep["attach_stop_ms"],
                        "dest_remote_pages": (rep.get("destination") or {}).get("remote_pages"),
                    }
                )
                new_pid = rep.get("restored_pid")
                if new_pid:
                    kills.append(psutil.Process(new_pid))
                try:
                    wl.wait_gone(30)
                except Exception as e:  # noqa: BLE001
                    rec["source_not_gone"] = str(e)
                new = Workload.adopt(new_pid, report=wl)
                wls.append(new)
                v = new.verify(timeout=120)
                rec["verify"] = [
                    {k: x.get(k) for k in ("pages", "bad", "first_bad", "zero_pages_bad", "max_gap_ms", "ops")}
                    for x in v
                ]
                rec["bad"] = sum(x["bad"] + x["zero_pages_bad"] for x in v)
                rec["workload_max_gap_ms"] = max(x["max_gap_ms"] for x in v)
                rec["serve_rc"] = serve.wait(60)
        return rec
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)


# --- summary ----------------------------------------------------------------------------------


def summarize(d: dict) -> str:
    m = d["machine"]
    lines = [
        "# Pre-copy benchmark",
        "",
        "Machine: Linux {}, {} CPUs ({}), {} GiB RAM; criu {}; git {}{}".format(
            m.get("kernel"),
            m.get("nproc"),
            m.get("cpu"),
            m.get("mem_total_gib"),
            m.get("criu"),
            (m.get("git_head") or "")[:12],
            " (engine/native modified)" if m.get("git_dirty") else "",
        ),
        "",
        "Command: `{}`".format(d["command"]),
        "",
    ]
    o = d.get("overhead")
    if o and "modes" in o:
        lines += [
            "## 1. Tracking overhead (memwork %d MiB, 1 writer, unthrottled; %d x %.0f s windows of each kind, "
            "interleaved; reads at %.0f MB/s)" % (o["size_mb"], o["repeats"], o["window_s"], o["link_bytes_s"] / 1e6),
            "",
            "| window | ops/s (verify delta) median (min–max) | **/ untracked** | per repeat "
            "| timeline mean / untracked | **ops per CPU-s / untracked** | CPU share of the target "
            "| target faults/s | µs per extra fault | scans: ms; s apart; dirty pages | AnonHugePages kB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in o["modes"]:
            mine = [r for r in o["runs"] if r["mode"] == mode]
            m = o["modes"][mode]
            gaps = m["round_s"] or ([INTERVALS[mode]] if m["scan_ms"] else [])
            lines.append(
                "| {} | {} | **{:.1f} %** | {} | {} | **{:.1f} %** | {} | {:.0f} | {} | {} | {} |".format(
                    mode,
                    fmt_mmm([r["ops_per_s"] for r in mine], 0),
                    m["ratio"] * 100,
                    ", ".join("%.0f %%" % (x * 100) for x in m["pair_ratios"]),
                    "%.1f %%" % (m["ratio_timeline_mean"] * 100) if m["ratio_timeline_mean"] else "n/a",
                    m["ratio_per_cpu_s"] * 100,
                    fmt_mmm(m["cpu_share"], 2),
                    m["faults_per_s"],
                    "{:.2f}".format(m["us_per_fault"]) if m["us_per_fault"] else "n/a",
                    "{}; {}; {}{}".format(
                        fmt_mmm(m["scan_ms"], 1),
                        fmt_mmm(gaps, 2),
                        fmt_mmm(m["dirty_pages"], 0),
                        " (hot: {})".format(fmt_mmm(m["hot_pages"], 0)) if any(m.get("hot_pages") or []) else "",
                    )
                    if m["scan_ms"]
                    else "none",
                    fmt_mmm(m["anon_huge_kib"], 0),
                )
            )
        lines += [""] + [f"- {mode}: {MODE_DOC[mode]}" for mode in o["modes"]]
        lines += [
            "",
            "Target (>= 95 %, judged on the {} windows at {:.0f} MB/s): ops/s {}, ops per CPU-s {}.".format(
                o["target_mode"],
                o["link_bytes_s"] / 1e6,
                "**met**" if o["ratio"] >= TARGET_OVERHEAD else "**NOT met**",
                "**met**" if o["ratio_per_cpu_s"] >= TARGET_OVERHEAD else "**NOT met**",
            ),
            "Tracking's own share, {} / reading (both read the same way): ops/s {:.1f} %, ops per CPU-s {:.1f} %.".format(  # noqa: E501
                o["target_mode"], o["ratio_vs_reading"] * 100, o["ratio_per_cpu_s_vs_reading"] * 100
            )
            if o.get("ratio_vs_reading")
            else "",
            "",
        ]
    s = d.get("scan")
    if s:
        lines += [
            "## 2. Scan cost and injection stop (memwork %d MiB)" % s["size_mb"],
            "",
            "| | scan ms | ms per GiB | dirty pages per scan |",
            "|---|---|---|---|",
        ]
        few = s.get("few_writes") or []
        if few:
            lines.append(
                "| right after attach (rate 100 pages/s) | {} | {} | {} |".format(
                    fmt_mmm([few[0]["ms"]], 1), fmt_mmm([few[0]["ms_per_gib"]], 1), few[0]["dirty_pages"]
                )
            )
            lines.append(
                "| later scans every 0.5 s, few writes (%d) | %s | %s | %s |"
                % (
                    len(few) - 1,
                    fmt_mmm([x["ms"] for x in few[1:]], 1),
                    fmt_mmm([x["ms_per_gib"] for x in few[1:]], 1),
                    fmt_mmm([x["dirty_pages"] for x in few[1:]], 0),
                )
            )
        many = s.get("many_writes") or []
        if many:
            lines.append(
                "| 2 s of unthrottled writes (%d) | %s | %s | %s |"
                % (
                    len(many),
                    fmt_mmm([x["ms"] for x in many], 1),
                    fmt_mmm([x["ms_per_gib"] for x in many], 1),
                    fmt_mmm([x["dirty_pages"] for x in many], 0),
                )
            )
        lines += [
            "",
            "attach() stop time, 10 attach/detach: idle writer {} ms; busy writer {} ms (median (min–max)).".format(
                fmt_mmm(s.get("stop_ms_idle", []), 3), fmt_mmm(s.get("stop_ms_busy", []), 3)
            ),
            "",
        ]
    migs = d.get("migrations") or []
    if migs:
        lines += [
            "## 3. Migrations over veth + tbf 1 Gbit/s (1 writer thread)",
            "",
            "| size | rate pages/s | pre-copy rounds | pages sent per round | final pages | bytes sent (x size) "
            "| pre-copy s | downtime ms | freeze→dumped / final pages / images / restore ms | remote faults "
            "| bad | writer max gap ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in migs:
            if r.get("error"):
                lines.append(
                    "| %d MiB | %d | FAILED: %s | | | | | | | | | |"
                    % (r["size_mb"], r["rate"], str(r["error"]).replace("|", "/")[:200])
                )
                continue
            b = r["breakdown"]
            lines.append(
                "| %d MiB | %d | %d | %s | %s | %.1f MiB (%.2f) | %.1f | %.0f | %.0f / %.0f / %.0f / %.0f | %d | %s | %s |"  # noqa: E501
                % (
                    r["size_mb"],
                    r["rate"],
                    r["precopy_rounds"],
                    ", ".join(str(x) for x in r["pages_sent_per_round"]),
                    r["final_pages_sent"],
                    r["bytes_sent"] / 2**20,
                    r["bytes_per_workload_byte"],
                    r["precopy_s"],
                    r["downtime_ms"],
                    b["freeze_to_dumped_ms"],
                    b["final_pages_ms"],
                    b["images_ms"],
                    b["restore_ms"],
                    r["remote_faults"],
                    r.get("bad"),
                    "{:.0f}".format(r["workload_max_gap_ms"]) if r.get("workload_max_gap_ms") is not None else "n/a",
                )
            )
        lines.append("")
    if d.get("errors"):
        lines += ["## Errors", ""] + [f"- {e.splitlines()[-1]}" for e in d["errors"]] + [""]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def _sigterm(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.precopy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="migrations of 256 and 1024 MiB, shorter windows")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "precopy"))
    ap.add_argument("--sizes", default=None, help="migration sizes, MiB (default 1024,4096; --quick 256,1024)")
    ap.add_argument("--rates", default="500,20000", help="writer rates of the migrations, pages/s/thread")
    ap.add_argument("--overhead-mb", type=int, default=256)
    ap.add_argument("--scan-mb", type=int, default=1024)
    ap.add_argument("--window", type=float, default=None, help="overhead window, s (default 5; --quick 3)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="overhead windows of each kind, interleaved (default 5; --quick 2)"
    )
    ap.add_argument("--link-mbit", type=float, default=1000, help="the per-round windows' read rate, Mbit/s")
    ap.add_argument("--modes", default=",".join(MODES), help="overhead window kinds (untracked and per-round needed)")
    ap.add_argument("--parts", default="overhead,scan,migrate")
    ap.add_argument("--timeout", type=float, default=300, help="per `hybridmig run`, s")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (namespaces, CRIU, userfaultfd)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in (args.sizes or ("256,1024" if args.quick else "1024,4096")).split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    window_s = args.window or (3.0 if args.quick else 5.0)
    repeats = args.repeats or (2 if args.quick else 5)
    parts = set(args.parts.split(","))
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _sigterm)
    become_subreaper()  # restored trees are re-parented to us: reap them
    build_memwork()
    res = Results(out, argv)
    tmp_root = Path(tempfile.mkdtemp(prefix="hm-pc-", dir="/tmp"))  # short: serve's socket lives below
    try:
        overhead = lambda: bench_overhead(
            res, args.overhead_mb, window_s, repeats, args.link_mbit * 1e6 / 8, tuple(args.modes.split(","))
        )
        for name, fn in (("overhead", overhead), ("scan", lambda: bench_scan(res, args.scan_mb))):
            if name not in parts:
                continue
            print(f"== {name}", flush=True)
            try:
                fn()
            except Exception:  # noqa: BLE001
                res.data["errors"].append(f"{name}: {traceback.format_exc()}")
                print(traceback.format_exc(), file=sys.stderr)
            res.save()
        if "migrate" in parts:
            for size in sizes:
                for rate in rates:
                    print("== migrate %d MiB at %d pages/s" % (size, rate), flush=True)
                    try:
                        rec = one_migration(size, rate, tmp_root, logs, args.timeout)
                    except Exception:  # noqa: BLE001
                        rec = {
                            "size_mb": size,
                            "rate": rate,
                            "error": traceback.format_exc().splitlines()[-1],
                            "traceback": traceback.format_exc(),
                        }
                    res.data["migrations"].append(rec)
                    print(
                        "  %s"
                        % {
                            k: rec.get(k)
                            for k in (
                                "precopy_rounds",
                                "pages_sent_per_round",
                                "bytes_sent",
                                "downtime_ms",
                                "remote_faults",
                                "bad",
                                "error",
                            )
                        },
                        flush=True,
                    )
                    res.save()
    finally:
        res.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        res.save()
        shutil.rmtree(tmp_root, ignore_errors=True)
        md = summarize(res.data)
        (out / "results.md").write_text(md)
        print(md)
    return (
        0 if not res.data["errors"] and not any(m.get("error") or m.get("bad") for m in res.data["migrations"]) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
