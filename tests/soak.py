"""`make soak`: hybridmig's randomized fault-injection soak.

Each iteration migrates a self-verifying memwork tree (its writers check
every page before they rewrite it: memwork --check-writes) between two
network namespaces with `hybridmig run` and `hybridmig serve --once`, in a
configuration drawn at random (size, dirty rate, threads, processes, a fork
or mapping churn during the rounds, link speed, --max-rounds, --timeout,
--switchover: precopy half the time, else postcopy or auto),
and most of them with one fault aimed at one protocol step: SIGKILL of run,
serve, serve's guard or CRIU, SIGSTOP of serve past --timeout, the link set
down for a while, a garbage client. (serve's lazy-pages daemon is a thread
of serve: killing serve kills it.) After the iteration it checks the
invariant:

- exactly one copy runs (the source, or the restored copy), whole;
- every page of it verifies, and no copy ever met a page it did not have
  (no "corrupt" or "crash" line in the workload's report, from any copy);
- nothing else is left in the two namespaces, and the copy carries no
  userfaultfd and no write-protect flag;
- run's exit code and --json report agree with the copy that survived.

A source left frozen "in doubt" (run's report names the settle command), or
left frozen by a run killed in post-copy (no report: its CRIU is found as
the tasks' tracer), is settled as an operator would: `end` if the
destination runs a copy, else `resume`.

One JSON line per iteration on stdout, then "soak: N passed, M failed";
exit 1 if any iteration failed. Iteration i is drawn from Random("SEED:i"),
so any one replays alone:

    make soak                          # SOAK_N iterations (default 5), a new seed
    make soak SOAK_N=200 SOAK_SEED=7
    make soak SOAK_SEED=7 SOAK_ONLY=12  # iteration 12 of seed 7 only

The logs of a failed iteration are kept (its "logs" field).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from hybridmig.keys import generate_key
from hybridmig.proctree import all_held
from hybridmig.testing.netns import TwoHosts
from hybridmig.testing.workload import (
    FORK_VERIFY_COMM,
    MEMWORK_SRC,
    Workload,
    WorkloadError,
    become_subreaper,
    build_program,
    ns_pid,
)
from migrate_util import HYBRIDMIG, PORT, BackgroundRun, Cleanup, Serve, kill_by_report, tracer, tracked, uffd_fds

# The soak's own memwork binary: a rebuild of the shared one could change it
# under another user's dumped images.
BUILD_DIR = "/var/cache/hybridmig/soak"

# Protocol steps, in order, as seen from outside (see Steps).
STEPS = ["start", "rounds", "freeze", "dumped", "images", "restore", "restored", "commit", "verdict"]
# What each fault can be aimed at.
FAULT_STEPS = {
    "kill_run": STEPS[1:],
    "kill_serve": STEPS[1:],
    "kill_guard": STEPS[1:],
    "kill_criu": ["rounds", "freeze", "dumped", "images", "restore"],
    "stop_serve": STEPS[1:],
    "link_down": STEPS[1:],
    "garbage_client": STEPS,
}


def draw(rng):
    """One iteration's configuration and fault."""
    timeout = rng.choice([5, 8, 12])
    config = {
        "size_mb": rng.choice([32, 64, 64, 128, 128, 256]),
        "threads": rng.randint(1, 3),
        "procs": rng.choice([1, 1, 2]),
        "rate": rng.choice([200, 1000, 2500]),  # pages/s per thread
        "hot": rng.choice([100, 100, 30]),
        "during_rounds": rng.choice([None, None, "fork_verify", "churn_verify"]),
        "link": rng.choice([None, "1gbit", "300mbit"]),
        "max_rounds": rng.choice([2, 5, 30]),
        "timeout": timeout,
        "auto_converge": rng.random() < 0.7,  # (pre-copy's)
        "switchover": rng.choice(["precopy", "precopy", "postcopy", "auto"]),
    }
    fault = None
    if rng.random() < 0.8:
        kind = rng.choice(sorted(FAULT_STEPS))
        fault = {
            "kind": kind,
            "step": rng.choice(FAULT_STEPS[kind]),
            "delay_ms": rng.choice([0, 0, rng.uniform(0, 30), rng.uniform(0, 300)]),
        }
        if kind == "stop_serve":
            fault["seconds"] = timeout + rng.uniform(1, 4)
        elif kind == "link_down":
            fault["seconds"] = rng.uniform(0.5, timeout + 4)
        elif kind == "garbage_client":
            fault["bytes"] = rng.choice([0, 7, 64, 4096])
            fault["seconds"] = rng.uniform(0, 2)
    # drawn last: the draws above stay what they were for a seed before page streams
    config["streams"] = rng.choice([1, 1, 2, 3])
    return config, fault


def children(pid):
    """pid's children, those of every thread, read from /proc (cheap enough
    to poll every millisecond; serve starts CRIU from a thread)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid):
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


class Steps:
    """Tells, by polling, which protocol step a migration has reached:
    rounds (run's tracker attached), freeze (CRIU's pre-dump hook has
    answered: it seizes the tree), dumped (run's final scan, the tree
    frozen), images (the final pages sent, the images going), restore
    (serve's criu restore runs), restored (it has exited, the pidfile
    written), commit (serve's guard has been told: commit or release),
    verdict (criu dump, told the verdict, has exited)."""

    def __init__(self, wl, run, serve):
        self.wl, self.run, self.serve = wl, run, serve
        self.criu_dump = None
        self.hook_seen = False
        self.guard = None

    def _dump(self):
        if self.criu_dump is None:
            # (not run's short-lived CRIU probes)
            self.criu_dump = next(
                (p for p in children(self.run.proc.pid) if comm(p) == "criu" and " dump " in cmdline(p)), None
            )
        return self.criu_dump

    def _guard(self):
        if self.guard is None:
            self.guard = next((p for p in children(self.serve.proc.pid) if "destination.guard" in cmdline(p)), None)
        return self.guard

    def _run_log(self, text):
        try:
            return text in self.run.err_path.read_text(errors="replace")
        except OSError:
            return False

    def reached(self, step):
        if step == "start":
            return True
        if step == "rounds":
            return tracked(self.wl.host_pid)
        if step == "freeze":
            dump = self._dump()
            if dump is None:
                return False
            hook = bool(children(dump))
            self.hook_seen |= hook
            return self.hook_seen and not hook
        if step == "dumped":
            return self._run_log("final scan of")
        if step == "images":
            return self._run_log("final round:")
        if step == "restore":
            return any(comm(p) == "criu" for p in descendants(self.serve.proc.pid))
        if step == "restored":
            sessions = list(self.serve.base_dir.glob("session-*/restore.pid"))
            return bool(sessions) and not any(comm(p) == "criu" for p in descendants(self.serve.proc.pid))
        if step == "commit":
            guard = self._guard()
            return guard is not None and proc_state(guard) in ("Z", "X")
        if step == "verdict":
            dump = self._dump()
            return dump is not None and proc_state(dump) in ("Z", "X")
        raise ValueError(step)

    def wait(self, step, timeout):
        """True once step is reached; False if run ended (or time ran out) first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reached(step):
                return True
            if not self.run.running():
                return False
            time.sleep(0.001)
        return False


class Iteration:
    def __init__(self, seed, index, workdir):
        self.seed, self.index = seed, index
        self.rng = random.Random(f"{seed}:{index}")
        self.config, self.fault = draw(self.rng)
        self.dir = Path(workdir)
        self.cleanup = Cleanup()
        self.threads = []
        self.notes = []

    def run(self, binary):
        with TwoHosts(prefix="sk", rate=self.config["link"]) as hosts:
            try:
                return self._run(hosts, binary)
            finally:
                for t in self.threads:
                    t.join(60)
                self.cleanup.run()

    def _run(self, hosts, binary):
        cfg, fault = self.config, self.fault
        key = self.dir / "key"
        key.unlink(missing_ok=True)  # a trial directory reused
        generate_key(key)
        wl = Workload.start(
            cfg["size_mb"],
            threads=cfg["threads"],
            procs=cfg["procs"],
            rate=cfg["rate"],
            hot=cfg["hot"],
            netns=hosts.src,
            report=self.dir / "report.jsonl",
            binary=binary,
            check_writes=True,
        )
        self.cleanup.add(kill_by_report, str(wl.report_path))
        self.cleanup.add(wl.stop)
        serve_dir = Path(tempfile.mkdtemp(prefix="hm-soak-", dir="/tmp"))  # short: a socket lives below it
        self.cleanup.add(shutil.rmtree, str(serve_dir), True)
        serve = Serve(hosts, hosts.dst, hosts.dst_addr, serve_dir, key, self.cleanup, self.dir).wait_listening()
        to = "%s:%d" % (hosts.dst_addr, PORT)
        if fault and fault["step"] == "start":
            self._inject(hosts, wl, None, serve, None)
        extra = ["--max-rounds", str(cfg["max_rounds"]), "--timeout", str(cfg["timeout"])]
        extra += ["--switchover", cfg["switchover"], "--streams", str(cfg.get("streams", 1))]
        if cfg["switchover"] == "precopy" and not cfg["auto_converge"]:
            extra.append("--no-auto-converge")
        run = BackgroundRun(hosts, hosts.src, wl.host_pid, to, key, *extra, cleanup=self.cleanup, log_dir=self.dir)
        steps = Steps(wl, run, serve)
        reached = None
        if cfg["during_rounds"] and steps.wait("rounds", 60):
            time.sleep(self.rng.uniform(0, 0.3))
            try:
                getattr(wl, cfg["during_rounds"])(30)
            except WorkloadError as e:
                self.notes.append(f"{cfg['during_rounds']} during the rounds: {e}")
        if fault and fault["step"] != "start":
            reached = steps.wait(fault["step"], 300)
            if reached:
                time.sleep(fault["delay_ms"] / 1000)
                self._inject(hosts, wl, run, serve, steps)
        bound = 3 * cfg["timeout"] + 240
        try:
            rc = run.proc.wait(bound)
        except subprocess.TimeoutExpired:
            rc = None
            self.notes.append(f"run still running after {bound}s")
        run._out.flush()
        run._err.flush()
        rep = _parse(run.out_path.read_text()) if run.out_path.exists() else None
        if serve.wait(END_OF_SESSION_S) is None:
            self.notes.append(f"serve --once still running {END_OF_SESSION_S}s after run: ended")
            serve.kill()
        for t in self.threads:
            t.join(60)
        killed_run = bool(fault and fault["kind"] == "kill_run" and reached)
        verdict = Invariant(hosts, wl, rep, rc, killed_run=killed_run)
        violations = []
        if (rep or {}).get("result") == "in doubt":
            violations = self._settle_named(hosts, wl, rep, verdict)
        elif killed_run and (dump := self._left_frozen(wl)):
            # post-copy: run killed once the copy may have run leaves the
            # source frozen in its criu dump, and no report
            violations = self._settle(hosts, wl, verdict, dump)
        violations += verdict.check()
        return {
            "rc": rc,
            "result": (rep or {}).get("result"),
            "error": (rep or {}).get("error"),
            "downtime_ms": (rep or {}).get("downtime_ms"),
            "fault_reached": reached if fault and fault["step"] != "start" else bool(fault),
            "survivor": verdict.survivor,
            "violations": violations,
        }

    def _settle_named(self, hosts, wl, rep, verdict):
        """run left the source in doubt, and said how to settle it."""
        error = rep.get("error") or ""
        try:
            criu_pid = int(error.split("hybridmig settle ")[1].split()[0])
        except (IndexError, ValueError):
            return [f"in doubt, and no settle command named: {error[:200]}"]
        if " stay in " in error:  # run's work dir, which it leaves to the operator
            self.cleanup.add(shutil.rmtree, os.path.dirname(error.rsplit(" stay in ", 1)[1].strip()), True)
        return self._settle(hosts, wl, verdict, criu_pid)

    def _left_frozen(self, wl, wait_s=5.0):
        """The criu dump still holding the source frozen a while after run
        was killed (post-copy's IN_DOUBT), or None (CRIU resumed it)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            dump = tracer(wl.host_pid)
            if not dump or comm(dump) != "criu" or not all_held(wl.pids()):
                return None
            time.sleep(0.2)
        return dump

    def _settle(self, hosts, wl, verdict, criu_pid):
        """The source left frozen: it must be frozen whole; then settle it as
        an operator would, by whether the destination runs a copy."""
        # frozen by its CRIU, or held stopped by run once that CRIU died (source/hold.py)
        out = [] if all_held(wl.pids(), stop_too=True) else [f"in doubt, but the source is not frozen: {wl.pids()}"]
        copies, _ = verdict._state()
        decision = "end" if copies["dst"] else "resume"
        settle = subprocess.run(
            hosts.run_in(hosts.src) + [HYBRIDMIG, "settle", str(criu_pid), decision],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.notes.append(f"in doubt: settled with {decision!r} (exit {settle.returncode})")
        if settle.returncode != 0:
            out.append(f"hybridmig settle {criu_pid} {decision} failed: {settle.stderr.strip()[-300:]}")
        return out

    # --- faults ---------------------------------------------------------------
    def _inject(self, hosts, wl, run, serve, steps):
        kind, f = self.fault["kind"], self.fault
        if kind == "kill_run":
            _kill(run.proc.pid)
        elif kind == "kill_serve":
            _kill(serve.proc.pid)
        elif kind == "kill_guard":
            guard = steps._guard()
            if guard is None or not _kill(guard):
                self.notes.append("no guard to kill")
        elif kind == "kill_criu":
            criu = [p for p in descendants(serve.proc.pid) + descendants(run.proc.pid) if comm(p) == "criu"]
            if not criu:
                self.notes.append("no criu to kill")
            for p in criu:
                _kill(p)
        elif kind == "stop_serve":
            self._background(self._stop_serve, serve, f["seconds"])
        elif kind == "link_down":
            self._background(self._link_down, hosts, f["seconds"])
        elif kind == "garbage_client":
            self._background(self._garbage, hosts, f["bytes"], f["seconds"])

    def _background(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _stop_serve(self, serve, seconds):
        try:
            serve.proc.send_signal(signal.SIGSTOP)
            time.sleep(seconds)
        finally:
            if serve.proc.poll() is None:
                serve.proc.send_signal(signal.SIGCONT)

    def _link_down(self, hosts, seconds):
        dev = ["ip", "-n", hosts.src, "link", "set", "dev", hosts.veth[0]]
        subprocess.run(dev + ["down"], capture_output=True, timeout=10)
        try:
            time.sleep(seconds)
        finally:
            subprocess.run(dev + ["up"], capture_output=True, timeout=10)

    def _garbage(self, hosts, nbytes, seconds):
        """A client that connects to serve, sends nbytes of noise, lingers, closes."""
        script = (
            "import os, socket, sys, time\n"
            "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)\n"
            "s.sendall(os.urandom(int(sys.argv[3])))\n"
            "time.sleep(float(sys.argv[4]))\n"
        )
        cmd = hosts.run_in(hosts.src) + [sys.executable, "-c", script, hosts.dst_addr, str(PORT), str(nbytes)]
        proc = subprocess.run(cmd + [str(seconds)], capture_output=True, text=True, timeout=30)
        if proc.returncode:
            self.notes.append("garbage client: " + proc.stderr.strip().splitlines()[-1][:200])


END_OF_SESSION_S = 90


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _parse(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


class Invariant:
    """The state after an iteration, and what is wrong with it."""

    SETTLE_S = 20  # for a guard or serve to end a copy that must go

    def __init__(self, hosts, wl, rep, rc, killed_run):
        self.hosts, self.wl, self.rep, self.rc = hosts, wl, rep, rc
        self.killed_run = killed_run
        self.survivor = None
        self.ns = {os.stat(f"/run/netns/{n}").st_ino: side for n, side in ((hosts.src, "src"), (hosts.dst, "dst"))}

    def _in_namespaces(self):
        """{"src": [pids], "dst": [pids]}: live processes in the two namespaces."""
        out = {"src": [], "dst": []}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                side = self.ns.get(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                continue
            if side and proc_state(pid) not in ("Z", "X"):
                out[side].append(pid)
        return out

    def _copies(self, procs):
        """Workload processes (memwork, not a fork-verify child) per side."""
        report = str(self.wl.report_path)
        return {
            side: [p for p in pids if comm(p) == "memwork" and report in cmdline(p)] for side, pids in procs.items()
        }

    def _leftovers(self, procs, copies):
        unshare = self.wl._popen.pid if self.wl._popen else None
        return [
            "%s:%d %s" % (side, p, cmdline(p)[:160])
            for side, pids in procs.items()
            for p in pids
            if p not in copies[side] and p != unshare and comm(p) != FORK_VERIFY_COMM
        ]

    def _state(self):
        procs = self._in_namespaces()
        copies = self._copies(procs)
        return copies, self._leftovers(procs, copies)

    def check(self):
        procs_per_copy = self.wl.procs
        deadline = time.monotonic() + self.SETTLE_S
        while True:
            copies, leftovers = self._state()
            sides = [s for s in ("src", "dst") if copies[s]]
            if (len(sides) == 1 and not leftovers) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        violations = []
        if len(sides) != 1:
            self.survivor = "both" if sides else "none"
            violations.append(f"{self.survivor} copies running: {copies}")
        else:
            self.survivor = sides[0]
        if leftovers:
            violations.append(f"left behind: {leftovers}")
        for line in self.wl.reports():
            if line.get("event") in ("corrupt", "crash"):
                violations.append(f"a copy met memory it did not have: {line}")
            elif line.get("event") == "child-exit":
                violations.append(f"a workload process died: {line}")
        if self.survivor in ("src", "dst"):
            violations += self._check_copy(self.survivor, copies[self.survivor], procs_per_copy)
        violations += self._check_report()
        return violations

    def _check_copy(self, side, pids, procs):
        out = []
        if len(pids) != procs:
            out.append(f"the {side} copy has {len(pids)} of {procs} processes")
        for pid in pids:
            if proc_state(pid) in ("t", "T"):
                out.append(f"{side} pid {pid} is left stopped")
            if uffd_fds(pid):
                out.append(f"{side} pid {pid} holds a userfaultfd")
            if tracked(pid):
                out.append(f"{side} pid {pid} is left write-protected (uffd-wp)")
        wl = self.wl
        if side == "dst":
            try:
                root = next(p for p in pids if ns_pid(p) == 1)
                wl = Workload.adopt(root, report=self.wl.report_path, procs=procs)
            except (StopIteration, OSError, WorkloadError) as e:
                return out + [f"the restored copy has no root: {e!r}"]
        try:
            for r in wl.verify(60):
                if r["bad"] or r["zero_pages_bad"] or r["first_bad"] != -1:
                    out.append(f"{side} copy: bad pages {r['bad']}: {r.get('bad_detail')}")
        except WorkloadError as e:
            out.append(f"{side} copy does not verify: {e}")
        finally:
            if side == "dst":
                wl.stop()
        return out

    def _check_report(self):
        if self.killed_run:
            return []  # no report to hold it to
        if self.rc is None or self.rep is None:
            return [f"run gave no report (exit {self.rc})"]
        if self.rep.get("result") == "in doubt":  # settled by the operator (Iteration._settle)
            return [] if self.rc not in (0, None) else [f"run reported in doubt with exit {self.rc}"]
        migrated = self.rc == 0 and self.rep.get("result") == "migrated"
        if self.survivor == "dst" and not migrated:
            return [f"the destination's copy runs, but run reported exit {self.rc}, {self.rep.get('result')}"]
        if self.survivor == "src" and migrated:
            return ["the source runs, but run reported a migration"]
        if (self.rc == 0) != (self.rep.get("result") == "migrated"):
            return [f"run's exit {self.rc} disagrees with its report {self.rep.get('result')}"]
        return []


def main():
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    n = int(os.environ.get("SOAK_N") or 5)
    only = os.environ.get("SOAK_ONLY")
    indexes = [int(only)] if only else list(range(n))
    print(
        f"soak: seed {seed}, {len(indexes)} iteration(s); replay one with: make soak SOAK_SEED={seed} SOAK_ONLY=I",
        flush=True,
    )
    become_subreaper()  # restored copies are re-parented here, and reaped
    binary = build_program(MEMWORK_SRC, "memwork", BUILD_DIR)
    passed = failed = 0
    for i in indexes:
        workdir = tempfile.mkdtemp(prefix=f"hm-soak-{seed}-{i}-")
        it = Iteration(seed, i, workdir)
        t0 = time.monotonic()
        try:
            outcome = it.run(binary)
        except Exception as e:  # noqa: BLE001 -- the soak itself failed: an iteration that did not pass
            outcome = {"violations": [f"soak error: {type(e).__name__}: {e}"]}
        line = {"i": i, "seed": seed, "config": it.config, "fault": it.fault, **outcome}
        line.update(seconds=round(time.monotonic() - t0, 1), notes=it.notes)
        if outcome["violations"]:
            failed += 1
            line["logs"] = workdir
        else:
            passed += 1
            shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps(line), flush=True)
        _reap_orphans()
    print(f"soak: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def _reap_orphans():
    """Reap the zombies re-parented to us (restored copies, guards): never a
    waitpid(-1), which would take the exit status of a subprocess still watched."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


if __name__ == "__main__":
    sys.exit(main())
