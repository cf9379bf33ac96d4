"""The wire protocol over real sockets: authentication, integrity, page bodies."""

import os
import socket
import subprocess
import threading

import pytest

from hybridmig import wire
from hybridmig.errors import ProtocolError
from hybridmig.wire import Msg

KEY = b"k" * 32


def pair(server_key=KEY, client_key=KEY):
    """A connected (server Channel, client Channel) after both handshakes;
    raises what either side raised."""
    a, b = socket.socketpair()
    server, client = wire.Channel(a, "source"), wire.Channel(b, "destination")
    errors = {}

    def do_server():
        try:
            server.server_handshake(server_key)
        except ProtocolError as e:
            errors["server"] = e
            server.close()

    t = threading.Thread(target=do_server)
    t.start()
    try:
        client.client_handshake(client_key)
    except ProtocolError as e:
        errors["client"] = e
    t.join(10)
    return server, client, errors


def test_handshake_and_frames():
    server, client, errors = pair()
    assert not errors
    client.send(Msg.ROUND, wire.encode_round(3, {"pages": 7}))
    kind, payload = server.recv()
    assert kind == Msg.ROUND and wire.decode_round(payload) == (3, {"pages": 7})
    server.send(Msg.ROUND_ACK, wire.encode_ack(3, 42))
    assert client.recv() == (Msg.ROUND_ACK, bytearray(wire.encode_ack(3, 42)))


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
        impostor.send(Msg.HELLO, wire._HELLO_S.pack(wire.MAGIC, wire.VERSION, os.urandom(32)))
        impostor.recv()
        impostor.send(Msg.AUTH_OK, os.urandom(32))

    t = threading.Thread(target=fake)
    t.start()
    with pytest.raises(ProtocolError, match="wrong key"):
        client.client_handshake(KEY)
    t.join(10)


def test_tampered_frame_fails_its_mac():
    server, client, errors = pair()
    assert not errors
    body = wire.encode_range(1, 0x1000, 1)
    header = wire._HEADER.pack(Msg.INVALIDATE, 0, 0, len(body), client._send_seq)
    mac = client._mac(header, body)
    forged = bytearray(body)
    forged[-1] ^= 1
    client.sock.sendall(header + bytes(forged) + mac)
    with pytest.raises(ProtocolError, match="MAC"):
        server.recv()


def test_replayed_frame_is_refused():
    server, client, errors = pair()
    client.send(Msg.COMMIT)
    server.recv()
    client._send_seq -= 1  # a replay carries an old sequence number
    client.send(Msg.COMMIT)
    with pytest.raises(ProtocolError, match="where %d was due" % (client._send_seq)):
        server.recv()


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


def test_key_file_must_hold_a_secret(tmp_path):
    short = tmp_path / "k"
    short.write_bytes(b"abc")
    with pytest.raises(ProtocolError, match="fewer than 16 bytes"):
        wire.read_key(short)
    with pytest.raises(ProtocolError, match="cannot read"):
        wire.read_key(tmp_path / "missing")


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=hybridmig",
        ],
        capture_output=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {proc.stderr.decode()[-200:]}")
    return str(cert), str(key)


def tls_server(ctx, key):
    """A one-connection TLS server on loopback; returns (port, thread, result)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    result = {}

    def serve():
        conn, _ = lsock.accept()
        lsock.close()
        try:
            ch = wire.Channel(ctx.wrap_socket(conn, server_side=True), "source")
            ch.server_handshake(key)
            result["frame"] = ch.recv()
            result["cipher"] = ch.sock.cipher()
        except (ProtocolError, OSError) as e:
            result["error"] = e
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    return lsock.getsockname()[1], t, result


def test_tls_session(certificate):
    port, t, result = tls_server(wire.tls_server_context(*certificate), KEY)
    ch = wire.connect(("127.0.0.1", port), KEY, tls=wire.tls_client_context(certificate[0]))
    ch.send(Msg.COMMIT)
    t.join(10)
    ch.close()
    assert result["frame"] == (Msg.COMMIT, bytearray())
    assert result["cipher"] is not None


def test_tls_refuses_an_unknown_certificate(certificate, tmp_path):
    other_cert = tmp_path / "other"
    other_cert.mkdir()
    other = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(other_cert / "k"),
            "-out",
            str(other_cert / "c"),
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ],
        capture_output=True,
    )
    assert other.returncode == 0
    port, t, result = tls_server(wire.tls_server_context(*certificate), KEY)
    with pytest.raises(ProtocolError, match="TLS"):
        wire.connect(("127.0.0.1", port), KEY, tls=wire.tls_client_context(str(other_cert / "c")))
    t.join(10)
    assert "frame" not in result
