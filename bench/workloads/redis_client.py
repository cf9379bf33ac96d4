"""Load generator for the redis bench workload, run as its own process with
the system python3 (standard library only), so that the bench's own Python
does not disturb its timing.

It alternates GET and SET on random keys of the DEBUG POPULATE dataset at
``--rate`` operations/s.  Every GET is checked against the populated value;
every SET writes back exactly that value, so the SETs dirty redis's memory
(a new allocation per SET) while leaving ``DEBUG DIGEST`` unchanged.

redis lives in a network namespace (the source "host", later the
destination): the client enters it with setns() to connect over loopback.
When the connection breaks (the dump killed redis) it tries both namespaces
until one accepts, and never opens a second connection while the first one
is alive: a connection waiting in the accept queue of a frozen redis would
be an in-flight connection that CRIU refuses to dump.

Reports are JSON lines appended to ``--report`` (one write() each):
"ready" after the first successful operation, a "snapshot" on SIGUSR1 and
a "final" one on SIGTERM, after which it exits.  Successful operations are
counted per 100 ms bucket on CLOCK_REALTIME, with the longest gap between
two successful replies.
"""

import argparse
import ctypes
import os
import random
import signal
import socket
import sys
import time

from progkit import Pacer, Timeline, append_line

CLONE_NEWNET = 0x40000000
RECV_TIMEOUT_S = 120  # only a safety net: a frozen redis may legitimately take long
STALL_S = 0.05  # a reply this late: look whether redis answers in another namespace


def populated_value(index, size):
    """What `DEBUG POPULATE n key size` stores under key:index (redis debug.c:
    "value:N" copied into a zero-filled buffer of ``size`` bytes)."""
    head = b"value:%d" % index
    return head[:size] + b"\0" * (size - len(head))


def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Moved(ConnectionError):
    """redis answers in another namespace while this connection waits."""

    def __init__(self, conn, name):
        super().__init__(f"redis answers in {name}")
        self.conn, self.name = conn, name


class Conn:
    """One RESP connection; raises OSError when it breaks. ``on_stall()`` is
    called whenever a reply is STALL_S late: it raises Moved when redis
    answers elsewhere. A real deployment moves the address with the process,
    and the old peer's retransmission then meets a reset at once; here the
    namespaces have different addresses, and the frozen source's socket
    stays silent until the source ends, which for post-copy is only once
    all its memory is gone."""

    def __init__(self, sock, on_stall=lambda: None):
        self.sock = sock
        self.buf = b""
        self.on_stall = on_stall
        self.sock.settimeout(STALL_S)

    def _fill(self):
        waited = 0.0
        while True:
            try:
                data = self.sock.recv(1 << 16)
                break
            except TimeoutError:
                waited += STALL_S
                if waited >= RECV_TIMEOUT_S:
                    raise
                self.on_stall()
        if not data:
            raise ConnectionResetError("redis closed the connection")
        self.buf += data

    def _line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2 :]
                return line
            self._fill()

    def _exactly(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def call(self, *args):
        self.sock.sendall(command(*args))
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n)
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RedisReplyError(rest.decode(errors="replace"))
        raise ConnectionResetError(f"unexpected reply {line[:40]!r}")

    def close(self):
        self.sock.close()


class RedisReplyError(Exception):
    pass


class NetnsConnector:
    """Connects to 127.0.0.1:port inside one of the named network namespaces."""

    def __init__(self, names, port):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.names, self.port = names, port

    def _enter(self, name):
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if self.libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def connect(self, name):
        self._enter(name)  # a socket belongs to the netns current at socket()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)
            sock.connect(("127.0.0.1", self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return Conn(sock, lambda: self.probe_others(name))

    def probe_others(self, current):
        """Raise Moved with a connection to redis in another namespace if
        it answers a PING there within STALL_S."""
        for name in self.names:
            if name == current:
                continue
            try:
                conn = self.connect(name)
            except OSError:
                continue
            conn.on_stall = _no_answer
            try:
                answered = conn.call(b"PING") == b"PONG"
            except (OSError, RedisReplyError):
                answered = False
            if answered:
                conn.on_stall = lambda name=name: self.probe_others(name)
                raise Moved(conn, name)
            conn.close()


def _no_answer():
    raise TimeoutError(f"no answer within {STALL_S} s")


class Stats(Timeline):
    def __init__(self):
        super().__init__()
        self.gets = self.sets = 0
        self.bad_reads = 0
        self.first_bad = None
        self.reconnects = 0
        self.errors = 0
        self.call_errors = []  # the first few errors of established connections
        self.last_error = None
        self.netns = None

    def report(self, event):
        return {
            "event": event,
            "pid": os.getpid(),
            "time": time.time(),
            "gets": self.gets,
            "sets": self.sets,
            "bad_reads": self.bad_reads,
            "first_bad": self.first_bad,
            "reconnects": self.reconnects,
            "errors": self.errors,
            "call_errors": self.call_errors,
            "last_error": self.last_error,
            "netns": self.netns,
            "last_ok": self.last,
            **super().report(),
        }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", action="append", required=True, help="namespace to look for redis in (repeat)")
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--keys", type=int, required=True)
    ap.add_argument("--value-size", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1000, help="operations/s, 0: unlimited")
    ap.add_argument("--report", required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    stats = Stats()
    connector = NetnsConnector(args.netns, args.port)
    rng = random.Random(args.seed)

    def on_usr1(signum, frame):
        append_line(args.report, stats.report("snapshot"))

    def on_term(signum, frame):
        append_line(args.report, stats.report("final"))
        os._exit(0)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)

    conn = None
    ready = False
    pacer = Pacer(args.rate)
    turn = 0
    while True:
        if conn is None:
            for name in args.netns:
                try:
                    conn = connector.connect(name)
                    stats.netns = name
                    break
                except OSError as exc:
                    stats.last_error = f"connect {name}: {exc}"
            if conn is None:
                time.sleep(0.005)
                continue
        key_index = rng.randrange(args.keys)
        key = b"key:%d" % key_index
        want = populated_value(key_index, args.value_size)
        try:
            if turn == 0:
                got = conn.call(b"GET", key)
                stats.gets += 1
                if got != want:
                    stats.bad_reads += 1
                    if stats.first_bad is None:
                        stats.first_bad = {
                            "key": key.decode(),
                            "got": None if got is None else got[:32].decode("latin-1"),
                        }
            else:
                conn.call(b"SET", key, want)
                stats.sets += 1
        except Moved as moved:
            conn.close()
            conn, stats.netns = moved.conn, moved.name
            stats.reconnects += 1
            continue
        except (OSError, RedisReplyError) as exc:
            stats.errors += 1
            stats.last_error = f"{time.time():.3f} {type(exc).__name__}: {exc}"
            if len(stats.call_errors) < 10:
                stats.call_errors.append(stats.last_error)
            conn.close()
            conn = None
            stats.reconnects += 1
            continue
        turn ^= 1
        now = time.time()
        stats.tick(now)
        if not ready:
            ready = True
            append_line(args.report, stats.report("ready"))
        pacer.wait(now)


if __name__ == "__main__":
    sys.exit(main())
