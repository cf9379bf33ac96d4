"""Random and mutated frames against the frame decoder, the handshake and a
real `hybridmig serve`: nothing but a clean refusal, bounded in time."""

import os
import random
import socket
import subprocess
import threading
import time

import psutil
import pytest

from hybridmig import wire
from hybridmig.errors import ProtocolError
from hybridmig.keys import generate_key
from hybridmig.messages import RoundStats
from hybridmig.testing.workload import kill_tree
from hybridmig.wire import Msg
from lazy_util import HYBRIDMIG_BIN as HYBRIDMIG
from lazy_util import wait_for

KEY = os.urandom(32)
FUZZ_S = 2.0


def _valid_client_stream():
    """The bytes a real source sends in its handshake (against a server whose hello we drop)."""
    a, b = socket.socketpair()
    client = wire.Channel(b, "destination")
    server = wire.Channel(a, "source")
    t = threading.Thread(target=lambda: _quiet(server.server_handshake, KEY))
    t.start()
    client.client_handshake(KEY)
    client.send(Msg.ROUND, RoundStats(0).encode())
    t.join(10)
    b.close()
    return a.recv(1 << 16)  # (what the server had not read yet: nothing of its handshake)


def _quiet(fn, *args):
    try:
        fn(*args)
    except ProtocolError:
        pass


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data[rng.randrange(len(data) + 1) :] = b""
        elif op == 2:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = os.urandom(rng.randint(1, 64))
        else:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = wire._HEADER.pack(rng.choice(list(Msg)), 0, 0, rng.randrange(1 << 32), 0)
    return bytes(data)


def _hello_c(rng):
    return wire._HEADER.pack(Msg.HELLO, 0, 0, wire._HELLO_C.size, 0) + wire._HELLO_C.pack(
        wire.MAGIC, wire.VERSION, rng.choice([0, 1, 2, 255]), os.urandom(32), os.urandom(32)
    )


def test_handshake_decoder_refuses_garbage_cleanly():
    """Random and mutated handshakes: a ProtocolError each, never anything else, never a hang."""
    rng = random.Random(12)
    seeds = [_hello_c(rng)]
    deadline, cases = time.monotonic() + FUZZ_S, 0
    while time.monotonic() < deadline:
        a, b = socket.socketpair()
        data = os.urandom(rng.randint(0, 200)) if rng.random() < 0.3 else _mutate(rng, rng.choice(seeds))
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        server = wire.Channel(a, "fuzz", deadline=time.monotonic() + 1)
        with pytest.raises(ProtocolError):
            server.server_handshake(KEY)
        a.close(), b.close()
        cases += 1
    assert cases > 50


def test_sealed_decoder_refuses_mutations_cleanly():
    """Mutated sealed frames after a real handshake: refused, never accepted, never a crash."""
    rng = random.Random(34)
    deadline, cases = time.monotonic() + FUZZ_S, 0
    while time.monotonic() < deadline:
        a, b = socket.socketpair()
        server, client = wire.Channel(a, "source"), wire.Channel(b, "destination")
        t = threading.Thread(target=server.server_handshake, args=(KEY,))
        t.start()
        client.client_handshake(KEY)
        t.join(10)
        payload = os.urandom(rng.randint(0, 5000))
        frame = client._frame(Msg.PAGES, payload, 0)
        mutated = _mutate(rng, frame)
        if mutated == frame:
            continue
        b.sendall(mutated)
        b.shutdown(socket.SHUT_WR)
        a.settimeout(5)
        accepted = []
        with pytest.raises(ProtocolError):  # at the latest at the end of the stream
            for _ in range(4):
                accepted.append(server.recv())
        # what was accepted, if anything, is the frame as sealed (garbage appended after it is refused)
        assert all(kind == Msg.PAGES and bytes(got) == payload for kind, got in accepted), accepted
        a.close(), b.close()
        cases += 1
    assert cases > 20


@pytest.mark.criu  # serve checks its CRIU at start
@pytest.mark.timeout(120)
def test_serve_survives_fuzzing(tmp_path):
    """A real serve on loopback, fed random and mutated handshakes over many
    connections at once, still authenticates a real source afterwards."""
    key_file = tmp_path / "key"
    generate_key(key_file)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = tmp_path / "serve"
    base.mkdir()
    log = open(tmp_path / "serve.log", "w+")
    serve = subprocess.Popen(
        [HYBRIDMIG, "serve", "--listen", "127.0.0.1:%d" % port, "--dir", str(base), "--key-file", str(key_file), "-v3"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: "listening on" in (tmp_path / "serve.log").read_text() or serve.poll() is not None, 30, "serve"
        )
        assert serve.poll() is None
        rng = random.Random(56)
        seeds = [_hello_c(rng), _valid_client_stream()]
        deadline, sent = time.monotonic() + FUZZ_S, 0
        open_socks = []
        while time.monotonic() < deadline:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            data = os.urandom(rng.randint(0, 300)) if rng.random() < 0.3 else _mutate(rng, rng.choice(seeds))
            try:
                s.sendall(data)
            except OSError:
                pass
            open_socks.append(s)
            if len(open_socks) > 32:  # some stay open meanwhile: handshakes at once
                open_socks.pop(0).close()
            sent += 1
        for s in open_socks:
            s.close()
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        ch = wire.connect(("127.0.0.1", port), key_file.read_bytes(), idle_timeout=10)
        kind, _ = ch.recv()
        assert kind == Msg.HOST
        ch.close()
        assert sent > 50
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        try:
            kill_tree(psutil.Process(serve.pid))
        except psutil.NoSuchProcess:
            pass
        serve.wait(10)
        log.close()
