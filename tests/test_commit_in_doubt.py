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
from migrate_util import PORT, RELAY, Serve, frozen_by, settle, state, wait_for
from test_migrate import assert_intact
from test_migrate import env as env  # noqa: F401 -- the fixture

PROXY_PORT = PORT + 1


class Proxy:
    """A relay (relay.py) that drops the destination's first DONE;
    `extra` ["refuse-later"]: it closes every later connection at once."""

    def __init__(self, env, *extra):
        self.log = env.tmp / f"proxy-{'-'.join(extra) or 'drop-done'}.log"
        self._out = open(self.log, "w")
        addr = env.hosts.dst_addr
        self.proc = subprocess.Popen(
            env.hosts.run_in(env.hosts.dst)
            + [sys.executable, RELAY, addr, str(PROXY_PORT), str(PORT), "drop-done", *extra],
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
    proxy = Proxy(env)
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
