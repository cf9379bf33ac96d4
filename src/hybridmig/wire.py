"""hybridmig's wire protocol between `run` (source) and `serve` (destination).

Frames over one TCP connection (docs/protocol.md). Both sides first prove
that they hold the shared key (HELLO/HELLO/AUTH_OK, bound to both nonces,
to the mode each side asked for and, under TLS, to the TLS channel); keys
for each direction come from HKDF over the key, the nonces and the
handshake's transcript. From then on every frame is sealed with AES-256-GCM,
its nonce the direction and the frame's sequence number: a passive listener
reads nothing but frame lengths, and a frame changed, replayed, reordered or
reflected fails. With `--insecure-plaintext` on both ends frames travel in
clear, only authenticated (AES-256-GMAC: the GCM tag of the header under
the same nonces, the payload as associated data).
"""

import enum
import hashlib
import hmac
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import lz4.block
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .bindings import PAGE_SIZE
from .errors import PeerClosed, PeerError, ProtocolError, UsageError

MAGIC = b"HMIG"
VERSION = 3  # 3: plaintext frames carry a GMAC tag instead of HMAC-SHA256 (20 times cheaper)
MAC_SIZE = 16  # HMAC tag of a plaintext frame, and the AEAD tag of a sealed one
MAX_PAYLOAD = 64 << 20
# Pages one PAGES frame may describe, zero pages included: what a raw frame
# of that many data pages could carry. It bounds what a frame costs the
# destination (an lz4 block expands to at most this, ~250 times its size).
MAX_FRAME_PAGES = MAX_PAYLOAD // PAGE_SIZE
# Before authentication a peer is anyone: HELLO and ERROR are small, and no
# bigger frame is read (a header must not make serve allocate 64 MiB).
MAX_PREAUTH_PAYLOAD = 1024
# The whole handshake, connection and TLS included, on either side.
HANDSHAKE_DEADLINE_S = 5.0

SEALED, PLAINTEXT = 0, 1  # the frame mode each side asks for in its HELLO
# The flags of the source's HELLO frame: this connection is a page stream of
# a session (run --streams), not a session of its own. Bound into the
# transcript, so that a flag flipped in transit fails the proofs.
STREAM_FLAG = 1
_STREAM_BINDING = b"hybridmig stream\0"
# Page streams: a page goes on stream (vaddr // STREAM_BLOCK) % N, always
# the same one (docs/design.md, "Page streams").
STREAM_BLOCK = 2 << 20
# The stream index a session's fault channel joins with (STREAM): bound into
# its proof like a page stream's index, and beyond any page stream's.
FAULT_LANE = 0xFFFF

_HEADER = struct.Struct("!BBHIQ")  # type, flags, reserved, length, sequence: handshake and plaintext frames
_SEALED_HEADER = struct.Struct("!I")  # length of the sealed type and payload, tag included
_NONCE = struct.Struct("!4sQ")  # direction, sequence number: never the same twice under one key
_HELLO_S = struct.Struct("!4sHB32s")  # magic, version, mode, nonce_s
_HELLO_C = struct.Struct("!4sHB32s32s")  # magic, version, mode, nonce_c, proof
_PAGES = struct.Struct("!QHB")  # key, extents, encoding
_EXTENT = struct.Struct("!QI")  # vaddr, npages
_RANGE = struct.Struct("!QQQ")  # key, vaddr, npages
_ACK = struct.Struct("!IQ")
_KEY = struct.Struct("!Q")  # STALE: the task, before its ranges
_STALE_RANGE = struct.Struct("!QQ")  # vaddr, npages

RAW, LZ4 = 0, 1
# A PAGES extent: (vaddr, npages, zero bitmap), bit i set for an all-zero page
Extent: TypeAlias = tuple[int, int, bytes]
# What a body may come in: recv()'s payloads are views of its buffers
BytesLike: TypeAlias = bytes | bytearray | memoryview
# A file a TLS helper loads
StrPath: TypeAlias = str | os.PathLike[str]
_SCRATCH_STEP = 256 << 10  # reused buffers grow in steps: page frames differ in their heads' length


class Msg(enum.IntEnum):
    HELLO = 1
    AUTH_OK = 2
    ERROR = 3
    PAGES = 10
    INVALIDATE = 11
    ROUND = 12
    ROUND_ACK = 13
    FETCH = 14
    STALE = 15
    ROUND_START = 16
    STREAM_ROUND = 17
    FILE = 20
    RESTORE = 21
    RESULT = 22
    COMMIT = 23
    ABORT = 24
    DONE = 25
    HOST = 26
    ENDED = 27
    OUTCOME = 28
    CONTAINER = 29
    RESUME = 30
    STREAMS = 31
    STREAM = 32
    CONTAINER_START = 33
    FAULTS = 34


def boot_id() -> str:
    """This boot's id: HOST carries it, so that the source knows a
    destination on its own machine."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not ADDRESS:PORT (a port from 1 to 65535)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _mode_name(mode: int) -> str:
    return "--insecure-plaintext" if mode == PLAINTEXT else "sealed frames (the default)"


def channel_binding(sock: socket.socket) -> bytes:
    """What ties the handshake to this TLS connection (RFC 5929's
    tls-unique: the first Finished message, which differs on the two legs of
    a relay); empty without TLS."""
    if not isinstance(sock, ssl.SSLSocket):
        return b""
    return b"tls-unique" + (sock.get_channel_binding("tls-unique") or b"")


def stream_of(vaddr: int, streams: int) -> int:
    """The page stream that carries the page at vaddr."""
    return (vaddr // STREAM_BLOCK) % streams


def stream_proof(binding_key: bytes, session: str, index: int, stream_transcript: bytes) -> bytes:
    """What a page stream shows to join its session: a MAC under the
    control channel's binding key (only the two ends of that channel know
    it) over the session, the stream's index and the stream's own
    handshake transcript (valid on that one connection only)."""
    msg = b"hybridmig stream proof\0" + session.encode() + b"\0" + index.to_bytes(4, "big") + stream_transcript
    return hmac.new(binding_key, msg, hashlib.sha256).digest()


def _session_keys(
    key: bytes, hello_s: bytes, hello_c_unproven: bytes, binding: bytes
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(client proof key, server proof key, client-to-server key,
    server-to-client key, transcript hash): all of them bound to both
    nonces, to both modes and to the TLS channel."""
    transcript = hashlib.sha256(b"hybridmig handshake 2\0" + hello_s + hello_c_unproven + binding).digest()
    hkdf = HKDF(
        hashes.SHA256(), 128, salt=hello_s[-32:] + hello_c_unproven[-32:], info=b"hybridmig keys 2" + transcript
    )
    okm = hkdf.derive(key)
    return okm[:32], okm[32:64], okm[64:96], okm[96:], transcript


class Channel:
    """One authenticated, framed connection. send() may be called from
    several threads; recv() from one."""

    def __init__(self, sock: socket.socket, peer: str, deadline: float | None = None, stream: bool = False) -> None:
        self.sock = sock
        # a page stream of a session (STREAM_FLAG): set by the source, read
        # from the source's HELLO by serve
        self.stream = stream
        self.transcript = b""  # the handshake's, once authenticated
        # known to both ends only: page streams prove with it that they
        # belong to this channel's session (stream_proof)
        self.binding_key = b""
        self.peer = peer
        self.deadline = deadline  # time.monotonic() by which the handshake must be over
        self._seal: AESGCM | None = None  # AESGCM of each direction, once authenticated
        self._open: AESGCM | None = None
        self._mac_key: AESGCM | None = None  # plaintext mode: ours; the peer's frames carry _peer_mac_key's tag
        self._peer_mac_key: AESGCM | None = None
        self._send_dir = self._recv_dir = b""
        self._send_seq = 0
        self._recv_seq = 0
        self._last_flags = 0  # of the last plaintext frame (the source's HELLO: STREAM_FLAG)
        self._send_lock = threading.Lock()
        # Reused buffers: a fresh 1 MiB buffer per frame (its allocation and
        # page faults) cost more than sealing it (docs/bench-wire.md).
        self._sealed_out = bytearray()  # a sealed frame being sent
        self._in = bytearray()  # a frame being received
        self._plain_in = bytearray()  # a sealed frame opened (recv(transient=True))
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seal_s = 0.0  # time spent sealing (or MACing) outgoing frames
        self.open_s = 0.0  # time spent opening (or checking the MAC of) incoming frames

    @property
    def authenticated(self) -> bool:
        return self._seal is not None or self._mac_key is not None

    @property
    def sealed(self) -> bool:
        return self._seal is not None

    # --- authentication ------------------------------------------------------

    def _start(self, keys: tuple[bytes, bytes], mode: int, server: bool, transcript: bytes) -> None:
        c2s, s2c = keys
        self.transcript = transcript
        self.binding_key = hmac.new(c2s + s2c, b"hybridmig stream binding\0" + transcript, hashlib.sha256).digest()
        if server:
            out, into, self._send_dir, self._recv_dir = s2c, c2s, b"s2c\0", b"c2s\0"
        else:
            out, into, self._send_dir, self._recv_dir = c2s, s2c, b"c2s\0", b"s2c\0"
        # sequence numbers start again at 0 under the new keys
        self._send_seq = self._recv_seq = 0
        if mode == PLAINTEXT:
            self._mac_key, self._peer_mac_key = AESGCM(out), AESGCM(into)
        else:
            self._seal, self._open = AESGCM(out), AESGCM(into)
        self.deadline = None

    def server_handshake(self, key: bytes, mode: int = SEALED) -> None:
        nonce_s = os.urandom(32)
        hello_s = _HELLO_S.pack(MAGIC, VERSION, mode, nonce_s)
        self.send(Msg.HELLO, hello_s)
        kind, payload = self.recv()
        if kind != Msg.HELLO or len(payload) != _HELLO_C.size:
            raise ProtocolError(f"{self.peer} did not start with a hybridmig hello")
        self.stream = self._last_flags == STREAM_FLAG
        magic, version, peer_mode, _nonce_c, proof = _HELLO_C.unpack(payload)
        if magic != MAGIC or version != VERSION:
            self.send_error("protocol version %d not supported (this is %d)" % (version, VERSION))
            raise ProtocolError("%s speaks protocol version %d, not %d" % (self.peer, version, VERSION))
        if peer_mode != mode:
            self.send_error(
                "this destination wants %s, the source asked for %s" % (_mode_name(mode), _mode_name(peer_mode))
            )
            raise ProtocolError(
                "%s asked for %s, this destination wants %s: both ends must say --insecure-plaintext, or neither"
                % (self.peer, _mode_name(peer_mode), _mode_name(mode))
            )
        kc, ks, c2s, s2c, transcript = _session_keys(key, hello_s, bytes(payload[:-32]), self._binding())
        if not hmac.compare_digest(proof, hmac.new(kc, transcript, hashlib.sha256).digest()):
            self.send_error("authentication failed: wrong key (or a relay between us)")
            raise ProtocolError(f"{self.peer} failed authentication (wrong key, or a relay)")
        self.send(Msg.AUTH_OK, hmac.new(ks, transcript + proof, hashlib.sha256).digest())
        self._start((c2s, s2c), mode, server=True, transcript=transcript)

    def client_handshake(self, key: bytes, mode: int = SEALED) -> None:
        kind, payload = self.recv()
        if kind != Msg.HELLO or len(payload) != _HELLO_S.size:
            raise ProtocolError(f"{self.peer} is not a hybridmig destination (of protocol version {VERSION})")
        hello_s = bytes(payload)
        magic, version, peer_mode, _nonce_s = _HELLO_S.unpack(hello_s)
        if magic != MAGIC or version != VERSION:
            raise ProtocolError("%s speaks protocol version %d, not %d" % (self.peer, version, VERSION))
        if peer_mode != mode:
            raise ProtocolError(
                "%s wants %s, this source asked for %s: both ends must say --insecure-plaintext, or neither; "
                "nothing was sent" % (self.peer, _mode_name(peer_mode), _mode_name(mode))
            )
        unproven = _HELLO_C.pack(MAGIC, VERSION, mode, os.urandom(32), bytes(32))[:-32]
        kc, ks, c2s, s2c, transcript = _session_keys(key, hello_s, unproven, self._binding())
        proof = hmac.new(kc, transcript, hashlib.sha256).digest()
        self.send(Msg.HELLO, unproven + proof, flags=STREAM_FLAG if self.stream else 0)
        kind, payload = self.recv()
        if kind == Msg.ERROR:
            raise ProtocolError("{} refused us: {}".format(self.peer, bytes(payload).decode(errors="replace")))
        expect = hmac.new(ks, transcript + proof, hashlib.sha256).digest()
        if kind != Msg.AUTH_OK or not hmac.compare_digest(bytes(payload), expect):
            raise ProtocolError(f"{self.peer} failed authentication (wrong key, or a relay): nothing was sent")
        self._start((c2s, s2c), mode, server=False, transcript=transcript)

    def _binding(self) -> bytes:
        """What the transcript binds besides the hellos: the TLS channel,
        and whether this is a page stream."""
        return channel_binding(self.sock) + (_STREAM_BINDING if self.stream else b"")

    # --- frames ------------------------------------------------------------------

    def _mac(self, header: bytes, payload: BytesLike, peer: bool = False) -> bytes:
        """A plaintext frame's tag: AES-256-GCM of the header, the payload as
        associated data, under the nonce the frame would have sealed (the
        direction and the header's sequence number), the ciphertext dropped:
        GMAC, which authenticates both (a forgery is one of GCM's tag)."""
        aead = self._peer_mac_key if peer else self._mac_key
        assert aead is not None  # only in plaintext mode, where both keys are set
        nonce = _NONCE.pack(self._recv_dir if peer else self._send_dir, _HEADER.unpack(header)[4])
        return aead.encrypt(nonce, header, payload)[-MAC_SIZE:]

    def _scratch(self, name: str, n: int) -> memoryview:
        """n bytes of the reused buffer self.<name>: replaced, not resized,
        when too small (a caller may still hold a view of the old one)."""
        buf: bytearray = getattr(self, name, None) or bytearray()  # (slots past 0: created on first use)
        if len(buf) < n:
            buf = bytearray(-(-n // _SCRATCH_STEP) * _SCRATCH_STEP)
            setattr(self, name, buf)
        return memoryview(buf)[:n]

    def _frame_parts(
        self, kind: int, buf: bytearray | memoryview, start: int, end: int, flags: int
    ) -> list[bytes | memoryview]:
        """The frame of payload buf[start:end] as buffers to send in order,
        the payload not copied. buf[start - 1] is scratch: a sealed frame
        seals the type there, with the payload, into a reused buffer."""
        view = memoryview(buf)
        t = time.perf_counter()
        if self._seal is not None:
            # the type travels sealed with the payload: only the length shows
            n = end - start + 1
            header = _SEALED_HEADER.pack(n + MAC_SIZE)
            nonce = _NONCE.pack(self._send_dir, self._send_seq)
            view[start - 1] = kind
            out = self._scratch("_sealed_out", n + MAC_SIZE)
            self._seal.encrypt_into(nonce, view[start - 1 : end], header, out)
            parts: list[bytes | memoryview] = [header, out]
        else:
            header = _HEADER.pack(kind, flags, 0, end - start, self._send_seq)
            parts = [header, view[start:end]]
            if self._mac_key is not None:
                parts.append(self._mac(header, view[start:end]))
        self.seal_s += time.perf_counter() - t
        return parts

    def _frame(self, kind: int, payload: BytesLike, flags: int) -> bytes:
        """One whole frame as bytes, as send() puts it on the wire (the tests
        forge frames with it)."""
        buf = bytearray(1) + payload
        return b"".join(self._frame_parts(kind, buf, 1, len(buf), flags))

    def send(self, kind: int, payload: BytesLike = b"", flags: int = 0) -> None:
        buf = bytearray(1) + payload  # room for the type: sealed with the payload
        self.send_from(kind, buf, 1, len(buf), flags)

    def send_from(self, kind: int, buf: bytearray | memoryview, start: int, end: int, flags: int = 0) -> None:
        """Send buf[start:end] (a writable buffer) as the payload of a frame,
        with no copy of it (the page frames); buf[start - 1] is overwritten."""
        with self._send_lock:
            parts = self._frame_parts(kind, buf, start, end, flags)
            self._send_seq += 1
            try:
                if self.deadline is not None:
                    self._settimeout_to_deadline()
                self._send_parts(parts)
            except OSError as e:
                raise ProtocolError(f"connection to {self.peer} lost while sending: {e}") from e
            self.bytes_sent += sum(len(p) for p in parts)

    def _send_parts(self, parts: list[bytes | memoryview]) -> None:
        if isinstance(self.sock, ssl.SSLSocket):  # no sendmsg() on TLS sockets
            for p in parts:
                self.sock.sendall(p)
            return
        views = [memoryview(p) for p in parts]
        while views:
            n = self.sock.sendmsg(views)  # may send part of it (a timeout, a signal)
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def _settimeout_to_deadline(self) -> None:
        assert self.deadline is not None  # called only during the handshake, which has one
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProtocolError(f"{self.peer} did not complete the handshake within its deadline")
        self.sock.settimeout(left)

    def _recv_exact(self, n: int, scratch: str | None = None) -> memoryview | bytearray:
        """n bytes: a fresh bytearray, or a view of the reused buffer named
        scratch."""
        view = memoryview(bytearray(n)) if scratch is None else self._scratch(scratch, n)
        got = 0
        while got < n:
            try:
                if self.deadline is not None:  # the handshake's total, not each recv's
                    self._settimeout_to_deadline()
                r = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as e:
                raise ProtocolError(f"{self.peer} sent nothing for too long") from e
            except OSError as e:
                raise ProtocolError(f"connection to {self.peer} lost: {e}") from e
            if r == 0:
                raise PeerClosed(f"{self.peer} closed the connection")
            got += r
        return view if scratch is not None else cast(bytearray, view.obj)

    def _recv_sealed(self, transient: bool, slot: int) -> tuple[int, memoryview]:
        header = bytes(self._recv_exact(_SEALED_HEADER.size))
        (length,) = _SEALED_HEADER.unpack(header)
        if not 1 + MAC_SIZE <= length <= 1 + MAX_PAYLOAD + MAC_SIZE:
            raise ProtocolError("%s sent a %d-byte sealed frame (limit %d)" % (self.peer, length, MAX_PAYLOAD))
        sealed = self._recv_exact(length, "_in")
        nonce = _NONCE.pack(self._recv_dir, self._recv_seq)
        n = length - MAC_SIZE
        plain = self._scratch("_plain_in" + (str(slot) if slot else ""), n) if transient else memoryview(bytearray(n))
        assert self._open is not None  # recv() reads sealed frames once authenticated
        t = time.perf_counter()
        try:
            self._open.decrypt_into(nonce, sealed, header, plain)
        except InvalidTag as e:
            raise ProtocolError(
                "frame %d from %s failed authentication (changed, replayed, reordered or not ours): refused"
                % (self._recv_seq, self.peer)
            ) from e
        self.open_s += time.perf_counter() - t
        self._recv_seq += 1
        self.bytes_received += _SEALED_HEADER.size + length
        return plain[0], plain[1:]

    def _recv_plain(self, transient: bool, slot: int) -> tuple[int, memoryview | bytearray]:
        header = bytes(self._recv_exact(_HEADER.size))
        kind, self._last_flags, _res, length, seq = _HEADER.unpack(header)
        limit = MAX_PAYLOAD if self.authenticated else MAX_PREAUTH_PAYLOAD
        if length > limit:
            raise ProtocolError("%s sent a %d-byte frame (limit %d)" % (self.peer, length, limit))
        if seq != self._recv_seq:
            raise ProtocolError("%s sent frame %d where %d was due" % (self.peer, seq, self._recv_seq))
        self._recv_seq += 1
        payload = self._recv_exact(length, "_in" + (str(slot) if slot else "") if transient else None)
        if self._mac_key is not None:
            mac = bytes(self._recv_exact(MAC_SIZE))
            t = time.perf_counter()
            if not hmac.compare_digest(mac, self._mac(header, payload, peer=True)):
                raise ProtocolError("frame %d from %s failed its MAC: refused" % (seq, self.peer))
            self.open_s += time.perf_counter() - t
        self.bytes_received += _HEADER.size + length + (MAC_SIZE if self._mac_key else 0)
        return kind, payload

    def recv(self, transient: bool = False, slot: int = 0) -> tuple[Msg, memoryview | bytearray]:
        """(kind, payload). transient: the payload is a view of a buffer the
        next transient recv() of the same slot reuses (the destination's page
        frames: no allocation per frame; a reader thread alternates slots)."""
        payload: memoryview | bytearray
        if self._open is not None:
            number, payload = self._recv_sealed(transient, slot)
        else:
            number, payload = self._recv_plain(transient, slot)
        try:
            kind = Msg(number)
        except ValueError as e:
            raise ProtocolError("%s sent unknown message type %d" % (self.peer, number)) from e
        if kind == Msg.ERROR and self.authenticated:
            raise PeerError("{} reports: {}".format(self.peer, bytes(payload).decode(errors="replace")))
        return kind, payload

    def send_error(self, text: str) -> None:
        try:
            self.send(Msg.ERROR, text.encode())
        except ProtocolError:
            pass  # the peer is gone already: nothing more to tell

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- message bodies -----------------------------------------------------------
# (binary ones; the JSON bodies are in messages.py)


def pages_head(key: int, extents: Sequence[Extent], enc: int) -> bytes:
    """What precedes the data in a PAGES body: extents are (vaddr, npages,
    zero_bitmap) with bit i of zero_bitmap set for an all-zero page, which
    travels as nothing."""
    head = [_PAGES.pack(key, len(extents), enc)]
    for vaddr, npages, zero in extents:
        head.append(_EXTENT.pack(vaddr, npages) + bytes(zero[: (npages + 7) // 8]))
    return b"".join(head)


def pages_head_max(pages: int) -> int:
    """The longest head of a PAGES body of at most `pages` pages."""
    return _PAGES.size + pages * (_EXTENT.size + 1) + pages // 8 + 1


def lz4_compress(data: BytesLike) -> bytes:
    """A PAGES body's data as one lz4 block (decode_pages knows its size)."""
    packed: bytes = lz4.block.compress(data, store_size=False)
    return packed


def encode_pages(key: int, extents: Sequence[Extent], data: BytesLike, compress: bool = True) -> tuple[bytes, bool]:
    """A PAGES body for store task `key` (pages_head); `data` holds every
    page not flagged zero, extent after extent, lz4-compressed when
    `compress` and that is smaller. Returns (body, compressed)."""
    body = bytes(data)
    enc = RAW
    if compress and body:
        packed = lz4_compress(body)
        if len(packed) < len(body):
            body, enc = packed, LZ4
    return pages_head(key, extents, enc) + body, enc == LZ4


def decode_pages(payload: BytesLike) -> tuple[int, list[Extent], bytes | memoryview]:
    """(key, [(vaddr, npages, zero_bitmap)], data of the non-zero pages).
    At most MAX_FRAME_PAGES pages, each extent page-aligned and within the
    address space, no zero bit past an extent's pages."""
    view = memoryview(payload)
    try:
        key, n, enc = _PAGES.unpack_from(view)
        extents: list[Extent] = []
        off, nonzero, total = _PAGES.size, 0, 0
        for _ in range(n):
            vaddr, npages = _EXTENT.unpack_from(view, off)
            off += _EXTENT.size
            total += npages
            if total > MAX_FRAME_PAGES:
                raise ProtocolError("PAGES frame of pid %d describes over %d pages" % (key, MAX_FRAME_PAGES))
            if vaddr % PAGE_SIZE or vaddr + npages * PAGE_SIZE >= 1 << 64:
                raise ProtocolError("PAGES frame of pid %d: %d pages at 0x%x are no page range" % (key, npages, vaddr))
            zero = bytes(view[off : off + (npages + 7) // 8])
            if len(zero) != (npages + 7) // 8:
                raise ProtocolError("PAGES frame too short for its extents")
            if npages % 8 and zero[-1] >> (npages % 8):
                raise ProtocolError("PAGES frame of pid %d marks zero pages past its %d pages" % (key, npages))
            off += (npages + 7) // 8
            extents.append((vaddr, npages, zero))
            nonzero += npages - sum(bin(b).count("1") for b in zero)
    except struct.error as e:
        raise ProtocolError("PAGES frame too short for its extents") from e
    body: bytes | memoryview = view[off:]
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


def encode_range(key: int, vaddr: int, npages: int) -> bytes:
    return _RANGE.pack(key, vaddr, npages)


def decode_range(payload: BytesLike) -> tuple[int, int, int]:
    """(key, vaddr, npages) of INVALIDATE and FETCH: a page-aligned range
    within the address space."""
    try:
        key, vaddr, npages = _RANGE.unpack(bytes(payload))
    except struct.error as e:
        raise ProtocolError(f"a range message of {len(payload)} bytes, not {_RANGE.size}") from e
    if vaddr % PAGE_SIZE or vaddr + npages * PAGE_SIZE >= 1 << 64:
        raise ProtocolError("%d pages at 0x%x of pid %d: no page range" % (npages, vaddr, key))
    return key, vaddr, npages


#: ranges of one STALE frame at most (16 bytes each)
MAX_STALE_RANGES = 1 << 16


def encode_stale(key: int, ranges: Sequence[tuple[int, int]]) -> bytes:
    """STALE: u64 key, then (u64 vaddr, u64 npages) per range of byte
    addresses [start, end): pages the destination holds an old version of."""
    return _KEY.pack(key) + b"".join(_STALE_RANGE.pack(s, (e - s) // PAGE_SIZE) for s, e in ranges)


def decode_stale(payload: BytesLike) -> tuple[int, list[tuple[int, int]]]:
    """(key, [(vaddr, npages), ...]) of a STALE frame, each a page range."""
    body = bytes(payload)
    n, rest = divmod(len(body) - _KEY.size, _STALE_RANGE.size)
    if len(body) < _KEY.size or rest or n > MAX_STALE_RANGES:
        raise ProtocolError(f"a STALE frame of {len(body)} bytes")
    (key,) = _KEY.unpack_from(body)
    ranges = list(_STALE_RANGE.iter_unpack(body[_KEY.size :]))
    for vaddr, npages in ranges:
        if vaddr % PAGE_SIZE or vaddr + npages * PAGE_SIZE >= 1 << 64:
            raise ProtocolError("%d pages at 0x%x of pid %d: no page range" % (npages, vaddr, key))
    return key, ranges


_ROUND_NUMBER = struct.Struct("!I")


def encode_round_number(n: int) -> bytes:
    """ROUND_START, STREAM_ROUND: u32 round."""
    return _ROUND_NUMBER.pack(n)


def decode_round_number(payload: BytesLike) -> int:
    try:
        (n,) = _ROUND_NUMBER.unpack(bytes(payload))
    except struct.error as e:
        raise ProtocolError(f"a round number of {len(payload)} bytes, not {_ROUND_NUMBER.size}") from e
    return int(n)


def encode_ack(n: int, pages: int, stats: bytes = b"") -> bytes:
    """ROUND_ACK: the round's number, the pages the store holds, then the
    destination's stats of the round (messages.Stored), if any."""
    return _ACK.pack(n, pages) + stats


def decode_ack(payload: BytesLike) -> tuple[int, int]:
    try:
        return _ACK.unpack_from(payload)
    except struct.error as e:
        raise ProtocolError("ROUND_ACK message too short") from e


def ack_stats(payload: BytesLike) -> memoryview:
    """The stats after ROUND_ACK's head (empty if none)."""
    return memoryview(payload)[_ACK.size :]


def encode_file(name: str, offset: int, data: BytesLike) -> bytes:
    raw = name.encode()
    return struct.pack("!HQ", len(raw), offset) + raw + data


def decode_file(payload: BytesLike) -> tuple[str, int, bytes]:
    """(name, offset, data): a part of an image file."""
    try:
        n, offset = struct.unpack_from("!HQ", payload)
        name = bytes(payload[10 : 10 + n]).decode()
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed FILE message: {e}") from e
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name) != n:
        raise ProtocolError(f"refusing image file name {name!r}")
    return name, offset, bytes(payload[10 + n :])


def _load_tls(ctx: ssl.SSLContext, what: str, fn: Callable[..., None], *args: StrPath) -> ssl.SSLContext:
    try:
        fn(*args)
    except (OSError, ssl.SSLError) as e:
        raise UsageError("cannot load TLS %s %s: %s" % (what, " / ".join(map(str, args)), e)) from e
    return ctx


def tls_server_context(cert: StrPath, key_file: StrPath, ca: StrPath) -> ssl.SSLContext:
    """TLS for `serve`: its certificate, and the CA that must have signed
    every source's certificate (mutual authentication)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_tls(ctx, "certificate / key", ctx.load_cert_chain, cert, key_file)
    return _load_tls(ctx, "CA", ctx.load_verify_locations, ca)


@dataclass
class TlsClient:
    """TLS for `run`: the context (CA, our certificate) and what identifies
    the destination: the name its certificate must carry, or the SHA-256
    fingerprint of that certificate."""

    context: ssl.SSLContext
    name: str | None = None
    fingerprint: bytes | None = None

    def wrap(self, sock: socket.socket, peer: str) -> ssl.SSLSocket:
        tls = self.context.wrap_socket(sock, server_hostname=self.name)
        if self.fingerprint is not None:
            cert = tls.getpeercert(binary_form=True)
            assert cert is not None  # the handshake verified it (PROTOCOL_TLS_CLIENT: CERT_REQUIRED)
            got = hashlib.sha256(cert).digest()
            if not hmac.compare_digest(got, self.fingerprint):
                tls.close()
                raise ProtocolError(
                    "%s presented the certificate %s, not the one expected (--tls-fingerprint)" % (peer, got.hex())
                )
        return tls


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint as openssl prints it (colons or not)."""
    try:
        raw = bytes.fromhex(text.replace(":", "").removeprefix("sha256//").strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"--tls-fingerprint {text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return raw


def tls_client_context(
    ca: StrPath, cert: StrPath, key_file: StrPath, name: str | None = None, fingerprint: str | None = None
) -> TlsClient:
    """TLS for `run`: mutual (our certificate for the destination to check),
    and the destination identified by name or by fingerprint, as any
    certificate of the CA is not enough."""
    if not name and not fingerprint:
        raise UsageError("with --tls-ca, say which destination to accept: --tls-name NAME or --tls-fingerprint SHA256")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = bool(name)  # a name (or an address) the certificate must carry
    _load_tls(ctx, "CA", ctx.load_verify_locations, ca)
    _load_tls(ctx, "certificate / key", ctx.load_cert_chain, cert, key_file)
    return TlsClient(ctx, name or None, parse_fingerprint(fingerprint) if fingerprint else None)


# A peer that stops answering (the link cut, the host gone without a FIN)
# fails the session within this many seconds instead of after TCP's own
# ~15 minutes of retries: unacknowledged data, or keepalive probes on an
# idle connection (the source waiting for RESULT, the destination between
# rounds), give up after it.
DEAD_PEER_S = 30
_KEEPALIVE_IDLE_S, _KEEPALIVE_INTERVAL_S = 10, 5


def tune(sock: socket.socket) -> None:
    """TCP options of a session socket, on both sides."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, (DEAD_PEER_S - _KEEPALIVE_IDLE_S) // _KEEPALIVE_INTERVAL_S)


def connect(
    addr: str | tuple[str, int],
    key: bytes,
    timeout: float = HANDSHAKE_DEADLINE_S * 2,
    tls: TlsClient | None = None,
    idle_timeout: float | None = None,
    mode: int = SEALED,
    stream: bool = False,
) -> Channel:
    """An authenticated channel to addr: `timeout` bounds the connection and
    the whole handshake, `idle_timeout` (None: no bound) every wait after
    them. `tls`: a TlsClient. `stream`: a page stream of a session (STREAM_FLAG)."""
    host, port = parse_addr(addr) if isinstance(addr, str) else addr
    peer = "%s:%d" % (host, port)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ProtocolError("cannot connect to %s: %s" % (peer, e.strerror or e)) from e
    tune(sock)
    if tls is not None:
        try:
            sock = tls.wrap(sock, peer)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise ProtocolError("TLS with %s failed: %s" % (peer, e)) from e
    ch = Channel(sock, peer, deadline=deadline, stream=stream)
    try:
        ch.client_handshake(key, mode)
    except BaseException:
        ch.close()
        raise
    sock.settimeout(idle_timeout)
    return ch
