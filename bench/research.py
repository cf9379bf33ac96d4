"""`hybridmig bench`: migration strategies side by side on the same
workloads and the same shaped link, in one run, with plots.

For every workload configuration, link rate and repetition, each strategy
(bench/strategies.py) migrates a fresh copy of the workload from one network
namespace to another joined by a veth shaped with tbf; the workload then
says whether its state survived and how its own loop went over time
(bench/workloads/). Everything a run starts is stopped by pid, temp dirs are
removed, namespaces go with TwoHosts, also on failure or Ctrl-C.

Metrics per run: the blackout the workload saw (its longest loop gap on
CLOCK_REALTIME), the phases (dump, copy, restore, pre-copy), total migration
time (until every page is on the destination), bytes on the wire (veth
counters, both directions), remote faults, throughput over the first
seconds after resume relative to the 2 s before the migration started, CPU time of the
source's and the destination's tools, the destination tools' peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hybridmig.testing.netns import TwoHosts
from hybridmig.testing.workload import become_subreaper

from . import report
from .strategies import STRATEGIES, StrategyError
from .trial import Trial
from .workloads.base import BUCKET_S

PIPE_MAX = 4 << 20  # CRIU's page server needs pipes this big (post-copy, floor)
BEFORE_S = 2.0  # throughput reference: the 2 s before the migration starts
AFTER_S = 2.0  # ... compared with the first 2 s after resume
SERIES_S = (-1.0, 4.0)  # throughput series kept per run, seconds around resume

QUICK = {
    "workloads": ["memwork", "redis", "pyheap"],
    "sizes": [256],
    "app_size": 256,
    "rates": [500],
    "link_rates": ["1gbit"],
    "repeat": 1,
}
FULL = {
    "workloads": ["memwork", "redis", "pyheap"],
    "sizes": [1024, 2048, 4096],  # three points: blackout.png shows each strategy's slope
    "app_size": 1024,
    "rates": [500, 20000],
    "link_rates": ["1gbit"],
    "repeat": 3,
}


def make_workloads(names, sizes, rates, hot, app_size):
    from .workloads.memwork import Memwork

    made = []
    for name in names:
        if name == "memwork":
            made += [lambda s=s, r=r: Memwork(s, rate=r, hot=hot) for s in sizes for r in rates]
        elif name == "redis":
            from .workloads.redis import Redis

            made.append(lambda: Redis(app_size))
        elif name == "pyheap":
            from .workloads.pyheap import PyHeap

            made.append(lambda: PyHeap(app_size))
        elif name == "podman":
            from .workloads.podman import PodmanMemwork

            for s in sizes:
                for r in rates:
                    make = lambda s=s, r=r: PodmanMemwork(s, rate=r, hot=hot)  # noqa: E731
                    make.container = True  # type: ignore[attr-defined]
                    made.append(make)
        else:
            raise SystemExit(f"hybridmig bench: unknown workload {name!r} (memwork, redis, pyheap, podman)")
    return made


# --- the throughput seen by the workload -----------------------------------------------


def ops_rate(fin, t_from: float, t_to: float):
    """Operations per second of the workload's loop over [t_from, t_to]."""
    first = round(fin.timeline_start / BUCKET_S)
    done = 0.0
    for b in range(math.floor(t_from / BUCKET_S), math.ceil(t_to / BUCKET_S)):
        i = b - first
        if i < 0 or i >= len(fin.timeline_ops):
            return None  # outside what the workload still remembers
        lo, hi = b * BUCKET_S, (b + 1) * BUCKET_S
        done += fin.timeline_ops[i] * (min(hi, t_to) - max(lo, t_from)) / BUCKET_S
    return done / (t_to - t_from)


def throughput(fin, resumed_at: float, started_at: float) -> dict:
    """The rate before the migration started (before pre-copy, which may
    throttle the workload), the rate after resume, and a series around
    resume relative to the rate before."""
    resume = fin.max_gap_end or resumed_at
    freeze = resume - fin.max_gap_ms / 1000
    before = ops_rate(fin, started_at - BEFORE_S - BUCKET_S, started_at - BUCKET_S)
    after = ops_rate(fin, resume, resume + AFTER_S)
    series = []
    if before:
        t = SERIES_S[0]
        while t < SERIES_S[1] - 1e-9:
            r = ops_rate(fin, resume + t, resume + t + BUCKET_S)
            series.append(None if r is None else round(r / before, 3))
            t += BUCKET_S
    return {
        "freeze": freeze,
        "resume": resume,
        "ops_per_s_before": before,
        "ops_per_s_after": after,
        "after_vs_before": after / before if before and after is not None else None,
        "series": series,
        "series_start_s": SERIES_S[0],
        "unit": fin.unit,
    }


# --- one run ------------------------------------------------------------------------------


def one_run(make, strategy_name, link_rate, rep, out: Path, timeout: float) -> dict:
    wl = make()
    rec = {
        "workload": wl.params(),
        "config": wl.label,
        "strategy": strategy_name,
        "link_rate": link_rate,
        "rep": rep,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    logs = out / "logs" / wl.label / link_rate / ("%s-%d" % (strategy_name, rep))
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="hmbench-"))
    timeout = timeout or 120 + wl.size_mb / 20
    try:
        with TwoHosts(prefix="hb", rate=link_rate, fast_link=True) as hosts:
            trial = None
            try:
                wl.start(hosts)
                time.sleep(BEFORE_S + 1)  # settle, and fill the "before" window
                rec["before"] = wl.before()
                trial = Trial(hosts, work, logs, timeout, wl)
                bytes0, t0 = hosts.wire_bytes(), time.time()
                outcome = None
                try:
                    outcome = STRATEGIES[strategy_name]().migrate(trial)
                except StrategyError as e:
                    rec.update(ok=False, error=str(e))
                finally:
                    if outcome is None:
                        trial.discard_restored()  # a copy restored before a later step failed
                rec["wire_bytes"] = hosts.wire_bytes() - bytes0
                if outcome is not None:
                    extra = dict(outcome.extra)
                    installed = extra.pop("pages_installed_s", 0.0)
                    rec.update(
                        phases=outcome.phases,
                        **extra,
                        total_s=outcome.resumed_at - t0 + installed,
                        restored_pid=outcome.new_pid,
                    )
                    wl.adopt(outcome.new_pid)
                    time.sleep(max(0.0, outcome.resumed_at + SERIES_S[1] + 0.3 - time.time()))
                trial.close()
                rec["cpu_s"] = dict(trial.cpu_s)
                rec["dst_peak_rss_mb"] = trial.dst_memory.peak / (1 << 20)
                fin = wl.finish()
                rec["check"] = {"ok": fin.ok, "detail": fin.detail}
                rec["blackout_ms"] = fin.max_gap_ms
                rec["throughput"] = throughput(fin, outcome.resumed_at if outcome else time.time(), t0)
                if outcome is not None:
                    rec["ok"] = fin.ok
                    if not fin.ok:
                        rec["error"] = f"the migrated workload did not check out: {fin.detail}"
                elif not fin.ok:
                    rec["error"] += f"; and the source did not check out afterwards: {fin.detail}"
            finally:
                try:
                    if trial is not None:
                        trial.close()
                finally:
                    wl.stop()  # even if closing the trial failed: never leave the workload behind
    except Exception as e:  # noqa: BLE001  (a broken run is a result; the bench goes on)
        rec.setdefault("ok", False)
        rec["error"] = "{}{}: {}".format(rec.get("error", "") + "; " if rec.get("error") else "", type(e).__name__, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec["logs"] = str(logs)
    path = out / "runs" / wl.label / link_rate / ("%s-%d.json" % (strategy_name, rep))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


# --- the whole bench --------------------------------------------------------------------------


def machine() -> dict:
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    cpu = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "criu": first_line(["criu", "--version"]),
        "python": platform.python_version(),
    }


class PipeMaxSize:
    """fs.pipe-max-size raised for the bench (CRIU's page server), then
    restored; ensure() again before each run, in case something else on
    the machine restored its own saved value meanwhile."""

    path = "/proc/sys/fs/pipe-max-size"

    def __enter__(self):
        with open(self.path) as f:
            self.saved = int(f.read())
        self.ensure()
        return self

    def ensure(self):
        with open(self.path) as f:
            if int(f.read()) >= PIPE_MAX:
                return
        with open(self.path, "w") as f:
            f.write(str(PIPE_MAX))

    def __exit__(self, *exc):
        with open(self.path, "w") as f:
            f.write(str(self.saved))


def parse(argv):
    p = argparse.ArgumentParser(prog="hybridmig bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick set (make bench): 256 MiB, one repetition")
    p.add_argument("--out", default="bench/out/research", help="output directory (default: %(default)s)")
    p.add_argument("--strategies", help="comma-separated, of: " + ", ".join(STRATEGIES) + " (default: all)")
    p.add_argument(
        "--workloads",
        help="comma-separated, of: memwork, redis, pyheap, podman (memwork in a podman container, for the "
        "strategies podman-stop-copy and hybridmig-container) (default: memwork, redis, pyheap)",
    )
    p.add_argument("--sizes", help="memwork sizes, MiB, comma-separated (quick 256; full 1024,2048,4096)")
    p.add_argument("--rates", help="memwork dirty rates, pages/s, comma-separated (quick 500; full 500,20000)")
    p.add_argument("--hot", type=float, default=100, help="memwork: percent of memory it keeps rewriting")
    p.add_argument("--app-size", type=int, help="redis and pyheap dataset, MiB (quick 256; full 1024)")
    p.add_argument("--link-rate", help="tbf rate(s) of the veth, comma-separated (default 1gbit; e.g. 10gbit)")
    p.add_argument("--repeat", type=int, help="repetitions (quick 1; full 3)")
    p.add_argument("--timeout", type=float, default=0, help="seconds per step (default: 120 + MiB/20)")
    p.add_argument("--lock", help="a file to flock around each run (machines shared with other benchmarks)")
    p.add_argument(
        "--summarize",
        action="store_true",
        help="only rewrite the summary and plots from OUT/results.json (e.g. of a run cut short)",
    )
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    cfg = {
        "strategies": args.strategies.split(",") if args.strategies else list(STRATEGIES),
        "workloads": args.workloads.split(",") if args.workloads else base["workloads"],
        "sizes": ints(args.sizes) if args.sizes else base["sizes"],
        "rates": [float(x) for x in args.rates.split(",")] if args.rates else base["rates"],
        "hot": args.hot,
        "app_size": args.app_size or base["app_size"],
        "link_rates": args.link_rate.split(",") if args.link_rate else base["link_rates"],
        "repeat": args.repeat or base["repeat"],
        "timeout": args.timeout,
        "quick": args.quick,
        "summarize": args.summarize,
        "lock": args.lock,
    }
    unknown = [s for s in cfg["strategies"] if s not in STRATEGIES]
    if unknown:
        p.error("unknown strategy {} (known: {})".format(", ".join(unknown), ", ".join(STRATEGIES)))
    return cfg, Path(args.out)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # clean-up as for Ctrl-C: processes, namespaces, temp dirs


def main(argv=None) -> int:
    cfg, out = parse(argv)
    if cfg["summarize"]:
        results = json.loads((out / "results.json").read_text())
        print(report.write(results, out))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    if os.geteuid() != 0:
        raise SystemExit("hybridmig bench: needs root (CRIU, network namespaces)")
    from hybridmig import doctor

    doctor.require_lazy_restore()
    out.mkdir(parents=True, exist_ok=True)
    become_subreaper()  # restored workloads are re-parented to us
    makers = make_workloads(cfg["workloads"], cfg["sizes"], cfg["rates"], cfg["hot"], cfg["app_size"])
    # Repetitions outermost: a run cut short still covers every configuration.
    plan = [
        (make, link, rep, s)
        for rep in range(cfg["repeat"])
        for make in makers
        for link in cfg["link_rates"]
        for s in _rotated(cfg["strategies"], rep)
        # container strategies migrate containers, the others processes
        if STRATEGIES[s].container == getattr(make, "container", False)
    ]
    results = {
        "machine": machine(),
        "config": cfg,
        "command": "hybridmig bench " + " ".join(argv or []),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "runs": [],
    }
    console = Console(stderr=True)
    with (
        PipeMaxSize() as pipes,
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        task = progress.add_task("bench", total=len(plan))
        for make, link, rep, strategy in plan:
            progress.update(task, description="%s %s %s #%d" % (make().label, link, strategy, rep))
            with _machine_lock(cfg["lock"]):
                pipes.ensure()
                rec = one_run(make, strategy, link, rep, out, cfg["timeout"])
            results["runs"].append(rec)
            progress.console.print(_line(rec))
            (out / "results.json").write_text(json.dumps(results, indent=1))
            progress.advance(task)
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = report.write(results, out)
    print(summary)
    return 0


@contextlib.contextmanager
def _machine_lock(path):
    """flock(path) around one run: other benchmarks that take the same lock
    on a shared machine run between ours, not during them."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rotated(strategies, rep):
    """A different strategy goes first in each repetition: drift of the
    machine does not always favour the same one."""
    k = rep % len(strategies)
    return strategies[k:] + strategies[:k]


def _line(rec) -> str:
    head = "%s %s %s #%d" % (rec["config"], rec["link_rate"], rec["strategy"], rec["rep"])
    if not rec.get("ok"):
        # (an error may quote "[...]", which rich would read as markup)
        return "{}: [red]failed[/red]: {}".format(head, escape(str(rec.get("error"))))
    tp = rec["throughput"]["after_vs_before"]
    return "{}: blackout {:.0f} ms, {:.1f} MiB on the wire, {} remote faults, throughput after {}".format(
        head,
        rec["blackout_ms"],
        rec["wire_bytes"] / (1 << 20),
        rec.get("remote_faults", "-"),
        "-" if tp is None else "%.0f %%" % (100 * tp),
    )


if __name__ == "__main__":
    raise SystemExit(main())
