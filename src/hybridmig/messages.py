"""The JSON bodies of the messages between `run` and `serve`: HOST, RESTORE,
ROUND's stats, RESULT, OUTCOME and CONTAINER (docs/protocol.md), written and read by
both sides through these dataclasses.

A module beside wire.py rather than inside it: wire.py is the frames (the
handshake, sealing, the binary bodies of the data path: PAGES, ranges,
FILE); these are what a session says, and what serve and run each read of
the other.

`decode` trusts nothing of the bytes: a body is a JSON object of at most
MAX_JSON bytes holding every field of its message and no other, each of
its type (an int is no bool, a number finite), strings, lists and objects
bounded; anything else is a ProtocolError naming the message and the
field. The destination treats an authenticated source as limited, and the
source reads the destination's bodies the same way.
"""

import dataclasses
import json
import math
import re
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from .errors import ProtocolError
from .wire import Msg

MAX_JSON = 1 << 20  # bytes of one JSON body
MAX_TEXT = 4096  # characters of a string: a name, an id, a CRIU option
MAX_ERROR = 64 << 10  # characters of RESULT's error (it quotes CRIU's log)
MAX_ITEMS = 1024  # entries of a list or an object
MAX_INT = (1 << 63) - 1  # counts and pids: never negative

# what serve tells of a session's copy (OUTCOME)
OUTCOMES = ("kept", "ended", "pending", "unknown")
# the container engines serve may restore into (HOST, CONTAINER)
ENGINES = ("podman",)
# a container's name: podman's rule (libpod/define.NameRegex), bounded
CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,252}")

_ROUND = struct.Struct("!I")  # ROUND's round number, before its JSON stats
_MISSING = object()
# the Python types JSON gives for each field type (an int is no bool; JSON
# has one number type, so a float field may come as an int)
_JSON_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,)}


def _fail(msg: str, path: str, what: str) -> typing.NoReturn:
    raise ProtocolError(f"{msg} body: {path} {what}")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _check(msg: str, path: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """`value` as the field at `path` (criu_opts[3]) of type `tp`: str,
    int, float, bool, list[T], dict[str, T], T | None, or Any (any JSON
    value, bounded by the body's size); a ProtocolError if it is not one."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:  # T | None
        if value is None:
            return None
        (tp,) = (a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(value) not in _JSON_TYPES[origin or tp]:
        _fail(msg, path, f"has type {type(value).__name__}, not {_type_name(tp)}")
    if tp is int and not 0 <= value <= MAX_INT:
        _fail(msg, path, f"is {value}: not a count (0 to 2^63-1)")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            _fail(msg, path, f"is {value}")
    if tp is str:
        limit = meta.get("max_len", MAX_TEXT)
        if len(value) > limit:
            _fail(msg, path, "is %d characters long (at most %d)" % (len(value), limit))
        if "choices" in meta and value not in meta["choices"]:
            _fail(msg, path, "is %r, none of %s" % (value[:80], ", ".join(meta["choices"])))
    if origin in (list, dict) and len(value) > MAX_ITEMS:
        _fail(msg, path, "holds %d entries (at most %d)" % (len(value), MAX_ITEMS))
    if origin is list:
        return [_check(msg, f"{path}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
    if origin is dict:
        for k in value:
            _check(msg, f"a key of {path}", k, str, {})
        return {k: _check(msg, f"{path}[{k!r}]", v, args[1], {}) for k, v in value.items()}
    return value


def _json_object(msg: str, payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    if len(payload) > MAX_JSON:
        raise ProtocolError("%s body of %d bytes (at most %d)" % (msg, len(payload), MAX_JSON))

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is no number")

    try:
        obj = json.loads(bytes(payload), parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise ProtocolError(f"{msg} body: malformed JSON: {e}") from e
    if type(obj) is not dict:
        raise ProtocolError(f"{msg} body: JSON that is no object: {str(obj)[:80]}")
    return obj


@dataclass
class Body:
    """A JSON message body: its fields are the JSON object's, in order."""

    KIND: ClassVar[Msg]

    def as_dict(self) -> dict[str, Any]:
        """The JSON object on the wire."""
        return dataclasses.asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.as_dict()).encode()

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> Self:
        return cls._from(_json_object(cls.KIND.name, payload))

    @classmethod
    def _from(cls, obj: dict[str, Any], names: typing.Collection[str] | None = None) -> Self:
        """An instance from a JSON object holding the fields `names`
        (default: all), and no other."""
        msg = cls.KIND.name
        fields = {f.name: f for f in dataclasses.fields(cls)}
        names = fields.keys() if names is None else names
        for key in obj:
            if key not in names:
                _fail(msg, "field " + key[:80], "is none of its fields (%s)" % ", ".join(names))
        values = {}
        for name in names:
            value = obj.get(name, _MISSING)
            if value is _MISSING:
                _fail(msg, name, "is missing")
            f = fields[name]
            values[name] = _check(msg, name, value, f.type, f.metadata)
        return cls(**values)


@dataclass
class Host(Body):
    """HOST (D→S), the first message of every connection: the source
    refuses a process that is not its pid namespace's init on the same
    machine (boot_id), and the CRIU options the destination does not
    allow; `session` names this migration for OUTCOME; `containers`, the
    engines (ENGINES) serve restores containers into (`serve --podman`)."""

    KIND = Msg.HOST
    boot_id: str
    kernel: str
    session: str
    criu_opts_allowed: list[str]
    containers: list[str] = field(default_factory=list)

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> Self:
        host = super().decode(payload)
        for i, engine in enumerate(host.containers):
            if engine not in ENGINES:
                _fail("HOST", f"containers[{i}]", "is %r, none of %s" % (engine[:80], ", ".join(ENGINES)))
        return host


@dataclass
class Restore(Body):
    """RESTORE (S→D): restore now, with these options of `run --criu-opt`
    (serve checks them against its allowlist). `postcopy`: the store lacks
    pages the source still owes (the final dirty set was not sent): the copy
    resumes at once and pulls them (FETCH) while the source pushes them."""

    KIND = Msg.RESTORE
    criu_opts: list[str]
    postcopy: bool = False
    #: post-copy: how long the source tries to come back after a broken link (its --timeout)
    reconnect_s: float = 120.0


@dataclass
class RoundStats(Body):
    """ROUND (S→D): the u32 round number, then the round's stats as JSON
    (its `number` the same). source/precopy.py's Round is these stats; a
    stat of a round goes here, as serve refuses fields it does not know."""

    KIND = Msg.ROUND
    number: int
    pages_scanned: int = 0
    pages_written: int = 0  # to send in this round (or carried to the final one)
    pages_hot: int = 0  # also owed, left for the final round (hot pages)
    pages_sent: int = 0
    pages_zero: int = 0
    bytes_raw: int = 0
    bytes_wire: int = 0
    frames: int = 0  # PAGES frames sent
    frames_lz4: int = 0  # of them, lz4-compressed (the others failed the probe or did not shrink)
    duration_s: float = 0.0
    rate_mb_s: float = 0.0  # bytes_raw over duration_s
    # where duration_s went (the rest: scans' bookkeeping, throttling)
    scan_s: float = 0.0
    read_s: float = 0.0  # reading the tasks' pages (process_vm_readv, zero pages), or waiting for the reader thread
    read_ahead_s: float = 0.0  # the reader thread's time in reads (overlaps the others)
    # page streams (run --streams): their threads' time compressing, sealing
    # and sending, summed over the streams (overlaps the round's other
    # parts; encode_s, seal_s and send_s are then the caller's thread's:
    # send_s its wait for the streams)
    streams_s: float = 0.0
    encode_s: float = 0.0  # the lz4 probe and compression, frame heads
    seal_s: float = 0.0  # sealing (or MACing) the frames
    send_s: float = 0.0  # in the socket: the link's pace, or the destination's
    ack_s: float = 0.0  # waiting for the destination to store the round
    cpu_s: float = 0.0  # the source's CPU time (all of run's threads) during the round
    # the destination's side of the round, from its ROUND_ACK (Stored)
    dest_frames: int = 0
    dest_recv_s: float = 0.0
    dest_open_s: float = 0.0
    dest_store_s: float = 0.0
    dest_cpu_s: float = 0.0
    dirty_rate_pps: float = 0.0
    bandwidth_bps: float = 0.0
    est_downtime_ms: float = 0.0
    throttle_pct: float = 0.0  # auto-converge: share of the time the tree was held
    # the tree's share of the CPU it asked for (running over running +
    # waiting for a CPU), and the default pacing's part (source/pacing.py):
    # windows in which the tree got less than --keep-cpu, the limit at the end
    tree_cpu_share: float = 1.0
    paced_windows: int = 0
    pace_limit_mb_s: float = 0.0

    def encode(self) -> bytes:
        return _ROUND.pack(self.number) + super().encode()

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> Self:
        try:
            (number,) = _ROUND.unpack_from(payload)
        except struct.error as e:
            raise ProtocolError("ROUND message too short") from e
        stats = cls._from(_json_object("ROUND", memoryview(payload)[_ROUND.size :]))
        if stats.number != number:
            _fail("ROUND", "number", f"is {stats.number}, not the round's {number}")
        return stats


@dataclass
class Stored(Body):
    """ROUND_ACK (D→S) after its binary head (wire.encode_ack): where the
    destination's time went since the previous ROUND_ACK, the source's
    round, as seen from the other end."""

    KIND = Msg.ROUND_ACK
    frames: int = 0  # PAGES frames stored
    recv_s: float = 0.0  # waiting for the next frame: the source's pace (or the link's), the copy out of the kernel
    open_s: float = 0.0  # opening the sealed frames (or checking their MAC); in the inbound thread, if any
    store_s: float = 0.0  # decoding PAGES bodies and putting them into the page store
    cpu_s: float = 0.0  # serve's CPU time (all its threads)


@dataclass
class Result(Body):
    """RESULT (D→S): how the restore went. A failure is `ok`, `error` and
    `ran` (the restored tasks were released by CRIU: the copy may have run)
    alone; a success every other field. `lazy` is the lazy-pages daemon's
    stats (destination/lazypages.py), any JSON object: run only reports it;
    `restore_breakdown_ms` splits restore_s (docs/protocol.md); `postcopy`
    the remote faults and pushed pages of a post-copy (destination/postcopy.py)."""

    KIND = Msg.RESULT
    ok: bool
    error: str | None = field(default=None, metadata={"max_len": MAX_ERROR})
    restored_pid: int | None = None
    restore_s: float = 0.0
    installed_s: float = 0.0
    remote_pages: int = 0
    lazy: dict[str, Any] = field(default_factory=dict)
    restore_breakdown_ms: dict[str, float] = field(default_factory=dict)
    postcopy: dict[str, Any] = field(default_factory=dict)
    ran: bool = False

    def as_dict(self) -> dict[str, Any]:
        if not self.ok:
            return {"ok": False, "error": self.error, "ran": self.ran}
        return {k: v for k, v in super().as_dict().items() if k not in ("error", "ran")}

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> Self:
        obj = _json_object("RESULT", payload)
        if type(obj.get("ok")) is not bool:
            _fail("RESULT", "ok", "is missing, or no bool")
        if not obj["ok"]:
            result = cls._from(obj, ("ok", "error", "ran"))
            if result.error is None:
                _fail("RESULT", "error", "is null in a failure")
            return result
        return cls._from(obj, [f.name for f in dataclasses.fields(cls) if f.name not in ("error", "ran")])


@dataclass
class OutcomeQuery(Body):
    """OUTCOME (S→D), the first message of a new connection: what became of
    that session's copy?"""

    KIND = Msg.OUTCOME
    session: str


@dataclass
class Resume(Body):
    """RESUME (S→D as the first message of a new connection, D→S as its
    answer): the post-copy of this session goes on here, its old connection
    broken."""

    KIND = Msg.RESUME
    session: str


@dataclass
class Outcome(Body):
    """OUTCOME (D→S): the answer, one of OUTCOMES; the connection then closes."""

    KIND = Msg.OUTCOME
    session: str
    outcome: str = field(metadata={"choices": OUTCOMES})


@dataclass
class Container(Body):
    """CONTAINER (S→D), the first message of a container's migration,
    before any page: what is migrated is a container of `engine`
    (ENGINES), to run under `name`, made from `image` (the destination
    checks now that it has the image and no container of that name, and
    answers with the same body, D→S, or ERROR). The container's
    configuration comes in CONTAINER_START; the root file system's changes
    (podman.PODMAN_FILES) as FILE frames by those names, beside CRIU's
    images."""

    KIND = Msg.CONTAINER
    engine: str = field(metadata={"choices": ENGINES})
    name: str
    image: str

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> Self:
        body = super().decode(payload)
        if not CONTAINER_NAME.fullmatch(body.name):
            _fail("CONTAINER", "name", "is %r: no container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)" % body.name[:80])
        return body


@dataclass
class ContainerStart(Body):
    """CONTAINER_START (S→D), once, after CONTAINER and before RESTORE
    (`run` sends it after pre-copy's first round, or at the latest just
    before the freeze): podman's configuration of the container
    (config.dump) and its OCI spec (spec.dump), as podman wrote them at its
    checkpoint's start. The destination starts its restore with them, held
    where podman starts conmon until RESTORE (docs/containers.md), or in
    CRIU, whose config file then takes `criu_opts` (run --criu-opt) now:
    RESTORE must name the same."""

    KIND = Msg.CONTAINER_START
    config: dict[str, Any]
    spec: dict[str, Any]
    criu_opts: list[str]


@dataclass
class Streams(Body):
    """STREAMS (S→D on the control channel, after HOST, before any page):
    the rounds' pages come over `count` page streams (run --streams), each
    a connection of its own that joins with STREAM."""

    KIND = Msg.STREAMS
    count: int


@dataclass
class Stream(Body):
    """STREAM (S→D, the first message of a page stream; D→S the same body
    as the answer, or ERROR): stream `index` of `session`, `proof`
    (hex) = wire.stream_proof over this connection's handshake."""

    KIND = Msg.STREAM
    session: str
    index: int
    proof: str


@dataclass
class Faults(Body):
    """FAULTS (S→D on the control channel, after HOST, before any page;
    D→S the same body or ERROR): post-copy's remote faults and their pages
    go over a connection of their own, which joins with STREAM (index
    wire.FAULT_LANE) as a page stream does."""

    KIND = Msg.FAULTS
    count: int = 1
