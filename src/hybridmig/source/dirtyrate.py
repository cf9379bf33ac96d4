"""`hybridmig dirty-rate PID`: how fast a live process dirties its memory.

Attaches the dirty tracker the doctor picks, scans once per interval and
reports the distinct pages written in each (pages, pages/s, MiB/s), then
detaches: the rate pre-copy has to beat. VMAs that appear meanwhile (whole
new mappings, not writes) are counted apart as new_pages.
"""

import json
import time

import click

from ..errors import HybridmigError
from .tracker import PAGE_SIZE, DirtyTracker, pages_in

MIB = 1 << 20


def measure(tracker, interval, count):
    """Scan an attached tracker `count` times `interval` s apart, yielding
    one dict per interval as it ends."""
    last = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, last + interval - time.monotonic()))
        result = tracker.scan()
        now = time.monotonic()
        elapsed, last = now - last, now
        pages = result.written_pages
        yield {
            "interval": i + 1,
            "interval_s": round(elapsed, 6),
            "pages": pages,
            "pages_per_s": pages / elapsed,
            "mib_per_s": pages * PAGE_SIZE / MIB / elapsed,
            "new_pages": pages_in(result.new),
            "removed_pages": pages_in(result.removed),
            "pages_tracked": result.pages_scanned,
            "scan_ms": result.scan_s * 1e3,
        }


def _table(pid, method):
    from rich.table import Table

    table = Table(title="dirty rate of process %d (%s)" % (pid, method), title_justify="left")
    for name in ("#", "s", "pages", "pages/s", "MiB/s", "new", "removed", "scan ms"):
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _add_row(table, row):
    table.add_row(
        str(row["interval"]),
        "{:.3f}".format(row["interval_s"]),
        str(row["pages"]),
        "{:.0f}".format(row["pages_per_s"]),
        "{:.2f}".format(row["mib_per_s"]),
        str(row["new_pages"]),
        str(row["removed_pages"]),
        "{:.2f}".format(row["scan_ms"]),
    )


@click.command("dirty-rate")
@click.argument("pid", type=int)
@click.option(
    "--interval", type=click.FloatRange(min=0.001), default=1.0, show_default=True, help="seconds between scans"
)
@click.option("--count", type=click.IntRange(min=1), default=5, show_default=True, help="number of intervals")
@click.option(
    "--method",
    type=click.Choice(["uffd-wp", "soft-dirty"]),
    default=None,
    help="tracking method (default: what `hybridmig doctor` finds working)",
)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, one object per interval")
def dirty_rate(pid, interval, count, method, as_json):
    """Measure how many distinct pages process PID writes per interval.

    "pages" counts the distinct pages written in the interval; new VMAs
    (mapped meanwhile, sent whole by pre-copy) are counted apart."""
    try:
        with DirtyTracker(pid, method) as tracker:
            if as_json:
                click.echo(json.dumps(list(measure(tracker, interval, count)), indent=2))
            else:
                _render(tracker, interval, count)
    except HybridmigError as e:
        # An OSError's str() leads with "[Errno N]": the sentence is enough.
        click.echo("hybridmig: error: %s" % (getattr(e, "strerror", None) or e), err=True)
        raise SystemExit(1) from None


def _render(tracker, interval, count):
    from rich.console import Console
    from rich.live import Live

    console = Console()
    table = _table(tracker.pid, tracker.method)
    rows = []
    if console.is_terminal:  # rows appear as the intervals end
        with Live(table, console=console, auto_refresh=False) as live:
            for row in measure(tracker, interval, count):
                rows.append(row)
                _add_row(table, row)
                live.refresh()
    else:
        for row in measure(tracker, interval, count):
            rows.append(row)
            _add_row(table, row)
        console.print(table)
    total_s = sum(r["interval_s"] for r in rows)
    pages = sum(r["pages"] for r in rows)
    console.print(
        f"attaching stopped the target for {tracker.stop_ms:.3f} ms; mean {pages / total_s:.0f} pages/s ({pages * PAGE_SIZE / MIB / total_s:.2f} MiB/s) over {total_s:.2f} s"  # noqa: E501
    )
