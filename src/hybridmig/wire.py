"""hybridmig's wire protocol between `run` (source) and `serve` (destination).

Frames over one TCP connection (docs/protocol.md): a 16-byte header
(type, flags, payload length, sequence number), the payload, and, once both
sides proved they hold the shared key, a 16-byte HMAC-SHA256 over header and
payload under a per-session key. A peer without the key can neither feed
pages (its frames fail the MAC) nor read them (the source sends nothing to a
destination that did not prove the key first).
"""

import enum
import hashlib
import hmac
import json
import os
import socket
import ssl
import struct
import threading

import lz4.block

from .bindings import PAGE_SIZE
from .errors import ProtocolError, UsageError

MAGIC = b"HMIG"
VERSION = 1
MAC_SIZE = 16
MAX_PAYLOAD = 64 << 20

_HEADER = struct.Struct("!BBHIQ")  # type, flags, reserved, length, sequence
_HELLO_S = struct.Struct("!4sH32s")
_HELLO_C = struct.Struct("!4sH32s32s")
_PAGES = struct.Struct("!QHB")  # key, extents, encoding
_EXTENT = struct.Struct("!QI")  # vaddr, npages
_RANGE = struct.Struct("!QQQ")  # key, vaddr, npages
_ROUND = struct.Struct("!I")
_ACK = struct.Struct("!IQ")

RAW, LZ4 = 0, 1


class Msg(enum.IntEnum):
    HELLO = 1
    AUTH_OK = 2
    ERROR = 3
    PAGES = 10
    INVALIDATE = 11
    ROUND = 12
    ROUND_ACK = 13
    FETCH = 14
    FILE = 20
    RESTORE = 21
    RESULT = 22
    COMMIT = 23
    ABORT = 24
    DONE = 25
    HOST = 26
    ENDED = 27


def read_key(path):
    """The shared secret: the whole key file, which must not be empty."""
    try:
        with open(path, "rb") as f:
            key = f.read()
    except OSError as e:
        raise ProtocolError(f"cannot read key file {path}: {e.strerror}") from e
    if len(key.strip()) < 16:
        raise ProtocolError(f"key file {path} holds fewer than 16 bytes: not a usable secret")
    return key


def boot_id():
    """This boot's id: HOST carries it, so that the source knows a
    destination on its own machine."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not ADDRESS:PORT (a port from 1 to 65535)")
    return host.strip("[]") or "0.0.0.0", int(port)


class Channel:
    """One authenticated, framed connection. send() may be called from
    several threads; recv() from one."""

    def __init__(self, sock, peer):
        self.sock = sock
        self.peer = peer
        self._mac_key = None  # ours; the peer's frames carry _peer_mac_key
        self._peer_mac_key = None
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- authentication ------------------------------------------------------

    def _start_macs(self, key, nonce_s, nonce_c, server):
        # one key per direction: a frame cannot be reflected back to its sender
        def derive(label):
            return hmac.new(key, b"session " + label + nonce_s + nonce_c, hashlib.sha256).digest()

        to_client, to_server = derive(b"s2c"), derive(b"c2s")
        self._mac_key, self._peer_mac_key = (to_client, to_server) if server else (to_server, to_client)

    def server_handshake(self, key):
        nonce_s = os.urandom(32)
        self.send(Msg.HELLO, _HELLO_S.pack(MAGIC, VERSION, nonce_s))
        kind, payload = self.recv()
        if kind != Msg.HELLO or len(payload) != _HELLO_C.size:
            raise ProtocolError(f"{self.peer} did not start with a hybridmig hello")
        magic, version, nonce_c, mac = _HELLO_C.unpack(payload)
        if magic != MAGIC or version != VERSION:
            self.send_error("protocol version %d not supported (this is %d)" % (version, VERSION))
            raise ProtocolError("%s speaks protocol version %d, not %d" % (self.peer, version, VERSION))
        if not hmac.compare_digest(mac, hmac.new(key, b"client" + nonce_s + nonce_c, hashlib.sha256).digest()):
            self.send_error("authentication failed: wrong key")
            raise ProtocolError(f"{self.peer} failed authentication (wrong key)")
        self.send(Msg.AUTH_OK, hmac.new(key, b"server" + nonce_c + nonce_s, hashlib.sha256).digest())
        self._start_macs(key, nonce_s, nonce_c, server=True)

    def client_handshake(self, key):
        kind, payload = self.recv()
        if kind != Msg.HELLO or len(payload) != _HELLO_S.size:
            raise ProtocolError(f"{self.peer} is not a hybridmig destination")
        magic, version, nonce_s = _HELLO_S.unpack(payload)
        if magic != MAGIC or version != VERSION:
            raise ProtocolError("%s speaks protocol version %d, not %d" % (self.peer, version, VERSION))
        nonce_c = os.urandom(32)
        mac = hmac.new(key, b"client" + nonce_s + nonce_c, hashlib.sha256).digest()
        self.send(Msg.HELLO, _HELLO_C.pack(MAGIC, VERSION, nonce_c, mac))
        kind, payload = self.recv()
        if kind == Msg.ERROR:
            raise ProtocolError("{} refused us: {}".format(self.peer, payload.decode(errors="replace")))
        expect = hmac.new(key, b"server" + nonce_c + nonce_s, hashlib.sha256).digest()
        if kind != Msg.AUTH_OK or not hmac.compare_digest(payload, expect):
            raise ProtocolError(f"{self.peer} failed authentication (wrong key): nothing was sent")
        self._start_macs(key, nonce_s, nonce_c, server=False)

    # --- frames ------------------------------------------------------------------

    def _mac(self, header, payload, key=None):
        m = hmac.new(key or self._mac_key, header, hashlib.sha256)
        m.update(payload)
        return m.digest()[:MAC_SIZE]

    def send(self, kind, payload=b"", flags=0):
        with self._send_lock:
            header = _HEADER.pack(kind, flags, 0, len(payload), self._send_seq)
            self._send_seq += 1
            frame = header + payload
            if self._mac_key is not None:
                frame += self._mac(header, payload)
            try:
                self.sock.sendall(frame)
            except OSError as e:
                raise ProtocolError(f"connection to {self.peer} lost while sending: {e}") from e
            self.bytes_sent += len(frame)

    def _recv_exact(self, n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                r = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as e:
                raise ProtocolError(f"{self.peer} sent nothing for too long") from e
            except OSError as e:
                raise ProtocolError(f"connection to {self.peer} lost: {e}") from e
            if r == 0:
                raise ProtocolError(f"{self.peer} closed the connection")
            got += r
        return buf

    def recv(self):
        header = bytes(self._recv_exact(_HEADER.size))
        kind, _flags, _res, length, seq = _HEADER.unpack(header)
        if length > MAX_PAYLOAD:
            raise ProtocolError("%s sent a %d-byte frame (limit %d)" % (self.peer, length, MAX_PAYLOAD))
        if seq != self._recv_seq:
            raise ProtocolError("%s sent frame %d where %d was due" % (self.peer, seq, self._recv_seq))
        self._recv_seq += 1
        payload = self._recv_exact(length)
        if self._mac_key is not None:
            mac = bytes(self._recv_exact(MAC_SIZE))
            if not hmac.compare_digest(mac, self._mac(header, payload, self._peer_mac_key)):
                raise ProtocolError("frame %d from %s failed its MAC: refused" % (seq, self.peer))
        self.bytes_received += _HEADER.size + length + (MAC_SIZE if self._mac_key else 0)
        try:
            kind = Msg(kind)
        except ValueError as e:
            raise ProtocolError("%s sent unknown message type %d" % (self.peer, kind)) from e
        if kind == Msg.ERROR and self._mac_key is not None:
            raise ProtocolError("{} reports: {}".format(self.peer, bytes(payload).decode(errors="replace")))
        return kind, payload

    def send_error(self, text):
        try:
            self.send(Msg.ERROR, text.encode())
        except ProtocolError:
            pass  # the peer is gone already: nothing more to tell

    def send_json(self, kind, obj):
        self.send(kind, json.dumps(obj).encode())

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- message bodies -----------------------------------------------------------


def encode_pages(key, extents, data, compress=True):
    """A PAGES body for store task `key`: extents are (vaddr, npages,
    zero_bitmap) with bit i of zero_bitmap set for an all-zero page, which
    travels as nothing; `data` holds every other page, extent after extent."""
    body = bytes(data)
    enc = RAW
    if compress and body:
        packed = lz4.block.compress(body, store_size=False)
        if len(packed) < len(body):
            body, enc = packed, LZ4
    head = [_PAGES.pack(key, len(extents), enc)]
    for vaddr, npages, zero in extents:
        head.append(_EXTENT.pack(vaddr, npages) + bytes(zero[: (npages + 7) // 8]))
    return b"".join(head) + body, enc == LZ4


def decode_pages(payload):
    """(key, [(vaddr, npages, zero_bitmap)], data of the non-zero pages)."""
    view = memoryview(payload)
    try:
        key, n, enc = _PAGES.unpack_from(view)
        off, extents, nonzero = _PAGES.size, [], 0
        for _ in range(n):
            vaddr, npages = _EXTENT.unpack_from(view, off)
            off += _EXTENT.size
            zero = bytes(view[off : off + (npages + 7) // 8])
            off += (npages + 7) // 8
            extents.append((vaddr, npages, zero))
            nonzero += npages - sum(bin(b).count("1") for b in zero)
    except struct.error as e:
        raise ProtocolError("PAGES frame too short for its extents") from e
    body = view[off:]
    if enc == LZ4:
        try:
            body = lz4.block.decompress(body, uncompressed_size=nonzero * PAGE_SIZE)
        except lz4.block.LZ4BlockError as e:
            raise ProtocolError("PAGES frame of pid %d does not decompress: %s" % (key, e)) from e
    elif enc != RAW:
        raise ProtocolError("PAGES frame with unknown encoding %d" % enc)
    if len(body) != nonzero * PAGE_SIZE:
        raise ProtocolError("PAGES frame of pid %d holds %d bytes for %d pages" % (key, len(body), nonzero))
    return key, extents, body


def decode_json(payload):
    try:
        return json.loads(bytes(payload))
    except ValueError as e:
        raise ProtocolError(f"malformed JSON message: {e}") from e


def encode_range(key, vaddr, npages):
    return _RANGE.pack(key, vaddr, npages)


def decode_range(payload):
    return _RANGE.unpack(bytes(payload))


def encode_round(n, stats):
    return _ROUND.pack(n) + json.dumps(stats).encode()


def decode_round(payload):
    (n,) = _ROUND.unpack_from(payload)
    return n, json.loads(bytes(payload[_ROUND.size :]) or b"{}")


def encode_ack(n, pages):
    return _ACK.pack(n, pages)


def decode_ack(payload):
    return _ACK.unpack(bytes(payload))


def encode_file(name, offset, data):
    raw = name.encode()
    return struct.pack("!HQ", len(raw), offset) + raw + data


def decode_file(payload):
    """(name, offset, data): a part of an image file."""
    n, offset = struct.unpack_from("!HQ", payload)
    name = bytes(payload[10 : 10 + n]).decode()
    if not name or "/" in name or name in (".", ".."):
        raise ProtocolError(f"refusing image file name {name!r}")
    return name, offset, bytes(payload[10 + n :])


def tls_server_context(cert, key_file):
    """TLS for `serve` (optional: the HMAC handshake authenticates either
    way; TLS also hides the pages)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ProtocolError(f"cannot load TLS certificate {cert} / key {key_file}: {e}") from e
    return ctx


def tls_client_context(ca):
    """TLS for `run`: the destination must present this certificate (or one
    signed by it). Peers are addresses, not names: no host name check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    try:
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as e:
        raise ProtocolError(f"cannot load TLS CA {ca}: {e}") from e
    return ctx


# A peer that stops answering (the link cut, the host gone without a FIN)
# fails the session within this many seconds instead of after TCP's own
# ~15 minutes of retries: unacknowledged data, or keepalive probes on an
# idle connection (the source waiting for RESULT, the destination between
# rounds), give up after it.
DEAD_PEER_S = 30
_KEEPALIVE_IDLE_S, _KEEPALIVE_INTERVAL_S = 10, 5


def tune(sock):
    """TCP options of a session socket, on both sides."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, (DEAD_PEER_S - _KEEPALIVE_IDLE_S) // _KEEPALIVE_INTERVAL_S)


def connect(addr, key, timeout=10.0, tls=None, idle_timeout=None):
    """An authenticated channel to addr: `timeout` bounds the connection and
    the handshake, `idle_timeout` (None: no bound) every wait after them."""
    host, port = parse_addr(addr) if isinstance(addr, str) else addr
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ProtocolError("cannot connect to %s:%d: %s" % (host, port, e.strerror or e)) from e
    tune(sock)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise ProtocolError("TLS with %s:%d failed: %s" % (host, port, e)) from e
    ch = Channel(sock, "%s:%d" % (host, port))
    try:
        ch.client_handshake(key)
    except ProtocolError as e:
        ch.close()
        if isinstance(e.__cause__, socket.timeout):  # serve takes one source at a time
            raise ProtocolError(
                "%s:%d did not answer within %ss: is it busy with another migration?" % (host, port, timeout)
            ) from e
        raise
    except BaseException:
        ch.close()
        raise
    sock.settimeout(idle_timeout)
    return ch
