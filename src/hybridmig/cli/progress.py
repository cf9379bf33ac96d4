"""What `hybridmig run` shows on a terminal: one line per pre-copy round,
then the downtime breakdown."""

from rich.console import Console
from rich.table import Table


def _mib(n):
    return n / (1 << 20)


class RunProgress:
    def __init__(self, enabled=True):
        self.enabled = enabled
        self.console = Console(stderr=True)

    def update(self, kind, rnd):
        if not self.enabled or kind != "round":
            return
        self.console.print(
            "round %2d: %8d pages written, %8d sent (%7.1f MiB raw, %7.1f MiB on the wire) in %6.3f s; "
            "%sdirty %8.0f pages/s; est. downtime %7.1f ms%s%s"
            % (
                rnd.number,
                rnd.pages_written,
                rnd.pages_sent,
                _mib(rnd.bytes_raw),
                _mib(rnd.bytes_wire),
                rnd.duration_s,
                "%d hot (for the final round); " % rnd.pages_hot if rnd.pages_hot else "",
                rnd.dirty_rate_pps,
                rnd.est_downtime_ms,
                f"; throttled {rnd.throttle_pct:.0f} %" if rnd.throttle_pct else "",
                # (source/pacing.py: pre-copy gave way to the tree)
                f"; paced in {rnd.paced_windows} windows, the tree at {rnd.tree_cpu_share:.0%} of the CPU it asked for"
                if rnd.paced_windows
                else "",
            )
        )

    def summary(self, report):
        t = Table(title="migrated pid %d to %s" % (report["pid"], report["to"]))
        t.add_column("step")
        t.add_column("ms", justify="right")
        steps = dict(report["breakdown"])
        after = steps.pop("installing_after_resume_ms")
        for name, ms in steps.items():
            t.add_row(name.replace("_ms", "").replace("_", " "), f"{ms:.1f}")
        t.add_row("[b]downtime[/b]", "[b]{:.1f}[/b]".format(report["downtime_ms"]))
        t.add_row("(pages installing after resume)", f"{after:.1f}")
        self.console.print(t)
        self.console.print(
            "%d rounds, %.1f MiB sent, %d remote faults; restored as pid %s"
            % (len(report["rounds"]), _mib(report["bytes_sent"]), report["remote_faults"], report["restored_pid"])
        )
        pc = report.get("postcopy")
        if pc:
            lat = pc.get("remote_fault_latency_ms", {})
            self.console.print(
                "post-copy: %d pages pushed, %d remote faults (p50 %.2f ms, p99 %.2f ms, max %.2f ms); "
                "every page in %.2f s after the resume"
                % (
                    pc.get("pages_pushed", 0),
                    pc.get("remote_faults", 0),
                    lat.get("p50", 0.0),
                    lat.get("p99", 0.0),
                    lat.get("max", 0.0),
                    pc.get("post_resume_s") or 0.0,
                )
            )
        for warning in report["warnings"]:  # migrated all the same
            self.console.print(f"[yellow]warning:[/yellow] {warning}")
