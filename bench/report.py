"""The research bench's summary: a Markdown table per configuration (one
row per strategy: medians with min-max, ratios to stop-and-copy computed
within each repetition) and PNG plots."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BASELINE = "criu-stop-copy"
CONTAINER_BASELINE = "podman-stop-copy"


def _mmm(vals, fmt="%.0f", scale=1.0):
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt % m
    return (f"{fmt} ({fmt}–{fmt})") % (m, min(vals), max(vals))


def _groups(runs):
    """(config, link) -> strategy -> [runs], in the order first seen."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r["config"], r["link_rate"])][r["strategy"]].append(r)
    return groups


def _ratio(run, by_rep, key):
    base = by_rep.get(run["rep"])
    if not run.get("ok") or base is None or not base.get("ok") or not base.get(key):
        return None
    return run[key] / base[key]


def table(config, link, strategies) -> list:
    # a container's stop-and-copy is podman's own
    base = {r["rep"]: r for r in strategies.get(BASELINE, strategies.get(CONTAINER_BASELINE, []))}
    lines = [
        f"### {config} over {link}",
        "",
        "| strategy | ok | blackout ms | vs stop-and-copy | dump / copy / restore s | total s | wire MiB "
        "| pre-copy MB/s | remote faults | throughput after / before | source CPU s | dest. CPU s "
        "| dest. peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in strategies.items():
        good = [r for r in runs if r.get("ok")]
        ok = "%d/%d" % (len(good), len(runs))
        if not good:
            errors = sorted({(r.get("error") or "?")[:300] for r in runs})
            lines.append(
                "| {} | {} | failed: {} |  |  |  |  |  |  |  |  |  |  |".format(
                    name, ok, "; ".join(errors).replace("|", "/")
                )
            )
            continue
        phases = " / ".join(_mmm([r["phases"].get(p) for r in good], "%.2f") for p in ("dump", "copy", "restore"))
        if any("pre-copy" in r["phases"] for r in good):
            phases += " (pre-copy {})".format(_mmm([r["phases"]["pre-copy"] for r in good], "%.1f"))
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name,
                ok,
                _mmm([r["blackout_ms"] for r in good]),
                _mmm([_ratio(r, base, "blackout_ms") for r in good], "%.3f"),
                phases,
                _mmm([r["total_s"] for r in good], "%.1f"),
                _mmm([r["wire_bytes"] for r in good], "%.0f", 1 / (1 << 20)),
                _mmm([r.get("precopy_mb_s") for r in good]),
                _mmm([r.get("remote_faults") for r in good]),
                _mmm([r["throughput"]["after_vs_before"] for r in good], "%.0f %%", 100),
                _mmm([r["cpu_s"]["src"] for r in good], "%.1f"),
                _mmm([r["cpu_s"]["dst"] for r in good], "%.1f"),
                _mmm([r["dst_peak_rss_mb"] for r in good]),
            )
        )
    return lines + [""]


def _slope(points) -> str:
    """ ", +N ms/GiB": what a GiB more adds to the blackout, between the
    smallest and the largest size (empty with one size)."""
    lo, hi = min(points), max(points)
    if hi == lo:
        return ""
    return f", {(points[hi] - points[lo]) * 1024 / (hi - lo):+.0f} ms/GiB"


def plot_blackout(groups, path: Path):
    """Blackout against memory size, one line per strategy and link (memwork only)."""
    series = defaultdict(dict)
    for (_config, link), strategies in groups.items():
        for name, runs in strategies.items():
            good = [r for r in runs if r.get("ok") and r["workload"]["kind"] == "memwork"]
            if good:
                w = good[0]["workload"]
                key = "{}, {:g} pages/s, {}".format(name, w["rate"], link)
                series[key][w["size_mb"]] = statistics.median(r["blackout_ms"] for r in good)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, points in sorted(series.items()):
        sizes = sorted(points)
        ax.plot(sizes, [points[s] for s in sizes], marker="o", label=key + _slope(points))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workload memory (MiB)")
    ax.set_ylabel("blackout seen by the workload (ms)")
    ax.set_title("Blackout by strategy (memwork, median)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(config, link, strategies, path: Path):
    """The workload's throughput around resume (relative to before the migration), first repetition."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in strategies.items():
        good = [r for r in runs if r.get("ok") and r["throughput"]["series"]]
        if not good:
            continue
        tp = good[0]["throughput"]
        xs = [tp["series_start_s"] + 0.1 * i for i in range(len(tp["series"]))]
        ax.plot(xs, tp["series"], label=name, drawstyle="steps-post")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("seconds since resume")
    ax.set_ylabel("throughput / throughput before the migration")
    ax.set_title(f"{config} over {link}: throughput around resume")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_wire(groups, path: Path):
    """Bytes on the wire per configuration and strategy (median)."""
    configs = list(groups)
    names = sorted({n for s in groups.values() for n in s})
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(configs)), 4.5))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = []
        for key in configs:
            good = [r for r in groups[key].get(name, []) if r.get("ok")]
            vals.append(statistics.median(r["wire_bytes"] for r in good) / (1 << 20) if good else 0)
        ax.bar([i + k * width for i in range(len(configs))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels(["{}\n{}".format(*c) for c in configs], fontsize="x-small")
    ax.set_ylabel("MiB on the wire (both directions)")
    ax.set_title("Bytes on the wire (median; 0: failed)")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict, out: Path) -> str:
    groups = _groups(results["runs"])
    m = results["machine"]
    lines = [
        "# hybridmig bench",
        "",
        "`{}`, {} to {}.".format(results["command"], results["started"], results.get("finished", "?")),
        "",
        "Machine: {}, {} CPUs, {} GiB, kernel {}, {}.".format(
            m["cpu"], m["cpus"], m["mem_gib"], m["kernel"], m["criu"]
        ),
        "",
        "Blackout: the longest pause of the workload's own loop (CLOCK_REALTIME). Ratios to "
        f"{BASELINE} ({CONTAINER_BASELINE} for a container) are taken within each repetition. Medians, with "
        "min–max when repeated.",
        "",
    ]
    for (config, link), strategies in groups.items():
        lines += table(config, link, strategies)
        name = f"throughput-{config}-{link}.png"
        plot_throughput(config, link, strategies, out / name)
        lines += [f"![throughput]({name})", ""]
    plot_blackout(groups, out / "blackout.png")
    plot_wire(groups, out / "wire.png")
    lines += ["![blackout](blackout.png)", "", "![wire](wire.png)", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text
