"""Page streams (`run --streams N`, issue 16): the pre-copy rounds' pages
over N connections beside the control channel. Page-verified migrations
with 1 and several streams, compressible and incompressible memory; a
stream cut in the middle of round 0 (the migration fails, the source
resumes untouched); a destination that reads slowly (backpressure, both
ends' memory bounded); and serve's refusals of streams that are not a
session's (docs/security.md)."""

import json
import subprocess
import sys

import pytest

import test_linerate
import test_migrate
import test_postcopy
import test_wire
from hybridmig.testing.workload import MEMWORK_SRC, build_program
from migrate_util import PORT, Serve, wait_for
from test_lz4_probe import assert_lz4_as_probed
from test_migrate import assert_intact, assert_migrated, assert_rolled_back

env = test_migrate.env  # the fixture: two hosts, a key, a cleanup
pki = test_wire.pki  # the fixture: a CA and certificates for a destination and a source


relay = test_linerate._relay  # a tests/relay.py between run and serve: (process, its address)


def _serve_many(env, extra=()):
    """serve for several sources in turn (not --once)."""
    h = env.hosts
    return Serve(h, h.dst, h.dst_addr, env.new_dir("serve"), env.key, env.cleanup, env.tmp, once=False, extra=extra)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "memory,streams", [("incompressible", 1), ("incompressible", 3), ("compressible", 2), ("compressible", 1)]
)
def test_page_verified_migration(env, memory, streams, tmp_path):
    """Round 0 and the rounds after it over `streams` page streams (forced
    above the 2-CPU default of 1); every page verified after the restore;
    the destination stored as many frames as were sent, over all streams
    (its ROUND_ACK stats)."""
    binary = build_program(MEMWORK_SRC, "memwork", tmp_path / "bin")
    wl = env.workload(128, threads=2, rate=2000, compressible=memory == "compressible", binary=binary)
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid, "--streams", str(streams))
    assert_migrated(env, wl, rc, rep, err, serve, 128, compressed=memory == "compressible")
    assert rep["streams"] == streams
    for r in rep["rounds"][:-1]:
        assert r["dest_frames"] == r["frames"], r
    r0 = rep["rounds"][0]
    assert r0["frames"] > 0 and r0["dest_store_s"] > 0, r0
    if memory == "compressible":
        assert_lz4_as_probed(rep)
    else:
        assert r0["frames_lz4"] < r0["frames"] / 4 and r0["bytes_wire"] >= 0.95 * r0["bytes_raw"], r0
    joined = serve.log().count("page stream ")
    assert joined == (streams if streams > 1 else 0), serve.log()


@pytest.mark.timeout(240)
def test_streams_over_tls(env, pki):
    """Each page stream runs TLS (mutual, the destination's name checked)
    under the same key, as the control channel does; every page verified."""
    wl = env.workload(64, threads=2, rate=1000)
    serve = Serve(
        env.hosts, env.hosts.dst, env.hosts.dst_addr, env.new_dir("serve"), env.key, env.cleanup, env.tmp,
        extra=["--tls-cert", pki["dest"][0], "--tls-key", pki["dest"][1], "--tls-ca", pki["ca"]],
    ).wait_listening()  # fmt: skip
    tls = ["--tls-ca", pki["ca"], "--tls-cert", pki["source"][0], "--tls-key", pki["source"][1], "--tls-name", "dest"]
    rc, rep, err = env.run(wl.host_pid, "--streams", "2", *tls)
    assert_migrated(env, wl, rc, rep, err, serve, 64)
    assert serve.log().count("page stream ") == 2, serve.log()


@pytest.mark.timeout(240)
def test_churn_during_rounds_over_streams(env):
    """mremap/munmap/MADV_DONTNEED of the source's memory during many
    rate-limited rounds over 3 streams: each scan's INVALIDATEs come between
    two stream rounds (ROUND_START after them); every page verified."""
    wl = env.workload(128, threads=2, rate=1000)
    serve = env.serve()
    run = env.run_background(
        wl.host_pid, "--streams", "3", "--max-rounds", "50", "--target-downtime", "1", "--bandwidth-limit", "60M"
    )
    test_migrate._wait_in_precopy(wl, run)
    churns = test_migrate._during_precopy(wl, run, wl.churn_verify)
    assert len(churns) >= 2, "only %d churns happened during pre-copy" % len(churns)
    rc, rep, err = run.wait(180)
    new = assert_migrated(env, wl, rc, rep, err, serve, 128)
    assert len(rep["rounds"]) > 3, rep["rounds"]
    for r in assert_intact(new.churn_verify(), 1):
        assert r["churn"]["done"], r
    assert_intact(new.verify(), 1)


@pytest.mark.timeout(300)
def test_postcopy_after_stream_rounds(env):
    """Two rounds over 2 streams, then post-copy: STALE, the push and the
    remote faults on the control channel after the last stream round;
    every page verified."""
    wl = env.workload(64, rate=5000, threads=2)
    serve = env.serve()
    rc, rep, err = env.run(
        wl.host_pid, "--streams", "2", "--switchover", "postcopy", "--postcopy-after", "2", "--bandwidth-limit", "40M"
    )
    assert_migrated(env, wl, rc, rep, err, serve, 64, postcopy=True)
    test_postcopy.assert_postcopy_report(rep, 64)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["sealed", "plaintext"])
def test_stream_cut_mid_round(env, mode):
    """Page stream 1 of 2 is reset in the middle of round 0 (the relay's
    second connection: the control channel is its first): the migration
    fails (no retry), the source resumes intact and untracked, serve ends
    the session, and the same serve takes the next migration."""
    extra = ["--insecure-plaintext"] if mode == "plaintext" else []
    wl = env.workload(256, threads=2, rate=1000)
    pids = wl.pids()
    serve = _serve_many(env, extra).wait_listening()
    cut, to = relay(env, "cut-conn", "1:%d" % (48 << 20))
    rc, rep, err = env.run(wl.host_pid, "--streams", "2", *extra, to=to, timeout=120)
    assert "cut after" in cut.stdout.readline()
    error = assert_rolled_back(env, wl, pids, rc, rep, err)
    assert "stream" in error, error
    wait_for(lambda: "broke" in serve.log(), 30, "serve to end the broken session")
    rc, rep, err = env.run(wl.host_pid, "--streams", "2", *extra)
    assert rc == 0 and rep["result"] == "migrated", err
    env.cleanup.kill_pid_tree(rep["restored_pid"])
    new = env.adopt(rep["restored_pid"], wl)
    assert_intact(new.verify(), 1)


@pytest.mark.timeout(300)
def test_slow_destination_backpressure(env):
    """Every connection carries 12 MB/s (a relay that reads slowly), over 2
    page streams: run's stream threads block in their sends, its reader
    waits for a free frame buffer, and its memory stays bounded while round
    0 takes seconds; serve's grows by the pages it stores, not more; the
    migration completes, every page verified."""
    test_linerate.backpressure(env, "slow-all", 12_000_000, "--streams", "2")


# A client in the source's namespace that tries page streams serve must
# refuse; prints one JSON line: what each attempt heard. CLIENT_HEAD: its
# set-up and stream() (tests/test_faults.py tries fault channels with it).
CLIENT_HEAD = r"""
import json, sys
from hybridmig import wire
from hybridmig.errors import ProtocolError
from hybridmig.keys import read_key
from hybridmig.messages import Host, Stream, Streams
from hybridmig.wire import Msg

addr, key, other = sys.argv[1], read_key(sys.argv[2]), read_key(sys.argv[3])
out = {}

def stream(name, session, index, binding_key, key=key):
    try:
        ch = wire.connect(addr, key, stream=True, idle_timeout=10)
        proof = wire.stream_proof(binding_key, session, index, ch.transcript)
        ch.send(Msg.STREAM, Stream(session, index, proof.hex()).encode())
        kind, payload = ch.recv()
        out[name] = "joined" if kind == Msg.STREAM else kind.name
        return ch
    except ProtocolError as e:
        out[name] = "refused: %s" % e
"""
_CLIENT = (
    CLIENT_HEAD
    + r"""
# a key that is not serve's: refused in the handshake, as a control channel is
stream("wrong key", "0" * 32, 0, bytes(32), key=other)
# a session no one opened
stream("unknown session", "0" * 32, 0, bytes(32))
# more than serve's cap
control = wire.connect(addr, key, idle_timeout=10)
control.recv()
control.send(Msg.STREAMS, Streams(9).encode())
try:
    control.recv()
    out["9 streams"] = "accepted"
except ProtocolError as e:
    out["9 streams"] = "refused: %s" % e
control.close()
# a session of 2 streams: a proof without the control channel's binding
# key, an index beyond 2, the same index twice
control = wire.connect(addr, key, idle_timeout=10)
session = Host.decode(control.recv()[1]).session
control.send(Msg.STREAMS, Streams(2).encode())
assert control.recv()[0] == Msg.STREAMS
stream("forged proof", session, 0, bytes(32))
stream("index 2 of 2", session, 2, control.binding_key)
first = stream("stream 0", session, 0, control.binding_key)
stream("stream 0 again", session, 0, control.binding_key)
control.close()
print(json.dumps(out), flush=True)
"""
)


def refusals(env, client):
    """A serve for several sources, and what `client` (CLIENT_HEAD and its
    attempts) printed, run in the source's namespace."""
    serve = _serve_many(env).wait_listening()
    proc = subprocess.run(
        env.hosts.run_in(env.hosts.src)
        + [sys.executable, "-c", client, "%s:%d" % (env.hosts.dst_addr, PORT), str(env.key), str(env.other_key())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    print(out)
    return serve, out


@pytest.mark.timeout(120)
def test_streams_that_are_not_a_session_are_refused(env):
    """A stream with a key that is not serve's, for a session no one
    opened, beyond serve's cap of 8, with a proof not made from the control
    channel, beyond the announced count, or a second time: each refused
    with a log line naming why; serve goes on and migrates the next source."""
    serve, out = refusals(env, _CLIENT)
    assert out["wrong key"].startswith("refused") and "authentication" in out["wrong key"], out
    assert "unknown or finished session" in out["unknown session"], out
    assert "refused 9 page streams" in out["9 streams"], out
    assert "session proof" in out["forged proof"], out
    assert "beyond the 2 announced" in out["index 2 of 2"], out
    assert out["stream 0"] == "joined", out
    assert "joined already" in out["stream 0 again"], out
    log = serve.log()
    for why in ("unknown or finished session", "failed its session proof", "beyond the 2", "joined already"):
        assert "refused page stream" in log and why in log, (why, log)
    # and serve still migrates
    wl = env.workload(32, rate=1000)
    rc, rep, err = env.run(wl.host_pid, "--streams", "2")
    assert rc == 0 and rep["result"] == "migrated", err
    env.cleanup.kill_pid_tree(rep["restored_pid"])
    assert_intact(env.adopt(rep["restored_pid"], wl).verify(), 1)
