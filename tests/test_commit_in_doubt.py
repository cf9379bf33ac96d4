"""A DONE lost after COMMIT (issue 12, finding 3): the source must not
resume while the destination may keep its copy. A proxy between run and
serve drops exactly the DONE frame; run asks serve again (OUTCOME) and
learns the outcome, or, when it cannot, leaves the source frozen for
`hybridmig settle`. Either way exactly one copy runs."""

import subprocess
import sys

import psutil
import pytest

from lazy_util import restored_alive
from migrate_util import PORT, Serve, frozen_by, settle, state, wait_for
from test_migrate import assert_intact
from test_migrate import env as env  # noqa: F401 -- the fixture

PROXY_PORT = PORT + 1

# Forwards LISTEN to UPSTREAM. On the first connection it reads the
# destination's frames (16-byte header: type, flags, reserved, length,
# sequence; a 16-byte MAC after AUTH_OK) and drops the first DONE (type 25).
# With "refuse-later", every later connection is closed at once.
PROXY = r"""
import socket, struct, sys, threading
listen, upstream, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def addr(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def exact(s, n):
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf
def filter_frames(src, dst):
    # The handshake's frames show their type; after AUTH_OK (2) frames are
    # sealed, only their length shows: DONE is the destination's one frame
    # with nothing but its type (1 byte) and the AEAD tag (16) inside.
    sealed = dropped = False
    try:
        while True:
            if sealed:
                header = exact(src, 4)
                (length,) = struct.unpack("!I", header)
                frame = header + exact(src, length)
                if length == 1 + 16 and not dropped:
                    dropped = True
                    print("dropped DONE", flush=True)
                    continue
            else:
                header = exact(src, 16)
                kind, _, _, length, _ = struct.unpack("!BBHIQ", header)
                frame = header + exact(src, length)
                sealed = kind == 2
            dst.sendall(frame)
    except (EOFError, OSError):
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(addr(listen))
lsock.listen(8)
print("proxy listening", flush=True)
first = True
while True:
    client, _ = lsock.accept()
    if not first and mode == "refuse-later":
        print("refused a connection", flush=True)
        client.close()
        continue
    server = socket.create_connection(addr(upstream))
    to_client = filter_frames if first else pump
    first = False
    threading.Thread(target=pump, args=(client, server), daemon=True).start()
    threading.Thread(target=to_client, args=(server, client), daemon=True).start()
"""


class Proxy:
    def __init__(self, env, mode):
        self.log = env.tmp / f"proxy-{mode}.log"
        self._out = open(self.log, "w")
        addr = env.hosts.dst_addr
        self.proc = subprocess.Popen(
            env.hosts.run_in(env.hosts.dst)
            + [sys.executable, "-c", PROXY, f"{addr}:{PROXY_PORT}", f"{addr}:{PORT}", mode],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        env.cleanup.kill_pid_tree(self.proc.pid)
        env.cleanup.add(self._out.close)
        wait_for(lambda: "listening" in self.text() or self.proc.poll() is not None, 30, "the proxy")
        assert self.proc.poll() is None, self.text()
        self.to = f"{addr}:{PROXY_PORT}"

    def text(self):
        self._out.flush()
        return self.log.read_text()


def serve_for_many(env):
    """serve without --once: it must still be there when run asks again."""
    return Serve(
        env.hosts, env.hosts.dst, env.hosts.dst_addr, env.new_dir("serve"), env.key, env.cleanup, env.tmp, once=False
    ).wait_listening()


def running_copies(wl):
    """Live, not stopped processes of this workload (by its report path),
    but for the source's `unshare` parent."""
    out = []
    for pid in restored_alive(wl.report_path):
        try:
            if pid != wl._popen.pid and state(pid) not in ("T", "t", "Z", "X"):
                out.append(pid)
        except FileNotFoundError:
            pass
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("once", [False, True], ids=["serve", "serve-once"])
def test_lost_done_is_asked_about_and_the_commit_stands(env, once):  # noqa: F811
    """serve --once, committed without hearing ENDED, stays to answer the
    source's question (the soak's source was left in doubt when it exited)."""
    wl = env.workload(32, rate=1000)
    serve = env.serve() if once else serve_for_many(env)
    proxy = Proxy(env, "drop-done")
    rc, rep, err = env.run(wl.host_pid, "--timeout", "10", to=proxy.to)
    assert "dropped DONE" in proxy.text(), proxy.text()
    assert rc == 0, err
    assert rep["result"] == "migrated", rep
    warnings = " ".join(rep["warnings"])
    assert "no answer to the commit" in warnings and "has kept its copy" in warnings, rep["warnings"]
    # exactly one copy: the destination's, whole
    wl.wait_gone(30)
    new = env.adopt(rep["restored_pid"], wl)
    assert_intact(new.verify(), 1)
    assert running_copies(wl) == [rep["restored_pid"]], (running_copies(wl), rep["restored_pid"])
    assert "asks what became of session" in serve.log(), serve.log()
    if once:
        assert serve.wait(30) == 0, serve.log()  # gone once it has told the source


@pytest.mark.timeout(240)
def test_commit_in_doubt_leaves_the_source_frozen_for_the_operator(env):  # noqa: F811
    """DONE lost and serve unreachable afterwards: run cannot learn what
    serve did. It says so, leaves the source frozen (one running copy, the
    destination's) and names the command that settles it."""
    wl = env.workload(32, rate=1000)
    pids = wl.pids()
    serve_for_many(env)
    proxy = Proxy(env, "refuse-later")
    rc, rep, err = env.run(wl.host_pid, "--timeout", "5", to=proxy.to)
    assert "dropped DONE" in proxy.text() and "refused a connection" in proxy.text(), proxy.text()
    assert rc != 0 and rep["result"] == "in doubt", rep
    assert "keeps running" not in err, err
    error = rep["error"]
    assert "hybridmig settle" in error and "resume" in error and "end" in error, error
    criu_pid = frozen_by(env, error)
    assert psutil.Process(criu_pid).cmdline()[1] == "dump"
    # the source stays frozen: only the destination's copy runs
    for pid in pids:
        assert state(pid) in ("t", "T"), (pid, state(pid))
    copies = running_copies(wl)
    assert len(copies) == 1 and copies[0] not in pids, copies
    env.cleanup.kill_pid_tree(copies[0])
    # the destination kept its copy: the operator ends the source
    settle(env, criu_pid, pids, "end")
    wl.wait_gone(30)
    assert running_copies(wl) == copies
    new = env.adopt(copies[0], wl)
    assert_intact(new.verify(), 1)
