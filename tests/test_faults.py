"""Post-copy's fault channel, end to end: real CRIU, real userfaultfd,
memwork checking every page, two network namespaces.

A run that may switch over to post-copy opens a second connection at its
start, joined to its session like a page stream (FAULTS, then STREAM with
index wire.FAULT_LANE and the session proof); in post-copy the
destination's FETCHes and their pages go over it, never behind the push.
Cut, faults go on the control channel again and the migration completes;
a connection that is not the session's fault channel is refused before it
touches anything (docs/design.md, "The fault channel"; docs/security.md)."""

import re
import subprocess

import psutil
import pytest

from migrate_util import PORT, wait_for
from test_migrate import assert_migrated
from test_migrate import env as env  # noqa: F401 -- the fixture
from test_postcopy import postcopy_running
from test_postcopy_early import assert_early
from test_streams import CLIENT_HEAD, refusals

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.slow]


def assert_faults_on_their_channel(rep):
    """Every FETCH went, and was answered, on the fault channel."""
    pc = rep["postcopy"]
    assert pc["remote_faults"] > 0, pc
    assert pc["fetches_on_fault_channel"] == pc["remote_faults"], pc
    assert pc["fetches_served_on_fault_channel"] > 0 and pc["fault_channel_error"] is None, pc
    lat = pc["remote_fault_latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"], lat


@pytest.mark.timeout(300)
def test_faults_go_over_their_own_channel(env):
    """Post-copy with no round: the copy faults from its first write; every
    FETCH goes over the fault channel and is answered there, the push goes
    on beside it (near the faults first); every page verified."""
    wl = env.workload(64, rate=5000, threads=2)
    serve = env.serve()
    rc, rep, err = env.run(wl.host_pid, "--switchover", "postcopy", "--postcopy-after", "0", "--bandwidth-limit", "40M")
    assert_migrated(env, wl, rc, rep, err, serve, 64, postcopy=True, round0=0)
    assert_early(rep, 0, 64)
    assert_faults_on_their_channel(rep)
    assert "fault channel joined" in serve.log(), serve.log()[-3000:]


def fault_channel_port(env, run):
    """The source port of run's fault channel: of its two connections to
    serve, the one that carried fewer bytes (the control channel carried
    the images before the copy could fault)."""
    out = subprocess.run(
        env.hosts.run_in(env.hosts.src) + ["ss", "-tniHp", "dst", "%s:%d" % (env.hosts.dst_addr, PORT)],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    pids = {run.proc.pid} | {p.pid for p in psutil.Process(run.proc.pid).children(recursive=True)}
    conns = []
    for entry in re.split(r"\n(?=ESTAB)", out.strip()):
        if not any("pid=%d," % pid in entry for pid in pids):
            continue
        port = int(entry.split()[3].rsplit(":", 1)[1])
        acked = re.search(r"bytes_acked:(\d+)", entry)
        conns.append((int(acked.group(1)) if acked else 0, port))
    assert len(conns) == 2, out
    return min(conns)[1]


@pytest.mark.timeout(300)
def test_fault_channel_cut_during_postcopy(env):
    """The fault channel alone is cut (both ends reset) while the copy
    still lacks most of its pages: its faults ask again on the control
    channel, the migration completes, every page verified, and the report
    says why the fault channel ended."""
    wl = env.workload(64, rate=20000)
    serve, run, restored = postcopy_running(
        env, wl, "--postcopy-after", "0", "--bandwidth-limit", "4M", "--timeout", "60"
    )
    wait_for(lambda: "fault channel" in serve.log() or not run.running(), 30, "the fault channel to join")
    port = fault_channel_port(env, run)
    subprocess.run(
        env.hosts.run_in(env.hosts.src) + ["ss", "-K", "dst", env.hosts.dst_addr, "sport", "=", str(port)],
        capture_output=True,
        timeout=10,
        check=True,
    )
    assert run.running(), "the run was over before the fault channel was cut"
    rc, rep, err = run.wait(180)
    assert_migrated(env, wl, rc, rep, err, serve, 64, postcopy=True, round0=0)
    pc = rep["postcopy"]
    assert pc["fault_channel_error"] is not None, pc
    assert pc["remote_faults"] > pc["fetches_on_fault_channel"], pc  # some asked on the control channel
    assert "the fault channel broke" in serve.log(), serve.log()[-3000:]


# A client in the source's namespace that tries fault channels serve must
# refuse; prints one JSON line: what each attempt heard.
_CLIENT = (
    CLIENT_HEAD
    + r"""
from hybridmig.messages import Faults

def join(name, session, binding_key):
    return stream(name, session, wire.FAULT_LANE, binding_key)

control = wire.connect(addr, key, idle_timeout=10)
session = Host.decode(control.recv()[1]).session
# before the session announced one
join("not announced", session, control.binding_key)
control.send(Msg.FAULTS, Faults().encode())
assert control.recv()[0] == Msg.FAULTS
# another session's id; a proof without the control channel's binding key;
# the proof of a page stream (index 0) presented as the fault channel's
join("wrong session", "0" * 32, control.binding_key)
join("forged proof", session, bytes(32))
try:
    ch = wire.connect(addr, key, stream=True, idle_timeout=10)
    proof = wire.stream_proof(control.binding_key, session, 0, ch.transcript)
    ch.send(Msg.STREAM, Stream(session, wire.FAULT_LANE, proof.hex()).encode())
    out["page stream's proof"] = ch.recv()[0].name
except ProtocolError as e:
    out["page stream's proof"] = "refused: %s" % e
first = join("fault channel", session, control.binding_key)
join("fault channel again", session, control.binding_key)
# a second FAULTS in the same session
control.send(Msg.FAULTS, Faults().encode())
try:
    out["FAULTS again"] = control.recv()[0].name
except ProtocolError as e:
    out["FAULTS again"] = "refused: %s" % e
control.close()
print(json.dumps(out), flush=True)
"""
)


@pytest.mark.timeout(120)
def test_fault_channels_that_are_not_the_sessions_are_refused(env):
    """A fault channel before its session announced one, for another
    session, with a forged proof or a page stream's, or a second time (and
    FAULTS twice): each refused with a log line naming why, the session's
    own joins; serve goes on and migrates the next source over a fault
    channel."""
    serve, out = refusals(env, _CLIENT)
    assert "unknown or finished session" in out["not announced"], out
    assert "unknown or finished session" in out["wrong session"], out
    assert "session proof" in out["forged proof"], out
    assert "session proof" in out["page stream's proof"], out
    assert out["fault channel"] == "joined", out
    assert "joined already" in out["fault channel again"], out
    assert "FAULTS comes once" in out["FAULTS again"], out
    log = serve.log()
    for why in ("a fault channel for an unknown or finished session", "failed its session proof", "joined already"):
        assert why in log, (why, log)
    wl = env.workload(32, rate=5000)
    rc, rep, err = env.run(wl.host_pid, "--switchover", "postcopy", "--postcopy-after", "0")
    assert rc == 0 and rep["result"] == "migrated", err
    assert_faults_on_their_channel(rep)
