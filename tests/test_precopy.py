"""Pre-copy rounds into a real destination session: after the last round,
with the workload frozen, the destination's store holds exactly the
source's memory, page by page, for every tracked (private anonymous) page."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hybridmig import wire
from hybridmig.destination.serve import Session
from hybridmig.source.converge import AutoConverge, hold_s, share_of_hold, slowed_down
from hybridmig.source.precopy import PAGE_SIZE, PreCopy, Round, Sender, Throttle, ns_pid, track
from hybridmig.source.tracker import TreeTracker
from hybridmig.testing.workload import Workload
from test_tracker import DirtySet, _need_uffd_wp

KEY = b"s" * 32


@pytest.fixture
def session(tmp_path):
    """A destination Session on one end of a socketpair; the source's Channel on the other."""
    a, b = socket.socketpair()
    dest, src = wire.Channel(a, "source"), wire.Channel(b, "destination")
    t = threading.Thread(target=dest.server_handshake, args=(KEY,))
    t.start()
    src.client_handshake(KEY)
    t.join(10)
    s = Session(dest, str(tmp_path))
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=s.run()), daemon=True)
    runner.start()
    yield s, src
    src.send(wire.Msg.ABORT)  # ends the session loop (nothing was restored)
    runner.join(10)
    src.close()
    s.cleanup()


def wait_stopped(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(st == "T" for st in states):
            return
        assert time.monotonic() < deadline, "pid %d did not stop: %s" % (pid, states)
        time.sleep(0.001)


def read_mem(pid, addr, n):
    with open("/proc/%d/mem" % pid, "rb") as f:
        f.seek(addr)
        return f.read(n)


def final_round(tracker, sender, precopy, pids):
    """Freeze the tree (SIGSTOP; SIGCONT is the caller's), then the last
    round as `hybridmig run` sends it: what was carried, what was written
    since, and the hot pages. Returns the tracked VMAs."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:  # SIGSTOP is asynchronous: a write may still land until every thread stopped
        wait_stopped(pid)
    final = Round(len(precopy.rounds))
    for pid, res in tracker.scan().items():
        sender.send_ranges(pid, res.owed + list(precopy.pending.get(pid, [])), final)
    return tracker.vmas()


def precopy_then_final(channel, pid, throttle=None, auto_converge=False, **precopy_args):
    """Pre-copy rounds of the tree pid as `hybridmig run` makes them, then
    final_round(); returns (rounds, precopy, sender, vmas, pids)."""
    tracker = track(pid)
    tracker.attach()
    converge = AutoConverge(tracker.pids) if auto_converge else None
    try:
        pids = tracker.pids()
        sender = Sender(channel, {p: ns_pid(p) for p in pids}, throttle=throttle)
        precopy = PreCopy(tracker, sender, converge=converge, **precopy_args)
        rounds = precopy.run()
        if converge is not None:
            converge.stop()  # (a hold would keep SIGSTOP from stopping the tree)
        vmas = final_round(tracker, sender, precopy, pids)
    finally:
        if converge is not None:
            converge.stop()
        tracker.detach()
    return rounds, precopy, sender, vmas, pids


def assert_store_equals_memory(store_session, channel, sender, vmas):
    """Every tracked page of the (frozen) source is in the destination's
    store, equal; returns how many were checked."""
    # a round marker orders the check after every page is stored
    channel.send(wire.Msg.ROUND, Round(99).encode())
    assert channel.recv()[0] == wire.Msg.ROUND_ACK
    store = store_session.store
    checked = 0
    for pid, ranges in vmas.items():
        key = sender.keys[pid]
        for start, end in ranges:
            for addr in range(start, end, PAGE_SIZE):
                mem = read_mem(pid, addr, PAGE_SIZE)
                kind, data = store.get(key, addr)
                expect = data if data is not None else bytes(PAGE_SIZE)
                assert kind != 0, "pid %d page 0x%x was never sent" % (pid, addr)
                assert expect == mem, "pid %d page 0x%x differs from the source" % (pid, addr)
                checked += 1
    return checked


@pytest.mark.usefixtures("criu_ready")
@pytest.mark.parametrize("threads", [1, 4])
def test_store_equals_source_memory_after_rounds(session, threads):
    store_session, channel = session
    with Workload.start(64, threads=threads, procs=2, rate=3000) as wl:
        rounds, _, sender, vmas, pids = precopy_then_final(channel, wl.host_pid, max_rounds=4, target_downtime_ms=0.0)
        assert len(rounds) >= 2 and rounds[0].pages_sent > 0
        checked = assert_store_equals_memory(store_session, channel, sender, vmas)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        assert checked >= 2 * 64 * 256
        assert all(r["bad"] == 0 for r in wl.verify())


@pytest.mark.usefixtures("criu_ready")
def test_a_fitting_dirty_set_still_gets_its_own_round(session):
    """After round 0 the dirty set of a slow writer fits the default target,
    but sending it as a round of its own (while the process runs) leaves far
    less for the blackout: rounds go on until another would not halve it."""
    store_session, channel = session
    # 20 MB/s: round 0 takes ~3.4 s, in which ~700 pages get dirty, ~140 ms
    # to send: within the target, and another round would leave ~30 pages.
    with Workload.start(64, rate=200) as wl:
        tracker = TreeTracker(wl.host_pid)
        tracker.attach()
        try:
            sender = Sender(channel, {p: ns_pid(p) for p in tracker.pids()}, throttle=Throttle(20_000_000))
            rounds = PreCopy(tracker, sender, max_rounds=10, target_downtime_ms=300.0).run()
        finally:
            tracker.detach()
    assert len(rounds) >= 3, [r.as_dict() for r in rounds]
    assert 5 < rounds[1].est_downtime_ms <= 300, rounds[1].as_dict()
    first_dirty, last = rounds[1], rounds[-1]
    assert first_dirty.pages_sent == first_dirty.pages_written > 0  # sent, not carried
    assert last.pages_sent == 0 and last.pages_written < first_dirty.pages_written / 2


# --- hot pages ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("criu_ready")
def test_pages_written_continuously_travel_in_the_final_round_only(session):
    """A writer rewrites a quarter of its 64 MiB without pause: once found
    written in two scans in a row those 4096 pages are hot, owed and counted
    in every estimate, but no round sends them again; the final round does,
    and the destination ends with exactly the source's memory."""
    store_session, channel = session
    hot_pages = 64 * 256 // 4
    with Workload.start(64, rate=0, hot=25) as wl:
        # ahead of the scans and sends for a CPU: a writer starved for the
        # few ms between two scans (a loaded machine) wrote nothing in them
        for pid in wl.pids():
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), -15)
        rounds, precopy, sender, vmas, _ = precopy_then_final(
            channel, wl.host_pid, max_rounds=8, target_downtime_ms=0.0
        )
        checked = assert_store_equals_memory(store_session, channel, sender, vmas)
        os.kill(wl.host_pid, signal.SIGCONT)
        assert checked >= 64 * 256
        assert all(r["bad"] == 0 for r in wl.verify())
    table = [r.as_dict() for r in rounds]
    assert rounds[1].pages_sent >= hot_pages and rounds[1].pages_hot == 0, table  # found once: sent
    later = rounds[2:]
    assert later and all(r.pages_hot >= hot_pages for r in later), table
    assert all(r.pages_sent < hot_pages / 8 for r in later), table  # not again
    # the estimate of the final round counts them (at the bandwidth known when it was made)
    assert all(
        r.est_downtime_ms == pytest.approx(r.pages_owed * PAGE_SIZE / prev.bandwidth_bps * 1000)
        for prev, r in zip(rounds[1:], later, strict=False)
    ), table
    assert len(rounds) <= 5, table  # the hot set does not shrink: stalled


@pytest.mark.root
@pytest.mark.usefixtures("criu_ready")
def test_a_hot_run_that_cools_is_sent_once_then_tracked_exactly(session):
    """A run of 128 pages written round after round is hot (not sent); it
    stops being written, a probe protects it, the next round finds it cold
    and sends it, and from then on only the pages written are sent."""
    _need_uffd_wp()
    store_session, channel = session
    with DirtySet() as ds:
        rid, region = ds.map(192)
        run = "touch %d %s" % (rid, ",".join(map(str, range(128))))
        ds.pages(run)
        tracker = track(ds.pid)
        tracker.attach()
        try:
            sender = Sender(channel, {ds.pid: ds.pid})
            precopy = PreCopy(tracker, sender)
            precopy.first_round()
            probe = tracker.trackers[ds.pid]
            probe.probe_period_s = 1e9
            sent = []
            for number, write, period in (
                (1, run, 1e9),
                (2, run, 1e9),
                (3, run, 1e9),
                (4, None, 1e-9),
                (5, None, 1e9),
                (6, "touch %d 3,4,100" % rid, 1e9),
            ):
                if write:
                    ds.pages(write)
                probe.probe_period_s = period
                rnd = precopy.round(number)
                sent.append((rnd.pages_sent, rnd.pages_hot))
            vmas = final_round(tracker, sender, precopy, [ds.pid])
        finally:
            tracker.detach()
        assert_store_equals_memory(store_session, channel, sender, {ds.pid: [region]})
        os.kill(ds.pid, signal.SIGCONT)
        assert vmas
    # (the command loop's own stack and buffers add a few pages a round)
    slack = 16
    assert 128 <= sent[0][0] < 128 + slack and sent[0][1] == 0, sent  # written once: sent
    assert sent[1][0] < slack and sent[1][1] == 128, sent  # twice: hot
    assert sent[2][0] < slack and sent[2][1] == 128, sent
    assert sent[3][0] < slack and sent[3][1] == 128, sent  # probed: still owed
    assert 128 <= sent[4][0] < 128 + slack and sent[4][1] == 0, sent  # cold: sent once
    assert 3 <= sent[5][0] < 3 + slack and sent[5][1] == 0, sent  # exact again


@pytest.mark.usefixtures("criu_ready")
@pytest.mark.timeout(120)
def test_auto_converge_drops_the_hot_set_so_throttling_shows(session):
    """A quarter of 64 MiB rewritten at 20000 pages/s over a 20 MB/s link:
    the quarter gets hot, owed (16 MiB, 0.8 s: over the target), not
    shrinking, so auto-converge throttles; the tracker then drops the hot
    set, tracks exactly, and the rounds shrink as the holds grow until the
    final round fits."""
    store_session, channel = session
    with Workload.start(64, rate=20000, hot=25) as wl:
        rounds, _, sender, vmas, _ = precopy_then_final(
            channel, wl.host_pid, Throttle(20_000_000), True, max_rounds=30, target_downtime_ms=300.0
        )
        assert_store_equals_memory(store_session, channel, sender, vmas)
        os.kill(wl.host_pid, signal.SIGCONT)
        assert all(r["bad"] == 0 for r in wl.verify())
    table = [(r.number, r.pages_written, r.pages_hot, r.pages_sent, round(r.throttle_pct)) for r in rounds]
    first_throttled = next(i for i, r in enumerate(rounds) if r.throttle_pct)
    assert any(r.pages_hot for r in rounds[:first_throttled]), table  # hot before throttling
    assert rounds[first_throttled].pages_sent >= 64 * 256 // 4, table  # dropped: sent, exact from then on
    assert all(r.pages_hot == 0 for r in rounds[first_throttled:]), table
    assert rounds[-1].pages_owed < 0.5 * 64 * 256 // 4, table  # shrunk under throttling


def test_throttle_steps():
    """10 more points after a raise that slowed the writes as it should;
    holds 4 times as long after one that did not (a writer catching up on
    short holds), up to 99 %."""
    assert slowed_down(10000, 0.2, 7000, 0.4)  # 0.75 expected, 0.7 seen
    assert not slowed_down(10000, 0.2, 9500, 0.4)  # catching up
    assert slowed_down(10000, 0.4, 12000, 0.4)  # no raise: nothing to judge
    converge = AutoConverge(lambda: [])
    try:
        steps = []
        for slowed in (True, True, False, False, True, False, False):
            converge.raise_throttle(slowed)
            steps.append(round(converge.share * 100))
        # 20; +10; holds of 8.6 ms x 4 = 34 ms; x 4 = 137 ms; +10; x 4, capped
        assert steps == [20, 30, 63, 87, 97, 99, 99], steps
        assert hold_s(share_of_hold(0.08)) == pytest.approx(0.08)
    finally:
        converge.stop()


HOLDER = """
import ctypes, os, sys
PAGE = 4096
n = int(sys.argv[1])
line = b"%08d some text that compresses, "  # 36 bytes
# exactly n pages: assigning a shorter slice below would shrink mem
text = b"".join(line % i for i in range(n * PAGE // 36 + 1))[: n * PAGE]
# [text][random][zero pages, every other one][text], each region n pages
mem = bytearray(4 * n * PAGE + PAGE)
base = -ctypes.addressof(ctypes.c_char.from_buffer(mem)) % PAGE
mem[base : base + n * PAGE] = text
mem[base + n * PAGE : base + 2 * n * PAGE] = os.urandom(n * PAGE)
for i in range(1, n, 2):
    mem[base + (2 * n + i) * PAGE : base + (2 * n + i + 1) * PAGE] = os.urandom(PAGE)
mem[base + 3 * n * PAGE : base + 4 * n * PAGE] = text
print(ctypes.addressof(ctypes.c_char.from_buffer(mem)) + base, flush=True)
sys.stdin.read()
"""


@pytest.mark.root
def test_lz4_only_where_a_sample_compresses(session):
    """Random frames skip lz4 (the probe says so), text frames use it; zero
    pages travel as flags; the store equals the memory page by page, and the
    round's counters say which frames were compressed."""
    store_session, channel = session
    n = 512  # 2 frames per region
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        base = int(holder.stdout.readline())
        sender = Sender(channel, {holder.pid: 1}, frame_pages=256)
        regions = {}
        for name, i in (("text", 0), ("random", 1), ("half zero", 2)):
            rnd = Round(0)
            sender.send_ranges(holder.pid, [(base + i * n * PAGE_SIZE, base + (i + 1) * n * PAGE_SIZE)], rnd)
            regions[name] = rnd
        whole = Round(0)  # all four regions in one call: frames mix them
        sender.send_ranges(holder.pid, [(base, base + 4 * n * PAGE_SIZE)], whole)
        checked = assert_store_equals_memory(
            store_session, channel, sender, {holder.pid: [(base, base + 4 * n * PAGE_SIZE)]}
        )
    finally:
        holder.kill()
        holder.wait(10)
    assert checked == 4 * n
    text, rand, half = regions["text"], regions["random"], regions["half zero"]
    assert text.frames == text.frames_lz4 == 2 and text.bytes_wire < text.bytes_raw / 3
    assert rand.frames == 2 and rand.frames_lz4 == 0 and rand.bytes_wire >= rand.bytes_raw
    assert half.pages_zero == n // 2 and half.bytes_raw == n // 2 * PAGE_SIZE and half.frames_lz4 == 0
    # frames hold 256 pages, zero pages included: the regions' frames do not mix
    assert whole.pages_sent == 4 * n and whole.frames == 8 and whole.frames_lz4 == 4
