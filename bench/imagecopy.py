"""Copy a CRIU images directory over TCP: what an operator does between
`criu dump` and `criu restore` on another host (scp, rsync, ...), without
their CPU cost for ciphers, so the link is the bottleneck.

    python -m hybridmig.bench.imagecopy recv ADDR:PORT DIR   # prints "listening", takes one sender
    python -m hybridmig.bench.imagecopy send ADDR:PORT DIR

Stream: per entry one JSON line {"name", "size"} or {"name", "symlink"},
then `size` bytes (os.sendfile on the sending side); {"end": true} last.
Regular files and symlinks (CRIU's `parent` link of pre-dump chains) only;
the receiver refuses names that would leave DIR.
"""

import json
import os
import socket
import sys

CHUNK = 1 << 20


def _split(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def send(addr, directory):
    with socket.create_connection(_split(addr), timeout=60) as sock:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.islink(path):
                sock.sendall(json.dumps({"name": name, "symlink": os.readlink(path)}).encode() + b"\n")
                continue
            if not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            sock.sendall(json.dumps({"name": name, "size": size}).encode() + b"\n")
            with open(path, "rb") as f:
                sent = 0
                while sent < size:
                    sent += sock.sendfile(f, offset=sent, count=size - sent) or 0
        sock.sendall(b'{"end": true}\n')
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(2) != b"ok":
            raise SystemExit("imagecopy: the receiver did not confirm")


def recv(addr, directory):
    os.makedirs(directory, exist_ok=True)
    with socket.create_server(_split(addr)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
    with conn, conn.makefile("rb") as stream:
        while True:
            head = json.loads(stream.readline() or b'{"end": true}')
            if head.get("end"):
                break
            name = head["name"]
            if "/" in name or name in (".", ".."):
                raise SystemExit(f"imagecopy: refusing entry name {name!r}")
            path = os.path.join(directory, name)
            if "symlink" in head:
                os.symlink(head["symlink"], path)
                continue
            left = head["size"]
            with open(path, "wb") as f:
                while left:
                    data = stream.read(min(CHUNK, left))
                    if not data:
                        raise SystemExit(f"imagecopy: stream ended inside {name}")
                    f.write(data)
                    left -= len(data)
        conn.sendall(b"ok")


def main(argv):
    if len(argv) != 3 or argv[0] not in ("send", "recv"):
        raise SystemExit(__doc__)
    (send if argv[0] == "send" else recv)(argv[1], argv[2])


if __name__ == "__main__":
    main(sys.argv[1:])
