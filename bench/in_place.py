"""Benchmark: the switch-over's blackout against the memory size, CRIU as
released (plus scripts/criu-patches/0001) against CRIU with
--lazy-pages-in-place (0002).

    .venv/bin/python -m bench.in_place --before CRIU_A --after CRIU_B [--sizes 1024,4096] [--pairs 3]

memwork of each size, 1 writer at --rate pages/s (2000), migrated with
`hybridmig run` over a veth shaped to --link (10gbit) by bench.precopy's
one_migration (restored tree verified page by page). Each pair runs the two
CRIUs one after the other at every size, the order alternating from pair to
pair; the numbers are medians over the pairs, and the per-GiB slope of each
variant is (median at the largest size - median at the smallest) / GiB
between them, with the blackout it projects at 16 and 64 GiB. Results:
OUT/results.json, OUT/results.md (also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hybridmig.testing.workload import become_subreaper

from . import lazy_pages
from .precopy import one_migration
from .research import PipeMaxSize

KEYS = ("downtime_ms", "freeze_to_dumped_ms")
PHASES = ("seize", "namespaces", "vmas", "parasite", "pagemap", "page_pipes", "images", "hooks_and_rest")


def med(vals):
    return statistics.median(vals) if vals else float("nan")


def metrics(rec):
    if rec.get("error") or rec.get("bad"):
        return None
    out = {"downtime_ms": rec["downtime_ms"], "freeze_to_dumped_ms": rec["breakdown"]["freeze_to_dumped_ms"]}
    out.update({f"phase_{k}": v for k, v in (rec.get("criu_dump_phases_ms") or {}).items()})
    return out


def summarize(results, sizes):
    lines = ["| variant | size | n | blackout ms (median, min-max) | freeze-to-dumped ms | CRIU phases ms (medians) |"]
    lines.append("|---|---|---|---|---|---|")
    slopes = {}
    for variant in ("before", "after"):
        meds = {}
        for size in sizes:
            ms = [m for r in results if r["variant"] == variant and r["size_mb"] == size for m in [metrics(r)] if m]
            if not ms:
                continue
            d = [m["downtime_ms"] for m in ms]
            f = [m["freeze_to_dumped_ms"] for m in ms]
            meds[size] = (med(d), med(f))
            ph = ", ".join(
                "%s %.1f" % (k, med([m[f"phase_{k}"] for m in ms if f"phase_{k}" in m]))
                for k in PHASES
                if any(f"phase_{k}" in m for m in ms)
            )
            lines.append(
                f"| {variant} | {size} MiB | {len(ms)} | {med(d):.0f} ({min(d):.0f}-{max(d):.0f}) | "
                f"{med(f):.0f} ({min(f):.0f}-{max(f):.0f}) | {ph} |"
            )
        if len(meds) >= 2:
            lo, hi = min(meds), max(meds)
            gib = (hi - lo) / 1024
            slope = (meds[hi][0] - meds[lo][0]) / gib
            fslope = (meds[hi][1] - meds[lo][1]) / gib
            base = meds[lo][0] - slope * lo / 1024
            slopes[variant] = {
                "blackout_per_gib_ms": slope,
                "freeze_to_dumped_per_gib_ms": fslope,
                "ratio_largest_to_smallest": meds[hi][0] / meds[lo][0],
                "projected_16gib_ms": base + 16 * slope,
                "projected_64gib_ms": base + 64 * slope,
            }
    lines.append("")
    lines.append("| variant | blackout ms/GiB | freeze-to-dumped ms/GiB | largest/smallest | at 16 GiB | at 64 GiB |")
    lines.append("|---|---|---|---|---|---|")
    for v, s in slopes.items():
        lines.append(
            f"| {v} | {s['blackout_per_gib_ms']:.1f} | {s['freeze_to_dumped_per_gib_ms']:.1f} | "
            f"{s['ratio_largest_to_smallest']:.2f}x | "
            f"{s['projected_16gib_ms']:.0f} ms | {s['projected_64gib_ms']:.0f} ms |"
        )
    return "\n".join(lines), slopes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="CRIU as released plus 0001 (e.g. /usr/local/sbin/criu)")
    ap.add_argument("--after", required=True, help="CRIU with --lazy-pages-in-place")
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--link", default="10gbit")
    ap.add_argument("--out", default="bench-in-place")
    ap.add_argument(
        "--pipe-max-size",
        action="store_true",
        help="raise fs.pipe-max-size to 4 MiB for the run, as `hybridmig bench` does (CRIU's page pipes "
        "are then 4 MiB, not 1: a quarter of the pipes)",
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    tmp_root = Path(tempfile.mkdtemp(prefix="hm-ip-", dir="/tmp"))
    results = []
    doc = {"machine": lazy_pages.machine_info(), "args": vars(args), "results": results}
    saved = os.environ.get("CRIU")
    pipes = PipeMaxSize() if args.pipe_max_size else contextlib.nullcontext()
    try:
        pipes.__enter__()
        doc["pipe_max_size"] = Path("/proc/sys/fs/pipe-max-size").read_text().strip()
        for pair in range(args.pairs):
            order = ("before", "after") if pair % 2 == 0 else ("after", "before")
            for size in sizes:
                for variant in order:
                    if args.pipe_max_size:
                        pipes.ensure()
                    os.environ["CRIU"] = getattr(args, variant)
                    t = time.monotonic()
                    rec = one_migration(size, args.rate, tmp_root, logs, 600, link=args.link)
                    rec.update(variant=variant, pair=pair, criu=os.environ["CRIU"], wall_s=time.monotonic() - t)
                    results.append(rec)
                    m = metrics(rec)
                    print(
                        f"pair {pair} {variant:6} {size:5} MiB: "
                        + (
                            f"blackout {m['downtime_ms']:.0f} ms, freeze-to-dumped {m['freeze_to_dumped_ms']:.0f} ms"
                            if m
                            else f"FAILED {rec.get('error')} bad={rec.get('bad')}"
                        ),
                        flush=True,
                    )
                    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    finally:
        pipes.__exit__(None, None, None)
        if saved is None:
            os.environ.pop("CRIU", None)
        else:
            os.environ["CRIU"] = saved
        shutil.rmtree(tmp_root, ignore_errors=True)
    table, slopes = summarize(results, sizes)
    doc["slopes"] = slopes
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
