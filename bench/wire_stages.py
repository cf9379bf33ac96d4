"""Benchmark: the CPU each step of the page data path costs per GiB, each
measured alone in one thread (`time.thread_time`, best of 3), on 1 MiB
frames as pre-copy sends them.

    .venv/bin/python -m bench.wire_stages [--mb 256]

Pages are read from this process itself (process_vm_readv needs no
privilege on oneself): random pages, and untouched (zero) ones, which the
zero detection reads whole. Where a migration's time goes as a whole is in
its rounds (`run --json`, rounds[i]) and in `python -m bench.wire
--profile`; this says what each step would cost alone (docs/bench-wire.md).
Indicative: other processes on the machine slow each step."""

import argparse
import ctypes
import hashlib
import hmac
import os
import socket
import sys
import threading
import time

import lz4.block
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hybridmig import wire
from hybridmig.bindings import tracker as native
from hybridmig.bindings.pagestore import PAGE_SIZE, PageStore

FRAME = 1 << 20
GiB = 1 << 30


def cpu_per_gib(fn, nbytes, reps=3):
    """CPU seconds of this thread per GiB that fn() handles in nbytes."""
    best = min(_timed(fn) for _ in range(reps))
    return best * GiB / nbytes


def _timed(fn):
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def frames(region):
    """Page-aligned 1 MiB views of a buffer (its start rounded up)."""
    view = memoryview(region)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    skip = -addr % PAGE_SIZE
    n = (len(view) - skip) // FRAME
    return [(addr + skip + i * FRAME, view[skip + i * FRAME : skip + (i + 1) * FRAME]) for i in range(n)]


def socket_cpu(data, count):
    """(sender, receiver) CPU s/GiB of 1 MiB sendall into recv_into over TCP loopback."""
    ls = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    ls.close()
    got = {}

    def reader():
        t, buf, left = time.thread_time(), memoryview(bytearray(FRAME)), count * FRAME
        while left:
            left -= b.recv_into(buf[: min(FRAME, left)])
        got["cpu"] = time.thread_time() - t

    th = threading.Thread(target=reader)
    th.start()
    send = _timed(lambda: [a.sendall(data) for _ in range(count)])
    th.join(60)
    a.close()
    b.close()
    return send * GiB / (count * FRAME), got["cpu"] * GiB / (count * FRAME)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="bytes handled per measurement")
    args = ap.parse_args(argv)
    n = args.mb * FRAME
    count = args.mb
    pid = os.getpid()
    rand_mem = bytearray(os.urandom(n + PAGE_SIZE))
    zero_mem = bytearray(n + PAGE_SIZE)  # untouched: each page reads as the zero page
    buf = bytearray(FRAME)
    res = {}

    def read(region):
        return lambda: [native.read_pages_into(pid, addr, buf) for addr, _ in frames(region)]

    res["read + zero detection + packing, random pages (hm_read_pages)"] = cpu_per_gib(read(rand_mem), n)
    res["read + zero detection, all-zero pages (hm_read_pages)"] = cpu_per_gib(read(zero_mem), n)
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        res["read alone, random pages (/proc/self/mem preadv)"] = cpu_per_gib(
            lambda: [os.preadv(fd, [buf], addr) for addr, _ in frames(rand_mem)], n
        )
    finally:
        os.close(fd)
    rand = bytes(frames(rand_mem)[0][1])
    line = b'{"id": %d, "name": "user%d", "score": %d, "tags": ["a", "b"]}\n'
    text = b"".join(line % (i, i * 7 % 1000, i * 13 % 997) for i in range(FRAME // 40))[:FRAME]
    probe = [rand[k * FRAME // 4 : k * FRAME // 4 + PAGE_SIZE] for k in range(4)]
    res["lz4 probe, 4 pages of a random frame"] = cpu_per_gib(
        lambda: [wire.lz4_compress(p) for _ in range(count) for p in probe], n
    )
    res["lz4 compress, random frame (what the probe saves)"] = cpu_per_gib(
        lambda: [wire.lz4_compress(rand) for _ in range(count)], n
    )
    packed = wire.lz4_compress(text)
    res["lz4 compress, JSON-like text (ratio %.2f)" % (len(packed) / FRAME)] = cpu_per_gib(
        lambda: [wire.lz4_compress(text) for _ in range(count)], n
    )
    res["lz4 decompress, JSON-like text"] = cpu_per_gib(
        lambda: [lz4.block.decompress(packed, uncompressed_size=FRAME) for _ in range(count)], n
    )
    aead, nonce, sealed = AESGCM(os.urandom(32)), bytes(12), bytearray(FRAME + 16)
    res["seal (AES-256-GCM encrypt_into)"] = cpu_per_gib(
        lambda: [aead.encrypt_into(nonce, rand, b"abcd", sealed) for _ in range(count)], n
    )
    opened = bytearray(FRAME)
    res["open (AES-256-GCM decrypt_into)"] = cpu_per_gib(
        lambda: [aead.decrypt_into(nonce, sealed, b"abcd", opened) for _ in range(count)], n
    )
    res["MAC (HMAC-SHA256, --insecure-plaintext before protocol 3), each side"] = cpu_per_gib(
        lambda: [hmac.new(b"k" * 32, rand, hashlib.sha256).digest() for _ in range(count)], n
    )
    header = bytes(16)
    res["MAC (AES-256-GMAC, --insecure-plaintext), each side"] = cpu_per_gib(
        lambda: [aead.encrypt(nonce, header, rand) for _ in range(count)], n
    )
    res["socket send (TCP loopback sendall)"], res["socket recv (TCP loopback recv_into)"] = socket_cpu(rand, count)
    no_zero = bytes(FRAME // PAGE_SIZE // 8)
    body, _ = wire.encode_pages(1, [(0x10000000, FRAME // PAGE_SIZE, no_zero)], rand, False)
    res["decode PAGES head"] = cpu_per_gib(lambda: [wire.decode_pages(body) for _ in range(count)], n)

    def put(store):
        for i in range(count):
            store.put_pages(1, 0x10000000 + i * FRAME, FRAME // PAGE_SIZE, no_zero, rand)
        return store

    res["store put, fresh chunks (populated, then copied)"] = cpu_per_gib(lambda: put(PageStore()), n)
    held = put(PageStore())
    res["store put, over pages already held"] = cpu_per_gib(lambda: put(held), n)
    width = max(len(k) for k in res)
    print("%-*s  CPU s/GiB  GB/s on one core" % (width, "step"))
    for k, v in res.items():
        print("%-*s  %9.3f  %16.1f" % (width, k, v, GiB / v / 1e9 if v else float("inf")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
