"""The research bench (`hybridmig bench`): its throughput arithmetic, the
memwork hot set it relies on, and a quick configuration end to end with the
real CRIU and hybridmig, producing valid JSON, Markdown and PNG files."""

import json
import subprocess
import time

import psutil
import pytest

from hybridmig import doctor
from hybridmig.bench.research import one_run, ops_rate, throughput
from hybridmig.bench.strategies import STRATEGIES, StopAndCopy
from hybridmig.bench.trial import StrategyError
from hybridmig.bench.workloads.base import Finish
from hybridmig.bench.workloads.memwork import Memwork
from hybridmig.source.tracker import PAGE_SIZE, UFFD_WP, DirtyTracker
from hybridmig.testing.workload import Workload, become_subreaper
from lazy_util import HYBRIDMIG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finish(ops, start=1000.0, gap_ms=0.0, gap_end=None):
    return Finish(ok=True, detail="", max_gap_ms=gap_ms, max_gap_end=gap_end, timeline_start=start, timeline_ops=ops)


def test_ops_rate_counts_partial_buckets_pro_rata():
    fin = _finish([10] * 10 + [20] * 10)  # 100 ops/s for 1 s, then 200 ops/s
    assert ops_rate(fin, 1000.0, 1001.0) == pytest.approx(100)
    assert ops_rate(fin, 1000.5, 1001.5) == pytest.approx(150)
    assert ops_rate(fin, 1000.05, 1000.15) == pytest.approx(100)
    assert ops_rate(fin, 999.0, 1000.5) is None  # before what the workload remembers
    assert ops_rate(fin, 1001.5, 1002.5) is None  # after it


def test_throughput_around_the_blackout():
    # 4 s at 100 ops/s, a 1 s blackout, then 50 ops/s for 3 s.
    ops = [10] * 40 + [0] * 10 + [5] * 30
    fin = _finish(ops, gap_ms=1000.0, gap_end=1005.0)
    tp = throughput(fin, resumed_at=0, started_at=1004.0)
    assert tp["freeze"] == pytest.approx(1004.0) and tp["resume"] == pytest.approx(1005.0)
    assert tp["ops_per_s_before"] == pytest.approx(100)
    assert tp["ops_per_s_after"] == pytest.approx(50)
    assert tp["after_vs_before"] == pytest.approx(0.5)
    # The series starts 1 s before resume: inside the blackout, then half speed.
    assert tp["series"][:10] == [0.0] * 10 and tp["series"][10:40] == [0.5] * 30
    assert tp["series"][40:] == [None] * 10  # past the end of the timeline


@pytest.mark.root
def test_memwork_hot_set_confines_the_writes():
    if doctor.dirty_tracker() != UFFD_WP:
        pytest.skip(f"needs the uffd-wp dirty tracker: {doctor.uffd_wp_path().reason}")
    with Workload.start(64, rate=0, hot=10) as wl:
        first, last = wl.page_address(0), wl.page_address(64 * 256 - 1)
        with DirtyTracker(wl.host_pid) as tracker:
            tracker.scan()
            time.sleep(0.5)
            written = [(s, e) for s, e in tracker.scan().written if s <= last and e > first]
        assert written, "the unthrottled writer wrote nothing in 0.5 s"
        hot_end = first + (64 * 256 // 10) * PAGE_SIZE
        assert all(e <= hot_end for s, e in written), (written, hex(hot_end))
        assert wl.verify()[0]["bad"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_bench_end_to_end(criu_ready, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        # memwork as a process, and in a podman container (its own strategies: podman-stop-copy, hybridmig-container)
        [*HYBRIDMIG, "bench", "--quick", "--workloads", "memwork,podman", "--sizes", "64", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["strategy"]: r for r in results["runs"]}
    assert set(runs) == set(STRATEGIES)
    for name, run in runs.items():
        if name == "criu-pre-dump" and not doctor.check_soft_dirty().ok:
            # Where the kernel has no soft-dirty, CRIU's reason is the result
            # and the source kept running intact.
            assert not run["ok"] and "Tracking memory is not available" in run["error"], run
            assert run["check"]["ok"], run
            continue
        assert run["ok"], (name, run.get("error"))
        assert run["check"]["ok"] and "0 bad" in run["check"]["detail"]
        assert run["blackout_ms"] > 0 and run["wire_bytes"] >= 64 << 20, run
        assert run["throughput"]["ops_per_s_before"] > 0
        assert set(run["phases"]) >= {"dump", "copy", "restore"}
        assert run["cpu_s"]["src"] > 0 and run["cpu_s"]["dst"] > 0
    for name in ("hybridmig", "hybridmig-container"):
        assert runs[name]["remote_faults"] == 0 and runs[name]["rounds"] >= 1, runs[name]
    assert runs["podman-stop-copy"]["workload"]["kind"] == "podman-memwork"
    assert runs["criu-post-copy"]["remote_faults"] > 0  # the workload faulted its pages over the link
    per_run = list((out / "runs").rglob("*.json"))
    assert len(per_run) == len(STRATEGIES) and all(json.loads(p.read_text()) for p in per_run)
    summary = (out / "summary.md").read_text()
    for name in STRATEGIES:
        assert f"| {name} |" in summary
    pngs = list(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"blackout.png", "wire.png"} and len(pngs) == 4  # a throughput plot each
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10000, png
    # --summarize draws it all again from results.json alone
    for path in pngs + [out / "summary.md"]:
        path.unlink()
    proc = subprocess.run(
        [*HYBRIDMIG, "bench", "--summarize", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.md").read_text() == summary and len(list(out.glob("*.png"))) == 4


class _FailsAfterRestore(StopAndCopy):
    """Stop-and-copy that fails once the destination's copy runs."""

    name = "test-fails-after-restore"
    restored_pid = None

    def migrate(self, trial):
        outcome = super().migrate(trial)
        type(self).restored_pid = outcome.new_pid
        raise StrategyError("injected failure after the restore")


@pytest.mark.timeout(300)
def test_a_copy_restored_before_a_failure_is_not_left_running(criu_ready, tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, _FailsAfterRestore.name, _FailsAfterRestore)
    become_subreaper()  # as the bench: restored roots are re-parented to us
    rec = one_run(lambda: Memwork(32), _FailsAfterRestore.name, "1gbit", 0, tmp_path, 120)
    assert not rec["ok"] and "injected failure after the restore" in rec["error"], rec
    pid = _FailsAfterRestore.restored_pid
    assert pid is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
