"""Pre-copy rounds into a real destination session: after the last round,
with the workload frozen, the destination's store holds exactly the
source's memory, page by page, for every tracked (private anonymous) page."""
import os
import signal
import socket
import threading
import time

import pytest

from hybridmig import wire
from hybridmig.precopy import PAGE_SIZE, PreCopy, Round, Sender, Throttle, ns_pid
from hybridmig.serve import Session
from hybridmig.tracker import TreeTracker
from hybridmig.workload import Workload

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


@pytest.mark.usefixtures("criu_ready")
@pytest.mark.parametrize("threads", [1, 4])
def test_store_equals_source_memory_after_rounds(session, threads):
    store_session, channel = session
    with Workload.start(64, threads=threads, procs=2, rate=3000) as wl:
        tracker = TreeTracker(wl.host_pid)
        tracker.attach()
        try:
            pids = tracker.pids()
            sender = Sender(channel, {p: ns_pid(p) for p in pids})
            precopy = PreCopy(tracker, sender, max_rounds=4, target_downtime_ms=0.0)
            rounds = precopy.run()
            assert len(rounds) >= 2 and rounds[0].pages_sent > 0
            # freeze the tree, then the last round: what was carried and what
            # was written since
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            for pid in pids:  # SIGSTOP is asynchronous: a write may still land until every thread stopped
                wait_stopped(pid)
            final = Round(len(rounds))
            for pid, res in tracker.scan().items():
                sender.send_ranges(pid, list(res.dirty) + list(precopy.pending.get(pid, [])), final)
            vmas = tracker.vmas()
        finally:
            tracker.detach()
        # a round marker orders the check after every page is stored
        channel.send(wire.Msg.ROUND, wire.encode_round(99, {}))
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
