"""What an authenticated source may make a real `hybridmig serve` do (issue
12, findings 4 and 7): the order of messages, caps on ranges, pages,
decompressed sizes and memory, CRIU options after CRIU's own abbreviation
rules; and a fuzz of every message body. Spoken on the wire directly, after
a real handshake with the key, to a real serve on 127.0.0.1."""

import os
import random
import socket
import struct
import subprocess
import threading
import time

import lz4.block
import psutil
import pytest

from hybridmig import wire
from hybridmig.criu.command import check_criu_opts
from hybridmig.destination.serve import Limits, Session
from hybridmig.errors import HybridmigError, ProtocolError, UsageError
from hybridmig.messages import (
    Container,
    ContainerStart,
    Faults,
    Host,
    OutcomeQuery,
    Restore,
    Result,
    RoundStats,
    Stream,
    Streams,
)
from hybridmig.source.migration import Migration
from hybridmig.wire import Msg
from lazy_util import HYBRIDMIG_BIN as HYBRIDMIG
from lazy_util import wait_for

KEY = os.urandom(32)
IMAGE_ID = "0123456789abcdef" * 4  # no image of any podman here
PAGE = 4096


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tmp_path, criu_ready):
    """`hybridmig serve` on 127.0.0.1 (not --once), ended at teardown by its pid."""
    started = []

    def start(*extra):
        key = tmp_path / "key"
        key.write_bytes(KEY)
        key.chmod(0o600)  # serve refuses a key file others may read
        base = tmp_path / "serve"
        base.mkdir(exist_ok=True)
        log = open(tmp_path / f"serve-{len(started)}.log", "w")
        port = free_port()
        proc = subprocess.Popen(
            [HYBRIDMIG, "serve", "--listen", f"127.0.0.1:{port}", "--dir", str(base), "--key-file", str(key), "-v3"]
            + list(extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        started.append(proc)
        proc.addr, proc.base = f"127.0.0.1:{port}", base
        proc.log = lambda: (tmp_path / f"serve-{len(started) - 1}.log").read_text()
        wait_for(lambda: "listening on" in proc.log() or proc.poll() is not None, 30, "serve to listen")
        assert proc.poll() is None, proc.log()
        return proc

    yield start
    for proc in started:
        for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            child.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def session(serve_proc):
    """An authenticated channel to serve, past its HOST."""
    ch = wire.connect(serve_proc.addr, KEY, idle_timeout=30)
    kind, payload = ch.recv()
    assert kind == Msg.HOST
    return ch, Host.decode(payload)


def refused(ch, timeout=30):
    """What serve said before it ended the session: its ERROR's text (recv
    raises it as a ProtocolError "... reports: TEXT")."""
    ch.sock.settimeout(timeout)
    try:
        while True:
            kind, payload = ch.recv()  # RESULT of a restore may come first
    except ProtocolError as e:
        return str(e)
    finally:
        ch.close()


def pages(key, vaddr, npages, fill=b"x"):
    return wire.encode_pages(key, [(vaddr, npages, bytes((npages + 7) // 8))], fill * (npages * PAGE), False)[0]


def round_acked(ch, n=0):
    ch.send(Msg.ROUND, RoundStats(n).encode())
    kind, payload = ch.recv()
    return kind == Msg.ROUND_ACK and wire.decode_ack(payload)


def no_restore_left(serve_proc):
    return not [
        p
        for p in psutil.process_iter(["cmdline"])
        if "restore" in (p.info["cmdline"] or []) and str(serve_proc.base) in " ".join(p.info["cmdline"])
    ]


# --- the order of messages ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("after", [Msg.FILE, Msg.RESTORE, Msg.INVALIDATE, Msg.ROUND])
def test_nothing_but_pages_commit_or_abort_after_restore(serve, after):
    srv = serve()
    ch, _ = session(srv)
    ch.send(Msg.RESTORE, Restore([]).encode())  # no images: the restore fails, RESULT not ok
    body = {
        Msg.FILE: wire.encode_file("core-1.img", 0, b"x"),
        Msg.RESTORE: Restore([]).encode(),
        Msg.INVALIDATE: wire.encode_range(1, 0, 1),
        Msg.ROUND: RoundStats(1).encode(),
    }[after]
    ch.send(after, body)
    assert f"unexpected {after.name}" in refused(ch)
    assert srv.poll() is None
    wait_for(lambda: no_restore_left(srv), 30, "the restore to end")


@pytest.mark.timeout(60)
def test_a_json_body_of_the_wrong_shape_ends_the_session(serve):
    """RESTORE's options are checked as the body is read (messages.py), not left to the restore."""
    srv = serve()
    ch, _ = session(srv)
    ch.send(Msg.RESTORE, b'{"criu_opts": "--tcp-close"}')
    assert "RESTORE body: criu_opts has type str, not list[str]" in refused(ch)
    assert srv.poll() is None
    assert no_restore_left(srv)


@pytest.mark.timeout(60)
def test_commit_before_restore_is_refused(serve):
    srv = serve()
    ch, _ = session(srv)
    ch.send(Msg.COMMIT)
    assert "unexpected COMMIT" in refused(ch)


# --- containers (serve --podman) -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_container_refused_by_a_serve_without_podman(serve):
    srv = serve()
    ch, host = session(srv)
    assert host.containers == []
    ch.send(Msg.CONTAINER, Container("podman", "web", IMAGE_ID).encode())
    assert "does not restore podman containers (start it with --podman)" in refused(ch)
    assert srv.poll() is None


@pytest.mark.timeout(60)
def test_container_is_checked_before_any_page(serve):
    """CONTAINER comes first, once; its image must be an ID that serve's
    podman holds: refused at once, before the source has sent a page."""
    srv = serve("--podman")
    ch, host = session(srv)
    assert host.containers == ["podman"]
    ch.send(Msg.CONTAINER, Container("podman", "web", "localhost/x:latest").encode())
    assert "'localhost/x:latest' is no image ID" in refused(ch)
    ch, _ = session(srv)
    ch.send(Msg.CONTAINER, Container("podman", "web", IMAGE_ID).encode())
    assert "is not in the destination's podman storage" in refused(ch)
    ch, _ = session(srv)
    ch.send(Msg.PAGES, pages(1, 0x10000, 1))
    ch.send(Msg.CONTAINER, Container("podman", "web", IMAGE_ID).encode())
    assert "CONTAINER comes once, before any page or file" in refused(ch)
    assert srv.poll() is None


@pytest.mark.parametrize(
    "opt", ["--ext-unix-sk=1\naction-script /tmp/x", "--tcp-established action-script=/x", "-v4", "--x=\x00"]
)
def test_a_container_restore_takes_no_option_that_would_add_a_config_line(opt):
    """A container's CRIU options go into serve's CRIU config file: one that
    passes the allowlist but would bring a line or word of its own (an
    action script) is refused."""
    from hybridmig.destination.container import config_lines

    with pytest.raises(HybridmigError, match="a container's options are --name or --name=VALUE"):
        config_lines([opt])
    assert config_lines(["--tcp-established", "--ext-unix-sk=1"]) == ["tcp-established", "ext-unix-sk 1"]


# --- caps -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_invalidate_costs_what_the_store_holds_not_the_range(serve):
    """2^52 pages took about a day (a step per 2 MiB of the range)."""
    srv = serve()
    ch, _ = session(srv)
    ch.send(Msg.PAGES, pages(1, 1 << 40, 4))
    ch.send(Msg.INVALIDATE, wire.encode_range(1, 0, (1 << 52) - 1))
    ch.sock.settimeout(60)  # a day before; no speed target, only "not unbounded"
    assert round_acked(ch) == (0, 0)  # and the pages are gone
    ch.close()


@pytest.mark.timeout(60)
def test_lz4_bomb_is_refused(serve):
    """A frame claiming 1 Mi pages (4 GiB) of lz4 data that expands ~250x."""
    srv = serve()
    ch, _ = session(srv)
    rss = psutil.Process(srv.pid).memory_info().rss
    npages = 1 << 20
    body = lz4.block.compress(bytes(64 << 20), store_size=False)
    head = struct.pack("!QHB", 1, 1, wire.LZ4) + struct.pack("!QI", 1 << 30, npages) + bytes(npages // 8)
    ch.send(Msg.PAGES, head + body)
    assert "describes over" in refused(ch)
    assert psutil.Process(srv.pid).memory_info().rss < rss + (256 << 20)


@pytest.mark.timeout(60)
def test_zero_bits_past_npages_are_refused(serve):
    srv = serve()
    ch, _ = session(srv)
    head = struct.pack("!QHB", 1, 1, wire.RAW) + struct.pack("!QI", 1 << 30, 3) + bytes([0xFF])
    ch.send(Msg.PAGES, head)  # 3 pages, 8 zero bits: it claimed 3 pages and stored "-5" data pages
    assert "past its 3 pages" in refused(ch)


@pytest.mark.timeout(60)
def test_page_store_quota_fails_the_migration_with_a_clear_error(serve):
    srv = serve("--max-memory", "8M")
    ch, _ = session(srv)
    for i in range(12):
        ch.send(Msg.PAGES, pages(1, (1 << 30) + i * (1 << 20), 256))
    with pytest.raises(ProtocolError, match="max-memory of 8 MiB"):
        round_acked(ch)
    ch.close()
    assert srv.poll() is None
    ch, _ = session(srv)  # serve goes on
    ch.send(Msg.PAGES, pages(1, 1 << 30, 256))
    assert round_acked(ch) == (0, 256)
    ch.close()


def peak_rss_while(proc, fn):
    """fn()'s result and the most memory (RSS) proc held meanwhile, sampled
    every millisecond."""
    peak, done = [psutil.Process(proc.pid).memory_info().rss], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], psutil.Process(proc.pid).memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        th.join(10)


@pytest.mark.timeout(60)
def test_a_sparse_source_makes_serve_hold_no_more_than_its_quota(serve):
    """Half a chunk every 2 MiB (each page store chunk half full, the
    layout where any memory taken ahead of the pages, by the chunk, would
    show): serve's memory stays within its --max-memory of 32 MiB, and the
    page over it ends the session with the reason."""
    srv = serve("--max-memory", "32M")
    ch, _ = session(srv)
    base = psutil.Process(srv.pid).memory_info().rss

    def send():
        for i in range(48):  # 48 MiB of pages: over the quota from the 33rd on
            ch.send(Msg.PAGES, pages(1, (1 << 30) + i * (2 << 20), 256))
        ch.send(Msg.ROUND, RoundStats(0).encode())  # where serve says why
        return refused(ch)

    why, peak = peak_rss_while(srv, send)
    assert "max-memory of 32 MiB" in why
    # the quota, and 16 MiB for frames in flight (chunks faulted in whole: 64 MiB)
    assert peak - base <= (32 + 16) << 20, (peak - base) >> 20
    assert srv.poll() is None


@pytest.mark.timeout(60)
def test_pages_that_fill_the_quota_exactly_are_taken(serve):
    """8 MiB of pages against a quota of 8 MiB, in 1 MiB frames."""
    srv = serve("--max-memory", "8M")
    ch, _ = session(srv)
    for i in range(8):
        ch.send(Msg.PAGES, pages(1, (1 << 30) + i * (1 << 20), 256, bytes([i + 1])))
    assert round_acked(ch) == (0, 8 * 256)
    ch.close()


def test_parallel_puts_stay_within_the_quota(tmp_path):
    """Page streams put in parallel, outside the quota's lock: each put
    reserves its bytes before, so 8 frames of 6 MiB at once against a
    quota of 8 MiB store one frame, not several (a real Session and page
    store; a frame is one native put per extent, and between two of them
    another stream's check would see the store without the rest)."""
    sess = Session(None, str(tmp_path), limits=Limits(max_memory=8 << 20))

    def frame(i):  # 6 extents of 1 MiB, as a frame of scattered pages comes
        extents = [((1 << 30) + i * (64 << 20) + j * (4 << 20), 256, bytes(32)) for j in range(6)]
        return wire.decode_pages(wire.encode_pages(1, extents, bytes([i + 1]) * (6 << 20), False)[0])[1:]

    frames = [frame(i) for i in range(8)]
    start = threading.Barrier(len(frames))

    def put(extents, data):
        start.wait(10)
        sess._store(1, extents, data)

    threads = [threading.Thread(target=put, args=frame) for frame in frames]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sess.store.stats()["pages_data"] * PAGE <= 8 << 20, sess.store.stats()
    assert "max-memory of 8 MiB" in sess.over_quota
    assert sess._reserved == 0


def streams_session(serve_proc, count):
    """A control channel with `count` page streams joined, as run opens them."""
    ch, host = session(serve_proc)
    ch.send(Msg.STREAMS, Streams(count).encode())
    assert ch.recv()[0] == Msg.STREAMS
    lanes = []
    for index in range(count):
        lane = wire.connect(serve_proc.addr, KEY, stream=True, idle_timeout=30)
        proof = wire.stream_proof(ch.binding_key, host.session, index, lane.transcript)
        lane.send(Msg.STREAM, Stream(host.session, index, proof.hex()).encode())
        assert lane.recv()[0] == Msg.STREAM
        lanes.append(lane)
    ch.send(Msg.ROUND_START, wire.encode_round_number(0))
    return ch, lanes


@pytest.mark.timeout(60)
def test_a_page_on_another_streams_block_ends_the_session(serve):
    """Each page has one stream (its 2 MiB block's): a page sent on another
    is refused, so no two streams ever race on one page."""
    srv = serve()
    ch, lanes = streams_session(srv, 2)
    vaddr = next(a for a in range(1 << 30, 1 << 31, wire.STREAM_BLOCK) if wire.stream_of(a, 2) == 1)
    lanes[0].send(Msg.PAGES, pages(1, vaddr, 1))
    ch.send(Msg.ROUND, RoundStats(0).encode())
    assert "are not stream 0's" in refused(ch)
    for lane in lanes:
        lane.close()
    assert "page stream 0 failed" in srv.log() and srv.poll() is None


@pytest.mark.timeout(60)
def test_garbage_on_a_joined_stream_ends_the_session(serve):
    """Bytes that are no sealed frame, after a stream joined: the session
    fails and the source hears why on the control channel; serve goes on."""
    srv = serve()
    ch, lanes = streams_session(srv, 2)
    lanes[1].sock.sendall(struct.pack(">I", 4096) + os.urandom(4096))
    ch.send(Msg.ROUND, RoundStats(0).encode())
    assert "page stream 1 failed" in refused(ch)
    for lane in lanes:
        lane.close()
    ch, _ = session(srv)  # serve goes on
    ch.send(Msg.PAGES, pages(1, 1 << 30, 1))
    assert round_acked(ch) == (0, 1)
    ch.close()


# --- CRIU options ------------------------------------------------------------------------------

BYPASSES = ["--leave-run", "--action-scr=/x", "--pidf=/x", "--images-d=/x", "-R", "-Rv4", "--conf=/x", "-D/x"]


@pytest.mark.parametrize("opt", BYPASSES)
def test_abbreviated_criu_options_are_refused(opt):
    with pytest.raises(UsageError) as e:
        check_criu_opts([opt])
    assert opt in str(e.value)


def test_restore_options_are_allowed():
    check_criu_opts(["--tcp-established", "--tcp-close", "--ext-unix-sk", "--shell-job", "--file-locks"])
    check_criu_opts(["--link-remap", "--skip-in-flight", "-v4", "--tcp-est", "-jl"])


@pytest.mark.timeout(60)
def test_serve_refuses_an_abbreviated_option_and_can_widen_the_list(serve):
    srv = serve("--allow-criu-opt", "ghost-limit")
    ch, host = session(srv)
    assert "ghost-limit" in host.criu_opts_allowed and "action-script" not in host.criu_opts_allowed
    ch.send(Msg.RESTORE, Restore(["--action-scr=/x"]).encode())
    kind, payload = ch.recv()
    result = Result.decode(payload)
    assert kind == Msg.RESULT and not result.ok and "--action-scr=/x (--action-script)" in result.error, result
    ch.close()
    assert "--action-scr" not in " ".join(" ".join(p.cmdline()) for p in psutil.Process(srv.pid).children(True))


# --- run's side ---------------------------------------------------------------------------------


def test_fetch_for_an_unknown_pid_is_a_protocol_error():
    """run, waiting for RESULT, is asked for pages of a pid that is not in
    its tree: a ProtocolError (it was a KeyError)."""
    a, b = socket.socketpair()
    dest, src = wire.Channel(a, "destination"), wire.Channel(b, "source")
    mig = Migration(1, "127.0.0.1:1", KEY)
    mig.channel = src
    mig.sender = type("Keys", (), {"keys": {4242: 1}})()
    dest.send(Msg.FETCH, wire.encode_range(99, 1 << 30, 1))
    with pytest.raises(ProtocolError, match="pid 99"):
        mig._await_result()
    a.close()
    b.close()


# --- fuzz ------------------------------------------------------------------------------------------


def valid_bodies():
    return {
        Msg.PAGES: pages(1, 1 << 30, 3),
        Msg.INVALIDATE: wire.encode_range(1, 1 << 30, 1),
        Msg.ROUND: RoundStats(0, pages_sent=1).encode(),
        Msg.FILE: wire.encode_file("inventory.img", 0, b"x" * 64),
        Msg.RESTORE: Restore(["--tcp-close"]).encode(),
        Msg.COMMIT: b"",
        Msg.ABORT: b"",
        Msg.ENDED: b"",
        Msg.OUTCOME: OutcomeQuery("x").encode(),
        Msg.FETCH: wire.encode_range(1, 0, 1),
        Msg.ROUND_ACK: wire.encode_ack(0, 0),
        Msg.RESULT: b"{}",
        Msg.DONE: b"",
        Msg.HOST: b"{}",
        Msg.HELLO: b"",
        Msg.AUTH_OK: b"",
        # the later ones: page streams, post-copy, containers (refused by a serve without --podman)
        Msg.STREAMS: Streams(2).encode(),
        Msg.ROUND_START: wire.encode_round_number(0),
        Msg.STALE: wire.encode_stale(1, [(1 << 30, (1 << 30) + PAGE)]),
        Msg.FAULTS: Faults().encode(),
        Msg.CONTAINER: Container("podman", "web", IMAGE_ID).encode(),
        Msg.CONTAINER_START: ContainerStart({"x": 1}, {"y": 2}, ["--tcp-close"]).encode(),
    }


def mutate(rng, body):
    body = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and body:
            body[rng.randrange(len(body))] = rng.randrange(256)
        elif op == 1 and body:
            del body[rng.randrange(len(body)) :]
        elif op == 2:
            body += os.urandom(rng.randint(1, 64))
        elif len(body) >= 8:
            i = rng.randrange(len(body) - 7)
            body[i : i + 8] = struct.pack("!Q", rng.choice([0, 1, 0xFFFFFFFF, 1 << 52, (1 << 64) - 1]))
    return bytes(body)


@pytest.mark.timeout(120)
def test_fuzz_every_message_body(serve):
    """Random and mutated bodies of every message after authentication, for a
    few seconds: serve stays up and answers, its memory stays bounded, and no
    restore is left running."""
    srv = serve("--max-memory", "64M")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    print("seed-free run; bodies logged on failure")
    bodies = valid_bodies()
    deadline = time.monotonic() + 8
    rss0 = psutil.Process(srv.pid).memory_info().rss
    sent = 0
    while time.monotonic() < deadline:
        ch, _ = session(srv)
        try:
            for _ in range(rng.randint(1, 6)):
                kind = rng.choice(list(bodies))
                body = os.urandom(rng.randint(0, 64)) if rng.random() < 0.3 else mutate(rng, bodies[kind])
                ch.send(kind, body)
                sent += 1
        except ProtocolError:
            pass  # serve ended the session: as it should for most of them
        reader = threading.Thread(target=refused, args=(ch, 5))
        reader.start()
        reader.join(10)
        assert srv.poll() is None, srv.log()[-3000:]
    print(f"{sent} fuzzed frames")
    assert "Traceback" not in srv.log(), srv.log()[-3000:]
    assert psutil.Process(srv.pid).memory_info().rss < rss0 + (256 << 20)
    wait_for(lambda: no_restore_left(srv), 60, "no restore left")
    ch, _ = session(srv)  # still serving
    ch.send(Msg.PAGES, pages(1, 1 << 30, 1))
    assert round_acked(ch) == (0, 1)
    ch.close()
