"""redis-server under load for the bench: a dataset of ``size_mb`` MiB made
by DEBUG POPULATE, a GET/SET client in a process of its own
(redis_client.py) that follows redis from the source namespace to the
destination, and DEBUG DIGEST before and after the migration."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from hybridmig.testing.workload import kill_tree

from .base import BenchWorkload, Finish
from .nsproc import NsProc, adopt_root, netns_path, running
from .progkit import python_argv, read_lines

CLIENT = Path(__file__).with_name("redis_client.py")
KEY_OVERHEAD = 100  # bytes redis spends per key besides its value (dictEntry, robj, key sds)


class RedisError(RuntimeError):
    """redis or its client did not start, answer or stop as expected."""


class Redis(BenchWorkload):
    """redis-server with ``size_mb`` MiB of keys of ``value_size`` bytes,
    ``rate`` GETs+SETs per second from one client (0: as fast as it can).
    ``port`` is redis's port on the loopback of its namespace."""

    kind = "redis"

    def __init__(self, size_mb: int, rate: float = 1000, value_size: int = 1000, port: int = 6379):
        super().__init__(size_mb)
        if value_size < 16:
            raise ValueError('value_size must hold "value:N" (>= 16 bytes), not %d' % value_size)
        self.rate, self.value_size, self.port = rate, value_size, port
        self.keys = max(1, size_mb * (1 << 20) // (value_size + KEY_OVERHEAD))
        self.hosts = None
        self.netns: str | None = None  # where redis runs now
        self.digest: str | None = None
        self.used_memory: int | None = None
        self._dir: str | None = None
        self._redis: NsProc | None = None
        self._root: psutil.Process | None = None  # the redis-server running now
        self._client: subprocess.Popen | None = None
        self._client_proc: psutil.Process | None = None
        self._final: dict | None = None  # the client's last report, once stopped
        self._reconnected = False

    @property
    def label(self) -> str:
        return "redis-%dM-r%g" % (self.size_mb, self.rate)

    def params(self) -> dict:
        return {
            **super().params(),
            "rate": self.rate,
            "value_size": self.value_size,
            "keys": self.keys,
            "used_memory": self.used_memory,
        }

    def criu_opts(self) -> list:
        # The client's connection is established while CRIU dumps: closed on
        # restore (CRIU then also needs --tcp-close on restore; the engine
        # passes criu_opts to both).  --skip-in-flight: a connection still
        # in the listen queue must not fail the dump.
        return ["--tcp-close", "--skip-in-flight"]

    # --- life cycle -------------------------------------------------------------
    def start(self, hosts) -> None:
        for tool in ("redis-server", "redis-cli"):
            if not shutil.which(tool):
                raise RedisError(f"{tool} not found: install Debian's redis-server (scripts/setup.sh does)")
        self.hosts, self.netns = hosts, hosts.src
        self._dir = tempfile.mkdtemp(prefix="hm-redis-")
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            self._dir,
            "--logfile",
            os.path.join(self._dir, "redis.log"),
        ]
        self._redis = NsProc(argv, hosts.src)
        self._root = self._redis.root
        self.host_pid = self._redis.host_pid
        self._wait_ping(30)
        self._cli(
            "DEBUG", "POPULATE", str(self.keys), "key", str(self.value_size), timeout=60 + self.size_mb / 10, want="OK"
        )
        self.used_memory = int(self._info("memory")["used_memory"])
        self.digest = self._cli("DEBUG", "DIGEST", timeout=60 + self.size_mb / 10)
        self._start_client()

    def before(self) -> dict:
        # The digest taken at start still holds (the client's SETs rewrite
        # the same values); taking it again here would block redis for
        # a while (about 1 s per GiB) just before the migration.
        return {"digest": self.digest, "keys": self.keys, "used_memory": self.used_memory}

    def adopt(self, host_pid: int) -> None:
        # The source redis is gone once the migration committed; the client
        # carries on with the restored one in the destination.
        self._root = adopt_root(host_pid)  # first: stop() must know it whatever happens next
        self.host_pid = host_pid
        self.netns = self.hosts.dst
        if self._redis is not None and not self._redis.wait_gone(30):
            raise RedisError("source redis %d still alive 30 s after the migration" % self._redis.host_pid)

    def finish(self) -> Finish:
        if self._final is None:  # a second finish() reuses the stopped client's report
            self._reconnected = self._wait_client_ok(30)
        reconnected = self._reconnected
        report = self._stop_client()
        digest = self._cli("DEBUG", "DIGEST", timeout=60 + self.size_mb / 10)
        bad_reads = report["bad_reads"]
        ok = reconnected and digest == self.digest and bad_reads == 0
        detail = "digest %s (%s), %d keys; %d GETs %d bad, %d SETs, %d reconnects%s" % (
            "same" if digest == self.digest else f"CHANGED {self.digest} -> {digest}",
            self.netns,
            self.keys,
            report["gets"],
            bad_reads,
            report["sets"],
            report["reconnects"],
            "" if reconnected else "; the client did not get a reply within 30 s: {}".format(report["last_error"]),
        )
        tl = report["timeline"]
        return Finish(
            ok=ok,
            detail=detail,
            max_gap_ms=report["max_gap_ms"],
            max_gap_end=report["max_gap_at"],
            timeline_start=tl["start"],
            timeline_ops=list(tl["ops"]),
            unit="GETs+SETs",
        )

    def stop(self) -> None:
        try:
            if self._client_proc is not None:
                kill_tree(self._client_proc)
                self._client.wait(10)
            if self._root is not None:
                kill_tree(self._root)  # the restored redis (the source one is also _redis's)
            if self._redis is not None:
                self._redis.stop()
        finally:
            self._client = self._client_proc = self._root = self._redis = None
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    # --- redis, through redis-cli in its namespace -------------------------------
    def _cli(self, *args: str, timeout: float = 30, want: str | None = None) -> str:
        cmd = ["nsenter", f"--net={netns_path(self.netns)}", "redis-cli", "-p", str(self.port), *args]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RedisError("{}: no answer within {}s".format(" ".join(args), timeout)) from None
        out = proc.stdout.strip()
        # redis-cli exits 0 on an error reply (when not a tty): look at it.
        if proc.returncode != 0 or out.startswith(("ERR", "(error)")) or (want is not None and out != want):
            raise RedisError(
                "redis-cli %s in %s: exit %d: %s %s"
                % (" ".join(args), self.netns, proc.returncode, out[:200], proc.stderr.strip()[:200])
            )
        return out

    def _info(self, section: str) -> dict:
        lines = self._cli("INFO", section).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def _wait_ping(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not running(self._root):
                raise RedisError(f"redis-server exited at start; its log:\n{self._log_tail()}")
            try:
                self._cli("PING", timeout=5, want="PONG")
                return
            except RedisError as exc:
                if time.monotonic() > deadline:
                    raise RedisError(f"redis did not answer PING within {timeout}s: {exc}") from None
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return "\n".join(Path(self._dir, "redis.log").read_text().splitlines()[-15:])
        except OSError as exc:
            return f"(no log: {exc})"

    # --- the client ------------------------------------------------------------
    @property
    def _report(self) -> Path:
        return Path(self._dir, "client.jsonl")

    def _start_client(self) -> None:
        cmd = [
            *python_argv(CLIENT),
            "--netns",
            self.hosts.src,
            "--netns",
            self.hosts.dst,
            "--port",
            str(self.port),
            "--keys",
            str(self.keys),
            "--value-size",
            str(self.value_size),
            "--rate",
            repr(float(self.rate)),
            "--report",
            str(self._report),
        ]
        with open(Path(self._dir, "client.log"), "wb") as log:
            self._client = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
            )
        self._client_proc = psutil.Process(self._client.pid)
        self._wait_line(lambda r: r["event"] == "ready", 30, "ready")

    def _lines(self) -> list:
        return read_lines(self._report)

    def _wait_line(self, match, timeout: float, what: str, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            exited = self._client.poll() is not None  # before reading: its last line may come with its exit
            for r in self._lines()[since:]:
                if match(r):
                    return r
            if exited:
                raise RedisError(
                    f"redis client exited ({self._client.returncode}) waiting for {what}: {self._client_log()}"
                )
            if time.monotonic() > deadline:
                raise RedisError(f"redis client: no {what} within {timeout}s: {self._client_log()}")
            time.sleep(0.02)

    def _client_log(self) -> str:
        try:
            return Path(self._dir, "client.log").read_text()[-1000:] or "(empty log)"
        except OSError as exc:
            return f"(no log: {exc})"

    def _wait_client_ok(self, timeout: float) -> bool:
        """Has the client had a reply after now (it may still be reconnecting)?"""
        since = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = len(self._lines())
            self._client_proc.send_signal(signal.SIGUSR1)
            snap = self._wait_line(lambda r: r["event"] == "snapshot", 10, "snapshot", since=seen)
            if snap["last_ok"] is not None and snap["last_ok"] > since:
                return True
            time.sleep(0.1)
        return False

    def _stop_client(self) -> dict:
        if self._final is not None:
            return self._final
        seen = len(self._lines())
        self._client_proc.send_signal(signal.SIGTERM)
        self._final = self._wait_line(lambda r: r["event"] == "final", 10, "final report", since=seen)
        self._client.wait(10)
        self._client_proc = None
        return self._final
