"""A TCP relay between run and serve, for tests: started in a host's
namespace as a script, it prints "listening", takes connections on LISTEN,
connects each to TARGET on the same address and passes bytes both ways.

    python relay.py HOST LISTEN TARGET tap FILE      every byte, both ways, also to FILE (a sniffer)
    python relay.py HOST LISTEN TARGET cut N         resets both connections once N bytes went to TARGET
    python relay.py HOST LISTEN TARGET slow R        passes bytes to TARGET at R bytes/s (answers at once)
    python relay.py HOST LISTEN TARGET drop-done     drops the first DONE from TARGET; later connections pass
    python relay.py HOST LISTEN TARGET drop-done refuse-later   ... and later connections are closed at once

    python relay.py HOST LISTEN TARGET cut-conn K:N  every connection at once; resets only the K-th
                                                   (from 0) once N bytes of it went to TARGET
    python relay.py HOST LISTEN TARGET slow-all R    every connection at once, each at R bytes/s to TARGET

tap, cut and slow relay one connection and exit when it ends; cut-conn and
slow-all relay connections at once (run --streams: the control connection
and its page streams) until killed.
"""

import os
import socket
import struct
import sys
import threading
import time

DONE_SEALED = 1 + 16  # a sealed frame's length: DONE is the one with only its type and the AEAD tag
AUTH_OK = 2  # the last frame whose type shows; sealed frames follow


def _shut(*socks):
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _exact(s, n):
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf


def forward(a, b, limit=None, rate=None, tap=None, lock=None):
    """a's bytes to b; `limit`: reset both past it; `rate`: bytes/s; `tap`: a copy to that file."""
    passed, t0 = 0, time.monotonic()
    try:
        while data := a.recv(1 << 16):
            if tap is not None:
                with lock:
                    tap.write(data)
            b.sendall(data)
            passed += len(data)
            if limit is not None and passed >= limit:
                print("cut after %d bytes" % passed, flush=True)
                for s in (a, b):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                os._exit(0)  # closes both at once (a close here would wait for the other thread's recv)
            if rate:
                time.sleep(max(0.0, passed / rate - (time.monotonic() - t0)))
    except OSError:
        pass
    _shut(a, b)


def forward_cut(a, b, limit):
    """a's bytes to b; past `limit`, reset this one connection (both legs),
    the relay going on with the others."""
    passed = 0
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
            passed += len(data)
            if passed >= limit:
                print("cut after %d bytes" % passed, flush=True)
                for s in (a, b):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                break
    except OSError:
        pass
    _shut(a, b)
    for s in (a, b):
        s.close()


def relay_all(lsock, host, target, mode, arg):
    """cut-conn and slow-all: each connection in threads of its own."""
    n = 0
    while True:
        conn, _ = lsock.accept()
        far = socket.create_connection((host, int(target)))
        up = forward, {}
        if mode == "slow-all":
            up = forward, {"rate": int(arg)}
        elif int(arg.split(":")[0]) == n:
            up = forward_cut, {"limit": int(arg.split(":")[1])}
        n += 1
        threading.Thread(target=up[0], args=(conn, far), kwargs=up[1], daemon=True).start()
        threading.Thread(target=forward, args=(far, conn), daemon=True).start()


def drop_done(src, dst):
    """The destination's frames (16-byte header: type, flags, reserved,
    length, sequence) to the source, but the first DONE: after AUTH_OK
    only a frame's length shows, and DONE is the one of DONE_SEALED bytes."""
    sealed = dropped = False
    try:
        while True:
            if sealed:
                header = _exact(src, 4)
                (length,) = struct.unpack("!I", header)
                frame = header + _exact(src, length)
                if length == DONE_SEALED and not dropped:
                    dropped = True
                    print("dropped DONE", flush=True)
                    continue
            else:
                header = _exact(src, 16)
                kind, _, _, length, _ = struct.unpack("!BBHIQ", header)
                frame = header + _exact(src, length)
                sealed = kind == AUTH_OK
            dst.sendall(frame)
    except (EOFError, OSError):
        pass
    _shut(src, dst)


def main(host, listen, target, mode, arg=None):
    lsock = socket.create_server((host, int(listen)))
    print("listening", flush=True)
    if mode in ("cut-conn", "slow-all"):
        relay_all(lsock, host, target, mode, arg)
    first = True
    while True:
        conn, _ = lsock.accept()
        if not first and arg == "refuse-later":
            print("refused a connection", flush=True)
            conn.close()
            continue
        far = socket.create_connection((host, int(target)))
        if mode == "drop-done":
            back = drop_done if first else forward
            first = False
            threading.Thread(target=forward, args=(conn, far), daemon=True).start()
            threading.Thread(target=back, args=(far, conn), daemon=True).start()
            continue
        tap = open(arg, "wb") if mode == "tap" else None
        up = {"limit": int(arg)} if mode == "cut" else {"rate": int(arg)} if mode == "slow" else {}
        lock = threading.Lock()
        threads = [
            threading.Thread(target=forward, args=(conn, far), kwargs=dict(up, tap=tap, lock=lock)),
            threading.Thread(target=forward, args=(far, conn), kwargs=dict(tap=tap, lock=lock)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if tap is not None:
            tap.close()
        return


if __name__ == "__main__":
    main(*sys.argv[1:6])
