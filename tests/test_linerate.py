"""Pre-copy's data path at full speed (issue 16): page-verified migrations
of compressible and incompressible memory with the reader threads on both
ends, a connection cut in the middle of round 0, and a destination that
reads slowly (backpressure: the source's memory stays bounded)."""

import ctypes
import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

import test_migrate
import test_precopy
from hybridmig import wire
from hybridmig.errors import ProcessGone
from hybridmig.source.precopy import FRAME_PAGES, PAGE_SIZE, Round, Sender
from hybridmig.testing.workload import MEMWORK_SRC, build_program
from migrate_util import PORT, RELAY, Serve, rss_during_precopy, wait_for
from test_lz4_probe import assert_lz4_as_probed
from test_migrate import assert_intact, assert_migrated, assert_rolled_back

env = test_migrate.env  # the fixture: two hosts, a key, a cleanup
session = test_precopy.session  # the fixture: a destination Session and the source's Channel


@pytest.fixture
def threads_on(monkeypatch):
    """The data path's threads (cpus.py) in run, serve and this process,
    whatever the machine: a 2-CPU machine goes without them."""
    monkeypatch.setenv("HYBRIDMIG_DATA_THREADS", "1")


def _relay(env, mode, arg):
    h = env.hosts
    proc = subprocess.Popen(
        h.run_in(h.dst) + [sys.executable, RELAY, h.dst_addr, str(PORT + 1), str(PORT), mode, str(arg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    env.cleanup.kill_pid_tree(proc.pid)
    env.cleanup.add(proc.wait, 10)
    assert proc.stdout.readline().strip() == "listening"  # bounded: it prints at once or dies
    return proc, "%s:%d" % (h.dst_addr, PORT + 1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "memory,threads", [("incompressible", "1"), ("compressible", "1"), ("incompressible", "0"), ("compressible", "0")]
)
def test_page_verified_migration(env, memory, threads, tmp_path, monkeypatch):
    """Round 0 with and without the data path's threads on both ends; every
    page verified after the restore. Random memory skips lz4 (the sample),
    compressible memory goes as the lz4 probe chose; the destination stored as many
    frames as were sent (its ROUND_ACK stats)."""
    monkeypatch.setenv("HYBRIDMIG_DATA_THREADS", threads)
    # memwork as this checkout has it (--compressible), not the shared build
    binary = build_program(MEMWORK_SRC, "memwork", tmp_path / "bin")
    wl = env.workload(128, threads=2, rate=1000, compressible=memory == "compressible", binary=binary)
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid)
    assert_migrated(env, wl, rc, rep, err, serve, 128, compressed=memory == "compressible")
    r0 = rep["rounds"][0]
    assert r0["dest_frames"] == r0["frames"] > 0, r0
    assert (r0["read_ahead_s"] > 0) == (threads == "1"), r0  # round 0's large ranges: by the reader thread
    assert 0 < r0["dest_cpu_s"] and 0 <= r0["dest_open_s"] and 0 < r0["dest_store_s"], r0
    if memory == "compressible":
        assert_lz4_as_probed(rep)
    else:
        # (the few compressed frames: the libraries, the stacks)
        assert r0["frames_lz4"] < r0["frames"] / 4 and r0["bytes_wire"] >= 0.95 * r0["bytes_raw"], r0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["sealed", "plaintext"])
@pytest.mark.usefixtures("threads_on")
def test_connection_cut_mid_round(env, mode):
    """The connection is reset in the middle of round 0, at full speed, with
    the reader threads busy on both ends: the round fails (run exits non-zero
    with the JSON failure), the source resumes intact and untracked, serve
    ends the session and serves the next source (not retried by run: a
    migration is started again by whoever asked for it)."""
    extra = ["--insecure-plaintext"] if mode == "plaintext" else []
    wl = env.workload(256, threads=2, rate=1000)
    pids = wl.pids()
    serve = Serve(
        env.hosts,
        env.hosts.dst,
        env.hosts.dst_addr,
        env.new_dir("serve"),
        env.key,
        env.cleanup,
        env.tmp,
        once=False,
        extra=extra,
    ).wait_listening()
    relay, to = _relay(env, "cut", 96 << 20)
    t0 = time.monotonic()
    rc, rep, err = env.run(wl.host_pid, *extra, to=to, timeout=120)
    assert time.monotonic() - t0 < 60, "run took long to notice the reset"
    assert "cut after" in relay.stdout.readline()
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "lost" in error or "closed" in error or "reset" in error, error
    wait_for(lambda: "broke" in serve.log(), 30, "serve to end the broken session")
    # the same serve takes the next migration of the same, resumed source
    rc, rep, err = env.run(wl.host_pid, *extra)
    serve.proc.poll()
    assert rc == 0 and rep["result"] == "migrated", err
    env.cleanup.kill_pid_tree(rep["restored_pid"])
    new = env.adopt(rep["restored_pid"], wl)
    assert_intact(new.verify(), 1)


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("threads_on")
def test_slow_destination_backpressure(env):
    """The link carries run's bytes at 24 MB/s (a relay that reads slowly):
    run's sends block, its reader thread waits for a free frame buffer, and
    its memory stays bounded (a few MiB over its size before round 0)
    while round 0 takes seconds; serve's memory grows by the pages it
    stores, not more; the migration completes, every page verified."""
    backpressure(env, "slow", 24_000_000)


def backpressure(env, mode, rate, *extra):
    """A migration of 96 MiB through a relay in `mode` ("slow": one
    connection, "slow-all": each) at `rate` bytes/s: run waits in its
    sends, its memory and serve's stay bounded, every page verified."""
    size_mb = 96
    wl = env.workload(size_mb, threads=2, rate=500)
    serve = env.serve()
    _, to = _relay(env, mode, rate)
    run = env.run_background(wl.host_pid, *extra, to=to)
    rss, serve_rss = rss_during_precopy(run, serve, wl)
    rc, rep, err = run.wait(240)
    assert_migrated(env, wl, rc, rep, err, serve, size_mb)
    r0 = rep["rounds"][0]
    assert r0["duration_s"] > 2, r0  # the relay set the pace
    assert r0["send_s"] > 0.5 * r0["duration_s"], r0  # run waited in its sends: backpressure
    assert len(rss) > 20, rss
    grew = max(rss) - rss[0]
    print(
        "run's RSS: %d MiB at first, at most %d MiB more; serve's at most %d MiB"
        % (rss[0] >> 20, grew >> 20, max(serve_rss) >> 20)
    )
    assert grew < 32 << 20, "run's memory grew by %d MiB while round 0 waited on the link" % (grew >> 20)
    # serve: its page store (the pages sent) and its buffers, nothing queued beyond
    assert max(serve_rss) < serve_rss[0] + (size_mb << 20) * 1.25 + (64 << 20), serve_rss


# --- the data path alone: a Session in this process, pages read from this process


def _region(npages):
    """A page-aligned writable region of this process: (memoryview, address)."""
    buf = mmap.mmap(-1, npages * PAGE_SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return buf, addr


def test_a_later_send_overrides_an_earlier_one_through_both_threads(threads_on, session):
    """The reader thread on the source and the inbound thread on the
    destination keep the order of the frames: a page sent again (its newer
    content) overrides the first copy, whether the second send is pipelined
    or not; and the serial and the pipelined sender make the same frames."""
    store_session, channel = session
    n = 8 * FRAME_PAGES  # pipelined (PIPELINE_MIN_PAGES)
    buf, base = _region(n)
    pid = os.getpid()
    for i in range(n):
        buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE) if i % 3 else bytes(PAGE_SIZE)
    piped, serial = Sender(channel, {pid: 7}, reader_thread=True), Sender(channel, {pid: 7}, reader_thread=False)
    first, again = Round(0), Round(0)
    piped.send_ranges(pid, [(base, base + n * PAGE_SIZE)], first)
    serial.send_ranges(pid, [(base, base + n * PAGE_SIZE)], again)
    assert first.read_ahead_s > 0 and again.read_ahead_s == 0
    assert "inbound" in [t.name for t in threading.enumerate()]  # the destination reads ahead too
    assert (first.frames, first.bytes_wire, first.pages_zero) == (again.frames, again.bytes_wire, again.pages_zero)
    # newer contents: every page, sent again through the pipelined sender,
    # and one run once more alone (not pipelined): the last send wins
    for i in range(n):
        buf[i * PAGE_SIZE : i * PAGE_SIZE + 8] = b"second!!"
    piped.send_ranges(pid, [(base, base + n * PAGE_SIZE)], Round(1))
    buf[0:8] = b"third!!!"
    piped.send_ranges(pid, [(base, base + PAGE_SIZE)], Round(2))
    channel.send(wire.Msg.ROUND, Round(3).encode())  # acked once everything before is stored
    kind, payload = channel.recv()
    assert kind == wire.Msg.ROUND_ACK and wire.decode_ack(payload)[1] == n
    for i in range(n):
        _, data = store_session.store.get(7, base + i * PAGE_SIZE)
        assert data == bytes(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]), "page %d" % i
    assert store_session.store.get(7, base)[1][:8] == b"third!!!"


def test_a_reader_error_stops_the_round_after_the_frames_before_it(session):
    """A root process that is gone fails the round: the reader's error comes
    out of the sending thread, and the reader thread ends."""
    _, channel = session
    n = 8 * FRAME_PAGES
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    holder.kill()
    holder.wait(10)
    sender = Sender(channel, {holder.pid: 9}, root=holder.pid, reader_thread=True)
    before = threading.active_count()
    with pytest.raises(ProcessGone):
        sender.send_ranges(holder.pid, [(0x10000000, 0x10000000 + n * PAGE_SIZE)], Round(0))
    assert threading.active_count() == before  # the reader thread ended
