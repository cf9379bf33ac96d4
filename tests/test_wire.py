"""The wire protocol over real sockets: authentication, integrity, page bodies; the JSON bodies."""

import hashlib
import json
import os
import re
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
from dataclasses import fields

import pytest

from hybridmig import wire
from hybridmig.errors import ProtocolError, UsageError
from hybridmig.keys import read_key
from hybridmig.messages import (
    MAX_ERROR,
    MAX_ITEMS,
    MAX_JSON,
    MAX_TEXT,
    Container,
    Host,
    Outcome,
    OutcomeQuery,
    Restore,
    Result,
    Resume,
    RoundStats,
    Stream,
    Streams,
)
from hybridmig.source.precopy import Round
from hybridmig.wire import Msg
from lazy_util import HYBRIDMIG_BIN as HYBRIDMIG

KEY = b"k" * 32


def pair(server_key=KEY, client_key=KEY, server_mode=wire.SEALED, client_mode=wire.SEALED):
    """A connected (server Channel, client Channel) after both handshakes;
    raises what either side raised."""
    a, b = socket.socketpair()
    server, client = wire.Channel(a, "source"), wire.Channel(b, "destination")
    errors = {}

    def do_server():
        try:
            server.server_handshake(server_key, server_mode)
        except ProtocolError as e:
            errors["server"] = e
            server.close()

    t = threading.Thread(target=do_server)
    t.start()
    try:
        client.client_handshake(client_key, client_mode)
    except ProtocolError as e:
        errors["client"] = e
        client.close()
    t.join(10)
    return server, client, errors


def test_handshake_and_frames():
    server, client, errors = pair()
    assert not errors
    client.send(Msg.ROUND, RoundStats(3, pages_sent=7).encode())
    kind, payload = server.recv()
    assert kind == Msg.ROUND and RoundStats.decode(payload) == RoundStats(3, pages_sent=7)
    server.send(Msg.ROUND_ACK, wire.encode_ack(3, 42))
    kind, payload = client.recv()
    assert (kind, bytes(payload)) == (Msg.ROUND_ACK, wire.encode_ack(3, 42))


def test_wrong_key_is_refused_before_any_page():
    server, client, errors = pair(client_key=b"x" * 32)
    assert "wrong key" in str(errors["server"])
    assert "wrong key" in str(errors["client"]) or "refused" in str(errors["client"])
    # the source learnt it before sending anything but its hello
    assert client.bytes_sent < 200


def test_impostor_destination_gets_nothing():
    """A destination without the key cannot prove it: the source refuses."""
    a, b = socket.socketpair()
    impostor, client = wire.Channel(a, "impostor"), wire.Channel(b, "destination")

    def fake():
        impostor.send(Msg.HELLO, wire._HELLO_S.pack(wire.MAGIC, wire.VERSION, wire.SEALED, os.urandom(32)))
        impostor.recv()
        impostor.send(Msg.AUTH_OK, os.urandom(32))

    t = threading.Thread(target=fake)
    t.start()
    with pytest.raises(ProtocolError, match="wrong key"):
        client.client_handshake(KEY)
    t.join(10)


def test_frames_are_sealed():
    """Finding 1: nothing of a payload, not even its type, is readable on the wire."""
    a, relay_a = socket.socketpair()
    b, relay_b = socket.socketpair()
    seen = bytearray()  # both directions, as a sniffer between the two sees them
    relays = [threading.Thread(target=_copy, args=(x, y, seen)) for x, y in ((relay_a, relay_b), (relay_b, relay_a))]
    for t in relays:
        t.start()
    server, client = wire.Channel(a, "source"), wire.Channel(b, "destination")
    t = threading.Thread(target=server.server_handshake, args=(KEY,))
    t.start()
    client.client_handshake(KEY)
    t.join(10)
    assert client.sealed and server.sealed
    marker = b"SECRET-PAGE-CONTENT-" * 200
    client.send(Msg.PAGES, marker)
    kind, payload = server.recv()
    assert (kind, bytes(payload)) == (Msg.PAGES, marker)
    server.send(Msg.RESULT, b'{"ok": true, "restored_pid": 4242}')
    client.recv()
    client.close(), server.close()
    for t in relays:
        t.join(10)
    assert b"SECRET" not in seen and b"restored_pid" not in seen
    assert len(seen) > len(marker)


def _copy(src, dst, seen):
    while data := src.recv(1 << 16):
        seen += data
        dst.sendall(data)
    dst.shutdown(socket.SHUT_WR)


def _sealed_frame(channel, kind, body, seq):
    """A sealed frame as `channel` would send it as its frame number `seq`."""
    saved = channel._send_seq
    channel._send_seq = seq
    frame = channel._frame(kind, body, 0)
    channel._send_seq = saved
    return frame


def test_tampered_frame_fails():
    server, client, errors = pair()
    assert not errors
    frame = bytearray(_sealed_frame(client, Msg.INVALIDATE, wire.encode_range(1, 0x1000, 1), 0))
    frame[-20] ^= 1
    client.sock.sendall(bytes(frame))
    with pytest.raises(ProtocolError, match="failed authentication"):
        server.recv()


def test_replayed_frame_is_refused():
    server, client, errors = pair()
    client.send(Msg.COMMIT)
    server.recv()
    client.sock.sendall(_sealed_frame(client, Msg.COMMIT, b"", 0))  # frame 0 again
    with pytest.raises(ProtocolError, match="frame 1 .*failed authentication"):
        server.recv()


def test_reordered_frames_are_refused():
    server, client, errors = pair()
    second, first = _sealed_frame(client, Msg.ABORT, b"", 1), _sealed_frame(client, Msg.COMMIT, b"", 0)
    client.sock.sendall(second + first)
    with pytest.raises(ProtocolError, match="failed authentication"):
        server.recv()


def test_reflected_frame_is_refused():
    """A frame of the destination sent back to it: each direction has its own key and nonces."""
    server, client, errors = pair()
    server.sock.sendall(_sealed_frame(server, Msg.ROUND_ACK, wire.encode_ack(0, 1), 0))
    reflected = client.sock.recv(1 << 16)
    client.sock.sendall(reflected)
    with pytest.raises(ProtocolError, match="failed authentication"):
        server.recv()


def test_plaintext_only_when_both_ends_say_so():
    server, client, errors = pair(server_mode=wire.PLAINTEXT)
    assert "insecure-plaintext" in str(errors["client"])
    assert client.bytes_sent == 0  # refused before sending a byte
    server, client, errors = pair(client_mode=wire.PLAINTEXT)
    assert "insecure-plaintext" in str(errors["client"])
    # a source that asks for plaintext all the same is refused by the destination
    a, b = socket.socketpair()
    server, raw = wire.Channel(a, "source"), wire.Channel(b, "destination")
    plaintext_hello = wire._HELLO_C.pack(wire.MAGIC, wire.VERSION, wire.PLAINTEXT, bytes(32), bytes(32))
    t = threading.Thread(target=lambda: raw.recv() and raw.send(Msg.HELLO, plaintext_hello))
    t.start()
    with pytest.raises(ProtocolError, match="insecure-plaintext"):
        server.server_handshake(KEY)
    t.join(10)
    server, client, errors = pair(server_mode=wire.PLAINTEXT, client_mode=wire.PLAINTEXT)
    assert not errors and not client.sealed
    client.send(Msg.ROUND, RoundStats(1).encode())
    assert server.recv()[0] == Msg.ROUND


def test_plaintext_frames_are_still_authenticated():
    server, client, errors = pair(server_mode=wire.PLAINTEXT, client_mode=wire.PLAINTEXT)
    body = wire.encode_range(1, 0x1000, 1)
    header = wire._HEADER.pack(Msg.INVALIDATE, 0, 0, len(body), client._send_seq)
    mac = client._mac(header, body)
    forged = bytearray(body)
    forged[-1] ^= 1
    client.sock.sendall(header + bytes(forged) + mac)
    with pytest.raises(ProtocolError, match="MAC"):
        server.recv()


def test_mode_cannot_be_downgraded_in_transit():
    """A man in the middle who rewrites both hellos to plaintext fails the proofs."""
    a, b = socket.socketpair()
    mitm_s, mitm_c = socket.socketpair()
    server, client = wire.Channel(a, "source"), wire.Channel(mitm_c, "destination")
    errors = {}

    def do_server():
        try:
            server.server_handshake(KEY, wire.SEALED)
        except ProtocolError as e:
            errors["server"] = e

    def rewrite():
        # server hello: SEALED -> PLAINTEXT towards a plaintext client; its hello back: -> SEALED
        hdr = b.recv(wire._HEADER.size, socket.MSG_WAITALL)
        hello = bytearray(b.recv(wire._HELLO_S.size, socket.MSG_WAITALL))
        hello[6] = wire.PLAINTEXT
        mitm_s.sendall(hdr + bytes(hello))
        hdr = mitm_s.recv(wire._HEADER.size, socket.MSG_WAITALL)
        hello = bytearray(mitm_s.recv(wire._HELLO_C.size, socket.MSG_WAITALL))
        hello[6] = wire.SEALED
        b.sendall(hdr + bytes(hello))
        mitm_s.sendall(b.recv(1 << 16))

    threads = [threading.Thread(target=do_server), threading.Thread(target=rewrite)]
    for t in threads:
        t.start()
    with pytest.raises(ProtocolError):
        client.client_handshake(KEY, wire.PLAINTEXT)
    for t in threads:
        t.join(10)
    assert "wrong key" in str(errors["server"])


def stream_pair(flip=False):
    """A page stream's handshake (the source's HELLO flagged), through a
    relay that clears the flag if `flip`: (server, client, errors)."""
    a, b = socket.socketpair()
    mitm_s, mitm_c = socket.socketpair()
    server, client = wire.Channel(a, "source"), wire.Channel(mitm_c, "destination", stream=True)
    errors = {}

    def do_server():
        try:
            server.server_handshake(KEY)
        except ProtocolError as e:
            errors["server"] = e

    def relay():
        mitm_s.sendall(b.recv(wire._HEADER.size + wire._HELLO_S.size, socket.MSG_WAITALL))
        hdr = bytearray(mitm_s.recv(wire._HEADER.size, socket.MSG_WAITALL))
        if flip:
            hdr[1] = 0
        b.sendall(bytes(hdr) + mitm_s.recv(wire._HELLO_C.size, socket.MSG_WAITALL))
        mitm_s.sendall(b.recv(1 << 16))

    threads = [threading.Thread(target=do_server), threading.Thread(target=relay)]
    for t in threads:
        t.start()
    try:
        client.client_handshake(KEY)
    except ProtocolError as e:
        errors["client"] = e
    for t in threads:
        t.join(10)
    return server, client, errors


def test_a_page_stream_is_flagged_and_the_flag_is_bound():
    """serve learns from the source's HELLO that a connection is a page
    stream; a relay that clears the flag (to pass a stream off as a
    session, or the reverse) fails the proofs."""
    server, client, errors = stream_pair()
    assert not errors and server.stream and client.stream
    assert server.binding_key == client.binding_key and server.transcript == client.transcript
    _, _, errors = stream_pair(flip=True)
    assert "failed authentication" in str(errors["server"]), errors


def test_a_stream_proof_holds_on_its_own_connection_only():
    """STREAM's proof is made under the control channel's binding key over
    the stream's own transcript: another control channel's key, or the
    same proof shown on another stream connection, does not verify."""
    control, control_c, _ = pair()
    other, _, _ = pair()
    stream_s, stream_c, _ = stream_pair()
    stream2_s, _, _ = stream_pair()
    proof = wire.stream_proof(control_c.binding_key, "5e55", 0, stream_c.transcript)
    assert proof == wire.stream_proof(control.binding_key, "5e55", 0, stream_s.transcript)
    assert proof != wire.stream_proof(other.binding_key, "5e55", 0, stream_s.transcript)
    assert proof != wire.stream_proof(control.binding_key, "5e55", 0, stream2_s.transcript)
    assert proof != wire.stream_proof(control.binding_key, "5e55", 1, stream_s.transcript)
    assert proof != wire.stream_proof(control.binding_key, "5e56", 0, stream_s.transcript)


def test_pages_take_their_blocks_stream():
    block = wire.STREAM_BLOCK
    assert [wire.stream_of(i * block + 4096, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert wire.stream_of(block - 4096, 2) == 0 and wire.stream_of(block, 2) == 1


def test_frame_before_authentication_is_small():
    """Finding 2: a header announcing 64 MiB before authentication is refused at once."""
    a, b = socket.socketpair()
    server = wire.Channel(a, "peer")
    b.sendall(wire._HEADER.pack(Msg.HELLO, 0, 0, 64 << 20, 0))
    with pytest.raises(ProtocolError, match="limit %d" % wire.MAX_PREAUTH_PAYLOAD):
        server.recv()


def test_handshake_has_a_total_deadline():
    """Finding 2: a peer sending a byte a second cannot stretch the handshake."""
    a, b = socket.socketpair()
    server = wire.Channel(a, "slow", deadline=time.monotonic() + 1.0)
    stop = threading.Event()

    def trickle():
        for byte in wire._HEADER.pack(Msg.HELLO, 0, 0, wire._HELLO_C.size, 0) + bytes(wire._HELLO_C.size):
            if stop.wait(0.2):
                return
            try:
                b.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(ProtocolError):
        server.server_handshake(KEY)
    assert time.monotonic() - t0 < 3
    stop.set()
    t.join(10)


@pytest.mark.parametrize("compress", [True, False])
def test_pages_roundtrip_with_zero_pages_and_extents(compress):
    def extent(vaddr, npages, zeros, fill):
        zero = bytearray((npages + 7) // 8)
        for i in zeros:
            zero[i >> 3] |= 1 << (i & 7)
        data = b"".join(bytes([fill + i]) * 4096 for i in range(npages) if i not in zeros)
        return (vaddr, npages, bytes(zero)), data

    (e1, d1), (e2, d2) = extent(0x200000, 10, {0, 3, 4, 9}, 1), extent(0x900000, 3, set(), 50)
    body, packed = wire.encode_pages(7, [e1, e2], d1 + d2, compress)
    assert packed == compress  # repeated bytes compress
    key, extents, out = wire.decode_pages(body)
    assert (key, extents) == (7, [e1, e2])
    assert bytes(out) == d1 + d2


def test_truncated_pages_body_is_an_error():
    body, _ = wire.encode_pages(1, [(0, 2, b"\x00")], b"a" * 8192, compress=False)
    with pytest.raises(ProtocolError):
        wire.decode_pages(body[:-1])
    with pytest.raises(ProtocolError):
        wire.decode_pages(body[:12])


def test_file_names_cannot_escape():
    with pytest.raises(ProtocolError):
        wire.decode_file(wire.encode_file("../etc/passwd", 0, b""))
    assert wire.decode_file(wire.encode_file("pages-1.img", 1 << 40, b"x")) == ("pages-1.img", 1 << 40, b"x")


# --- the JSON bodies (messages.py) ---------------------------------------------------------

RESULT_OK = Result(
    ok=True,
    restored_pid=4242,
    restore_s=0.25,
    installed_s=0.5,
    remote_pages=0,
    lazy={"tasks": 1, "fault_latency_us": {"p50": 3.5}, "install_s": None},
    restore_breakdown_ms={"daemon_ready": 1.0, "criu_to_connected": 2.0},
)
BODIES = {
    # each body with the JSON keys it carries on the wire, in order (docs/protocol.md)
    "HOST": (
        Host("b00t", "6.18.0", "5e55", ["shell-job", "tcp-close"], ["podman"]),
        "boot_id kernel session criu_opts_allowed containers",
    ),
    "CONTAINER": (Container("podman", "web-1.a_b", "d5c5" * 16), "engine name image"),
    "RESTORE": (Restore(["--tcp-established"]), "criu_opts postcopy reconnect_s"),
    "ROUND": (RoundStats(3, pages_sent=7, duration_s=0.5), " ".join(f.name for f in fields(RoundStats))),
    "RESULT ok": (RESULT_OK, "ok restored_pid restore_s installed_s remote_pages lazy restore_breakdown_ms postcopy"),
    "RESULT failed": (Result(ok=False, error="criu restore failed"), "ok error ran"),
    "RESUME": (Resume("5e55"), "session"),
    "OUTCOME query": (OutcomeQuery("5e55"), "session"),
    "OUTCOME": (Outcome("5e55", "kept"), "session outcome"),
    "STREAMS": (Streams(3), "count"),
    "STREAM": (Stream("5e55", 1, "ab" * 32), "session index proof"),
}


def _json_of(encoded, body):
    """The JSON object of an encoded body (ROUND: after its round number)."""
    return json.loads(encoded[4:] if isinstance(body, RoundStats) else encoded)


@pytest.mark.parametrize("name", list(BODIES))
def test_json_bodies_round_trip_field_for_field(name):
    body, keys = BODIES[name]
    encoded = body.encode()
    assert type(body).decode(encoded) == body
    assert list(_json_of(encoded, body)) == keys.split()


def test_round_stats_are_the_source_rounds():
    """pre-copy's Round is what ROUND carries: its report and the wire agree."""
    rnd = Round(2, pages_written=5, est_downtime_ms=1.5)
    assert RoundStats.decode(rnd.encode()).as_dict() == rnd.as_dict()
    assert rnd.encode()[:4] == struct.pack("!I", 2)


def _mutated(name, change):
    """BODIES[name] encoded with its JSON object changed by change(obj)."""
    body, _ = BODIES[name]
    obj = _json_of(body.encode(), body)
    change(obj)
    raw = json.dumps(obj).encode()
    return struct.pack("!I", body.number) + raw if isinstance(body, RoundStats) else raw


def _set(key, value):
    return lambda obj: obj.__setitem__(key, value)


def _drop(key):
    return lambda obj: obj.pop(key)


REFUSALS = [
    # (body, change to its JSON, what the error names)
    ("HOST", _drop("session"), "HOST body: session is missing"),
    ("HOST", _set("criu_opts_allowed", "shell-job"), "HOST body: criu_opts_allowed has type str, not list[str]"),
    ("HOST", _set("criu_opts_allowed", ["x"] * (MAX_ITEMS + 1)), "HOST body: criu_opts_allowed holds 1025 entries"),
    ("HOST", _set("kernel", "x" * (MAX_TEXT + 1)), "HOST body: kernel is 4097 characters long"),
    ("HOST", _set("boot_id", None), "HOST body: boot_id has type NoneType, not str"),
    ("HOST", _drop("containers"), "HOST body: containers is missing"),
    ("HOST", _set("containers", ["docker"]), "HOST body: containers[0] is 'docker', none of podman"),
    ("CONTAINER", _drop("name"), "CONTAINER body: name is missing"),
    ("CONTAINER", _set("engine", "lxc"), "CONTAINER body: engine is 'lxc', none of podman"),
    ("CONTAINER", _set("name", "../etc"), "CONTAINER body: name is '../etc': no container name"),
    ("CONTAINER", _set("name", "a\nb"), "CONTAINER body: name is 'a\\nb': no container name"),
    ("CONTAINER", _set("name", "a" * 254), "CONTAINER body: name is"),
    ("CONTAINER", _set("name", ""), "CONTAINER body: name is '': no container name"),
    ("CONTAINER", _set("root", "/"), "CONTAINER body: field root is none of its fields"),
    ("RESTORE", _drop("criu_opts"), "RESTORE body: criu_opts is missing"),
    ("RESTORE", _set("criu_opts", ["-v4", 4]), "RESTORE body: criu_opts[1] has type int, not str"),
    ("RESTORE", _set("criu_opts", ["-v4"] * (MAX_ITEMS + 1)), "RESTORE body: criu_opts holds 1025 entries"),
    ("RESTORE", _set("criu_opts", ["-" * (MAX_TEXT + 1)]), "RESTORE body: criu_opts[0] is 4097 characters"),
    ("RESTORE", _set("root", "/"), "RESTORE body: field root is none of its fields"),
    ("ROUND", _drop("pages_sent"), "ROUND body: pages_sent is missing"),
    ("ROUND", _set("pages_sent", True), "ROUND body: pages_sent has type bool, not int"),
    ("ROUND", _set("pages_sent", -1), "ROUND body: pages_sent is -1: not a count"),
    ("ROUND", _set("duration_s", "0.5"), "ROUND body: duration_s has type str, not float"),
    ("ROUND", _set("number", 4), "ROUND body: number is 4, not the round's 3"),
    ("RESULT ok", _drop("restored_pid"), "RESULT body: restored_pid is missing"),
    ("RESULT ok", _set("remote_pages", "0"), "RESULT body: remote_pages has type str, not int"),
    ("RESULT ok", _set("lazy", []), "RESULT body: lazy has type list"),
    ("RESULT ok", _set("restore_breakdown_ms", {str(i): 1.0 for i in range(MAX_ITEMS + 1)}), "holds 1025 entries"),
    ("RESULT ok", _set("restore_breakdown_ms", {"x": "1"}), "RESULT body: restore_breakdown_ms['x'] has type str"),
    ("RESULT ok", _set("error", "x"), "RESULT body: field error is none of its fields"),
    ("RESULT ok", _drop("ok"), "RESULT body: ok is missing, or no bool"),
    ("RESULT ok", _set("ok", 1), "RESULT body: ok is missing, or no bool"),
    ("RESULT failed", _drop("error"), "RESULT body: error is missing"),
    ("RESULT failed", _set("error", None), "RESULT body: error is null in a failure"),
    ("RESULT failed", _set("error", "x" * (MAX_ERROR + 1)), "RESULT body: error is 65537 characters long"),
    ("OUTCOME query", _drop("session"), "OUTCOME body: session is missing"),
    ("OUTCOME query", _set("session", 5), "OUTCOME body: session has type int, not str"),
    ("OUTCOME query", _set("session", "x" * (MAX_TEXT + 1)), "OUTCOME body: session is 4097 characters long"),
    ("OUTCOME", _drop("outcome"), "OUTCOME body: outcome is missing"),
    ("OUTCOME", _set("outcome", "maybe"), "OUTCOME body: outcome is 'maybe', none of kept, ended, pending, unknown"),
]


@pytest.mark.parametrize(("name", "change", "error"), REFUSALS, ids=[f"{r[0]}: {r[2][:40]}" for r in REFUSALS])
def test_json_bodies_refuse_what_they_do_not_describe(name, change, error):
    body, _ = BODIES[name]
    with pytest.raises(ProtocolError, match=re.escape(error)):
        type(body).decode(_mutated(name, change))


def test_json_numbers_are_finite():
    """Python's JSON reads 1e999 as inf (and NaN, Infinity): no stat, count or time is."""
    encoded = RoundStats(3, duration_s=0.5).encode()
    with pytest.raises(ProtocolError, match="ROUND body: duration_s is inf"):
        RoundStats.decode(encoded.replace(b'"duration_s": 0.5', b'"duration_s": 1e999'))
    with pytest.raises(ProtocolError, match="Infinity is no number"):
        RoundStats.decode(encoded.replace(b'"duration_s": 0.5', b'"duration_s": -Infinity'))


@pytest.mark.parametrize("name", list(BODIES))
def test_json_bodies_refuse_no_object(name):
    body, _ = BODIES[name]
    prefix = struct.pack("!I", 3) if isinstance(body, RoundStats) else b""
    cls = type(body)
    for raw, error in [
        (b"{", "malformed JSON"),
        (b"\xff", "malformed JSON"),
        (b'{"a": NaN}', "malformed JSON: NaN is no number"),
        (b"[1, 2]", "JSON that is no object"),
        (b"[" * 100000 + b"]" * 100000, "malformed JSON"),
        (b" " * (MAX_JSON + 1), "at most %d" % MAX_JSON),
    ]:
        with pytest.raises(ProtocolError, match=error):
            cls.decode(prefix + raw)
    if prefix:
        with pytest.raises(ProtocolError, match="ROUND message too short"):
            cls.decode(b"\0\0")


def test_key_file_must_hold_a_secret(tmp_path):
    """Finding 5: short, patterned or readable key files are refused, saying how to make a good one."""
    short = tmp_path / "short"
    short.write_bytes(os.urandom(16))
    short.chmod(0o600)
    with pytest.raises(UsageError, match="fewer than 32 bytes.*hybridmig keygen"):
        read_key(short)
    pattern = tmp_path / "pattern"
    pattern.write_bytes(b"k" * 64)
    pattern.chmod(0o600)
    with pytest.raises(UsageError, match="pattern.*hybridmig keygen"):
        read_key(pattern)
    readable = tmp_path / "readable"
    readable.write_bytes(os.urandom(32))
    readable.chmod(0o644)
    with pytest.raises(UsageError, match="group or others can read it.*chmod 600"):
        read_key(readable)
    with pytest.raises(UsageError, match="cannot read"):
        read_key(tmp_path / "missing")
    hexkey = tmp_path / "hex"
    hexkey.write_bytes(os.urandom(32).hex().encode())
    hexkey.chmod(0o600)
    assert len(read_key(hexkey)) == 64


def test_keygen(tmp_path):
    path = tmp_path / "key"
    proc = subprocess.run([HYBRIDMIG, "keygen", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key(path)
    assert len(key) == 32
    again = subprocess.run([HYBRIDMIG, "keygen", str(path)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "overwrite" in again.stderr
    assert path.read_bytes() == key


def _openssl(*args):
    proc = subprocess.run(["openssl", *args], capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {proc.stderr.decode()[-200:]}")


def _make_cert(d, ca, name):
    """(certificate, key) of `name`, signed by CA `ca`, for DNS name `name`."""
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"), "-CAkey", str(d / f"{ca}.key"),
        "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1", "-extfile", str(ext),
    )  # fmt: skip
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with certificates for a destination, a source and someone else; and a second CA's source."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"), "-days", "1", "-subj", f"/CN={ca}",
        )  # fmt: skip
    return {
        "ca": str(d / "ca.pem"),
        "dest": _make_cert(d, "ca", "dest"),
        "source": _make_cert(d, "ca", "source"),
        "other": _make_cert(d, "ca", "other"),
        "rogue": _make_cert(d, "rogue-ca", "rogue"),
    }


def fingerprint(cert):
    with open(cert) as f:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()


def tls_server(ctx, key):
    """A one-connection TLS server on loopback; returns (port, thread, result)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    result = {}

    def serve():
        conn, _ = lsock.accept()
        lsock.close()
        conn.settimeout(10)
        try:
            ch = wire.Channel(ctx.wrap_socket(conn, server_side=True), "source")
            ch.server_handshake(key)
            result["frame"] = ch.recv()
            result["cipher"] = ch.sock.cipher()
            result["stream"] = ch.stream
        except (ProtocolError, OSError) as e:
            result["error"] = e
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    return lsock.getsockname()[1], t, result


def client(pki, cert="source", name="dest", fp=None):
    return wire.tls_client_context(pki["ca"], *pki[cert], name=name, fingerprint=fp)


@pytest.mark.parametrize("stream", [False, True])
def test_tls_session_is_mutual_and_checks_the_name(pki, stream):
    """A page stream (run --streams) over TLS as the control channel."""
    port, t, result = tls_server(wire.tls_server_context(*pki["dest"], pki["ca"]), KEY)
    ch = wire.connect(("127.0.0.1", port), KEY, tls=client(pki), stream=stream)
    ch.send(Msg.COMMIT)
    t.join(10)
    ch.close()
    assert result["frame"][0] == Msg.COMMIT
    assert result["cipher"] is not None
    assert result["stream"] == stream


@pytest.mark.parametrize("cert", ["rogue", None])
def test_tls_serve_refuses_a_source_without_a_certificate_of_its_ca(pki, cert):
    """Finding 6: serve asks for the source's certificate, and checks it."""
    port, t, result = tls_server(wire.tls_server_context(*pki["dest"], pki["ca"]), KEY)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    if cert:
        ctx.load_cert_chain(*pki[cert])
    with pytest.raises(ProtocolError):
        wire.connect(("127.0.0.1", port), KEY, tls=wire.TlsClient(ctx, "dest"))
    t.join(10)
    assert "frame" not in result


def test_tls_source_checks_the_destination_name(pki):
    """Finding 6: another certificate of the same CA is not the destination."""
    port, t, result = tls_server(wire.tls_server_context(*pki["other"], pki["ca"]), KEY)
    with pytest.raises(ProtocolError, match="TLS"):
        wire.connect(("127.0.0.1", port), KEY, tls=client(pki))
    t.join(10)
    assert "frame" not in result


def test_tls_source_checks_the_fingerprint(pki):
    port, t, result = tls_server(wire.tls_server_context(*pki["other"], pki["ca"]), KEY)
    with pytest.raises(ProtocolError, match="not the one expected"):
        wire.connect(("127.0.0.1", port), KEY, tls=client(pki, name=None, fp=fingerprint(pki["dest"][0])))
    t.join(10)
    port, t, result = tls_server(wire.tls_server_context(*pki["dest"], pki["ca"]), KEY)
    ch = wire.connect(("127.0.0.1", port), KEY, tls=client(pki, name=None, fp=fingerprint(pki["dest"][0])))
    ch.send(Msg.COMMIT)
    t.join(10)
    ch.close()
    assert result["frame"][0] == Msg.COMMIT


def test_tls_needs_a_name_or_a_fingerprint(pki):
    with pytest.raises(UsageError, match="--tls-name"):
        client(pki, name=None)


def test_tls_relay_fails_the_handshake(pki):
    """Finding 6: a relay that holds valid certificates (even the destination's
    own) ends two TLS sessions; the handshake, bound to the TLS channel,
    fails on both sides."""
    port, t, result = tls_server(wire.tls_server_context(*pki["dest"], pki["ca"]), KEY)
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(1)
    relay_server_ctx = wire.tls_server_context(*pki["dest"], pki["ca"])
    relay_client = client(pki, cert="other")

    def relay():
        conn, _ = front.accept()
        front.close()
        try:
            near = relay_server_ctx.wrap_socket(conn, server_side=True)
            far = relay_client.wrap(socket.create_connection(("127.0.0.1", port), timeout=10), "dest")
            pumps = [threading.Thread(target=_pump, args=x, daemon=True) for x in ((near, far), (far, near))]
            for p in pumps:
                p.start()
            for p in pumps:
                p.join(10)
        except OSError:
            conn.close()

    r = threading.Thread(target=relay)
    r.start()
    with pytest.raises(ProtocolError, match="relay"):
        wire.connect(("127.0.0.1", front.getsockname()[1]), KEY, tls=client(pki))
    t.join(10)
    r.join(20)
    assert "frame" not in result and "relay" in str(result["error"])


def _pump(src, dst):
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.close()
        except OSError:
            pass


def test_stale_ranges_round_trip_and_bad_ones_are_refused():
    """STALE (post-copy): a task's ranges the destination must drop."""
    ranges = [(0x1000, 0x3000), (0x7F0000000000, 0x7F0000001000)]
    key, got = wire.decode_stale(wire.encode_stale(42, ranges))
    assert key == 42 and got == [(0x1000, 2), (0x7F0000000000, 1)]
    with pytest.raises(ProtocolError, match="STALE frame of 7 bytes"):
        wire.decode_stale(b"x" * 7)
    with pytest.raises(ProtocolError, match="no page range"):
        wire.decode_stale(struct.pack("!QQQ", 1, 0x1001, 1))
