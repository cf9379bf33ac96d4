"""The wire against a real serve and run: what a sniffer sees, and peers
that try to hold serve's handshake (docs/security.md)."""

import subprocess
import sys
import time

import pytest

import test_migrate
from hybridmig.testing.workload import PAGE_MAGIC
from migrate_util import PORT, RELAY, Serve, wait_for
from test_migrate import assert_migrated

env = test_migrate.env  # the fixture: two hosts, a key, a cleanup

# 200 connections that say nothing and 20 that send one byte a second, held
# open from the source's namespace.
_HOLD = """
import socket, sys, threading, time
addr = (sys.argv[1], int(sys.argv[2]))
idle = []
for _ in range(200):  # not waiting for each: a full backlog must not stop the holder
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(addr)
    idle.append(s)
def slow():
    try:
        s = socket.create_connection(addr, timeout=30)
        while True:
            s.send(b"\\x01")
            time.sleep(1)
    except OSError:
        pass
for _ in range(20):
    threading.Thread(target=slow, daemon=True).start()
print("holding", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _start(env, ns, argv, *args):
    proc = subprocess.Popen(
        env.hosts.run_in(ns) + [sys.executable, *argv, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    env.cleanup.kill_pid_tree(proc.pid)
    env.cleanup.add(proc.wait, 10)
    first = proc.stdout.readline()  # bounded: the scripts print at once or die
    assert first.strip() in ("listening", "holding"), f"helper failed: {first!r}"
    return proc


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["sealed", "plaintext"])
def test_a_sniffer_reads_no_page_and_no_image(env, mode):
    """Finding 1: by default neither page content (the workload's per-page
    magic) nor image content (CRIU image names and the workload's path)
    travels in clear; with --insecure-plaintext on both ends it does, which
    shows that the capture would see it."""
    extra = ["--insecure-plaintext"] if mode == "plaintext" else []
    wl = env.workload(32, rate=1000)
    serve = Serve(
        env.hosts, env.hosts.dst, env.hosts.dst_addr, env.new_dir("serve"), env.key, env.cleanup, env.tmp, extra=extra
    )
    serve.wait_listening()
    capture = env.tmp / "capture.bin"
    tap = _start(env, env.hosts.dst, [RELAY], env.hosts.dst_addr, PORT + 1, PORT, "tap", capture)
    rc, rep, err = env.run(wl.host_pid, *extra, to="%s:%d" % (env.hosts.dst_addr, PORT + 1))
    assert_migrated(env, wl, rc, rep, err, serve, 32)
    tap.wait(30)
    seen = capture.read_bytes()
    assert len(seen) > 32 << 20
    leaked = {
        "page content": PAGE_MAGIC.to_bytes(8, "little") in seen,
        "image names": b"inventory.img" in seen,
        "the workload's path": b"memwork" in seen,
    }
    if mode == "sealed":
        assert not any(leaked.values()), leaked
    else:
        assert all(leaked.values()), leaked


@pytest.mark.timeout(240)
def test_idle_and_slow_peers_do_not_hold_serve(env):
    """Finding 2: 200 idle and 20 slow (a byte a second) connections held
    open against serve; a legitimate run gets through all the same."""
    wl = env.workload(64, rate=1000)
    serve = env.serve()
    _start(env, env.hosts.src, ["-c", _HOLD], env.hosts.dst_addr, PORT, 120)
    t = time.monotonic()
    rc, rep, err = env.run(wl.host_pid, timeout=120)
    assert_migrated(env, wl, rc, rep, err, serve, 64)
    print("migrated in %.1f s with 220 connections held" % (time.monotonic() - t))
    wait_for(lambda: serve.proc.poll() is not None, 30, "serve --once to exit")
    assert serve.proc.returncode == 0, serve.log()
