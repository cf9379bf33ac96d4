"""`hybridmig run`: live-migrate a process tree to a `hybridmig serve`.

Pre-copy rounds while the tree runs; then `criu dump --lazy-pages`, whose
post-dump hook (tasks frozen, images written) sends the last dirty pages and
the images; the destination restores from its page store and reports; only a
reported success lets CRIU end the source. Anything else resumes it."""

import logging
import math
import os
import socket
import struct
import time

import psutil

from .. import scratch, wire
from ..bindings.ranges import Ranges
from ..criu import images
from ..criu.command import CRIU_LONG_OPTS, LazyDump, check_criu_opts, dump_phases, early_vmas_used, settle
from ..criu.hook import IN_DOUBT
from ..errors import (
    CriuError,
    HybridmigError,
    InDoubtError,
    PeerClosed,
    PeerError,
    ProtocolError,
    SetupError,
    UsageError,
)
from ..messages import Faults, Host, Outcome, OutcomeQuery, Restore, Result, Resume, Streams
from ..proctree import all_held, end_tree
from ..wire import Msg
from .converge import AutoConverge
from .hold import Hold
from .options import DEFAULTS, MAX_STREAMS, SWITCHOVERS, default_streams
from .pacing import Pacer
from .postcopy import PostCopy, SourceLost, held_part, send_stale
from .precopy import PAGE_SIZE, PreCopy, Round, Sender, Throttle, ns_pid, track
from .streams import StreamSender, join_session, open_streams
from .tracker import merge, pages_in, subtract

log = logging.getLogger("hybridmig.source.migration")
FILE_PART = 16 << 20
# Asking a destination that did not answer COMMIT: a new connection this
# often until it tells what it did with its copy, or the time is up.
ASK_OUTCOME_EVERY_S = 1.0


def check_target(pid):
    """Refuse what cannot be migrated, before touching anything."""
    try:
        proc = psutil.Process(pid)
        status = proc.status()
    except psutil.NoSuchProcess as e:
        raise SetupError("no process with pid %d" % pid) from e
    if status == psutil.STATUS_ZOMBIE:
        raise SetupError("pid %d is a zombie: it has exited, and has nothing left to migrate" % pid)
    if pid == os.getpid() or pid in (p.pid for p in psutil.Process().parents()):
        raise SetupError("pid %d is hybridmig itself or one of its parents" % pid)
    if not os.path.exists("/proc/%d/exe" % pid) or not open("/proc/%d/maps" % pid).read():
        raise SetupError("pid %d is a kernel thread: it has no memory to migrate" % pid)
    return proc


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Migration:
    def __init__(
        self,
        pid,
        to,
        key,
        max_rounds=DEFAULTS.max_rounds,
        target_downtime_ms=DEFAULTS.target_downtime_ms,
        bandwidth_limit=DEFAULTS.bandwidth_limit,
        keep_cpu=DEFAULTS.keep_cpu,
        criu_opts=(),
        work_dir=None,
        timeout=DEFAULTS.timeout,
        progress=None,
        compress=DEFAULTS.compress,
        tls=None,
        auto_converge=DEFAULTS.auto_converge,
        wire_mode=wire.SEALED,
        switchover=DEFAULTS.switchover,
        postcopy_after=DEFAULTS.postcopy_after,
        streams=DEFAULTS.streams,
    ):
        self.pid = pid
        if streams is None:
            streams = default_streams(len(os.sched_getaffinity(0)))
        if not 1 <= streams <= MAX_STREAMS:
            raise UsageError(f"--streams {streams}: 1 to {MAX_STREAMS}")
        self.streams = streams
        self.stream_channels = []  # the page streams, while pre-copy uses them
        self.fault_channel = None  # post-copy's faults and their pages (switchover postcopy|auto)
        self.to = to
        self.key = key
        self.max_rounds = max_rounds
        self.target_downtime_ms = target_downtime_ms
        self.bandwidth_limit = bandwidth_limit
        if not 0 <= keep_cpu <= 1:
            raise UsageError(f"--keep-cpu {keep_cpu}: a share from 0 to 1")
        self.keep_cpu = keep_cpu
        self.criu_opts = list(criu_opts)
        self.work_dir = work_dir
        self.timeout = timeout
        self.progress = progress or (lambda kind, obj: None)
        self.compress = compress
        self.tls = tls
        self.wire_mode = wire_mode
        switchover = switchover or DEFAULTS.switchover
        if switchover not in SWITCHOVERS:
            raise UsageError(f"--switchover {switchover}: one of {', '.join(SWITCHOVERS)}")
        if not 0 <= postcopy_after < math.inf or (postcopy_after > 1 and postcopy_after != int(postcopy_after)):
            raise UsageError(
                f"--postcopy-after {postcopy_after}: a number of rounds, or a share of round 0 from 0 to 1"
            )
        if postcopy_after < 1 and switchover != "postcopy":
            raise UsageError(f"--postcopy-after {postcopy_after} (less than round 0) needs --switchover postcopy")
        # None: on for pre-copy alone (today's behaviour); auto switches to
        # post-copy where throttling would start, unless asked to throttle
        self.auto_converge = (switchover == "precopy") if auto_converge is None else auto_converge
        self.converge = None
        self.times = {}
        self.rounds = []
        self.final = Round(-1)
        self.remote_faults = 0
        self.criu_phases = {}
        self.criu_early_vmas = {}
        self.result = None  # the destination's RESULT (a Result), or why there is none
        self.channel = None
        self.images_dir = None
        self.tracker = None
        self.dump = None
        self.host = None  # the destination's HOST
        self.session = None  # the destination's id of this migration (HOST): asked about after a lost DONE
        self.in_doubt = False  # the source is left frozen for the operator: nothing may resume or end it
        self.hold = None  # the tree held stopped beside CRIU, once the copy may run (source/hold.py)
        self.criu_died_frozen = False  # CRIU died before its verdict: the source ran on meanwhile
        self.warnings = []  # after a commit: what went wrong without undoing it
        self.switchover = switchover
        self.postcopy_after = postcopy_after
        self.postcopy = False  # pre-copy chose to switch over to post-copy
        self.postcopy_run = None  # its PostCopy
        self.stop_reason = None  # why pre-copy stopped (PreCopy.stop_reason)
        self.doubt = None  # post-copy: why the source is left frozen
        self.lost = None  # post-copy: the source (or its CRIU) died, the error to raise
        self.bytes_earlier = 0  # sent on connections since broken (post-copy recovery)

    # --- the steps --------------------------------------------------------------

    def run(self):
        """Migrate; returns the report. Raises HybridmigError with the source
        running and intact on any failure before the destination confirmed."""
        check_criu_opts(self.criu_opts, allowed=CRIU_LONG_OPTS)  # hybridmig's own refusals, before any connection
        check_target(self.pid)
        same_host_init_check = self._connect()
        if same_host_init_check and ns_pid(self.pid) != 1:
            raise SetupError(
                "pid %d is not the init of its own pid namespace, and the destination is this same machine: "
                "CRIU restores the tree with its pids, which the frozen source still holds until the "
                "destination confirms; start the workload with `unshare -p -f setsid ...`" % self.pid
            )
        try:
            self._open_streams()
            self._open_faults()
        except BaseException:
            self.channel.close()
            for ch in self.stream_channels:
                ch.close()
            raise
        self.times["start"] = time.time()
        try:
            tree = [self.pid] + [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess as e:
            raise SetupError("pid %d exited before its migration started" % self.pid) from e
        # absolute: CRIU runs the hook written there from its own working directory
        work = os.path.abspath(self.work_dir) if self.work_dir else scratch.make("hybridmig-run-")
        self.tracker = track(self.pid)
        self.times["attach_stop_ms"] = self.tracker.attach()
        try:
            # CRIU starts now and waits at its pre-dump hook, so that its
            # start-up is over when pre-copy converges.
            images.load_reader()  # now, not in the blackout (50-250 ms of imports)
            self.dump = self._start_dump(work)
            images_dir = self.images_dir = self.dump.images_dir
            self.sender = (StreamSender if self.stream_channels else Sender)(
                self.channel,
                {p: ns_pid(p) for p in tree},
                self.pid,
                self.compress,
                self._throttle(),
            )
            if isinstance(self.sender, StreamSender):
                self.sender.use_streams(self.stream_channels)
            if self.auto_converge:
                self.converge = AutoConverge(self.tracker.pids)
            precopy = PreCopy(
                self.tracker,
                self.sender,
                self.max_rounds,
                self.target_downtime_ms,
                progress=self._round_done,
                converge=self.converge,
                switchover_mode=self.switchover,
                postcopy_after=self.postcopy_after,
            )
            self.times["precopy_start"] = time.time()
            self.rounds = precopy.run()
            self.sender.rounds_over()  # (page streams: the rest goes on the control channel)
            self.pending = precopy.pending
            self.postcopy, self.stop_reason = precopy.postcopy, precopy.stop_reason
            self.times["precopy_done"] = time.time()
            self._switch_over(images_dir)
        finally:
            if self.converge is not None:
                self.converge.stop()
            if self.dump is not None:
                if "go" not in self.times:
                    self.dump.cancel()
                if not self.in_doubt:  # else CRIU waits, the tree frozen, for `hybridmig settle`
                    self.dump.wait(self.timeout)
                self.dump.close()
            if self.tracker is not None:
                self.tracker.detach()
            sender = getattr(self, "sender", None)
            if isinstance(sender, StreamSender):
                sender.close()
            for ch in self.stream_channels:
                ch.close()
            if self.fault_channel is not None:
                self.fault_channel.close()
            self.channel.close()
            if not self.work_dir and not self.in_doubt:  # the waiting CRIU's images dir: left to it
                try:
                    scratch.remove(work)  # (a killed CRIU's mounts in its work dir)
                except OSError as e:
                    log.error("%s", e)
        return self.report()

    def _throttle(self):
        """The pre-copy rounds' pace: --bandwidth-limit, and the tree's CPU
        share kept (--keep-cpu, source/pacing.py)."""
        pacer = Pacer(self.tracker.pids, self.keep_cpu) if self.keep_cpu else None
        return Throttle(self.bandwidth_limit, pacer) if self.bandwidth_limit or pacer else None

    def _start_dump(self, work):
        """The switch-over's dump, started: it waits at its pre-dump hook."""
        images_dir = os.path.join(work, "images")
        os.makedirs(images_dir, exist_ok=True)
        return LazyDump(self.pid, images_dir, work, self.criu_opts)

    def _before_freeze(self):
        """What the destination may start on before the tree is frozen (a
        container's restore, up to its conmon)."""

    def _send_extra(self):
        """What the destination needs besides CRIU's images, sent before
        RESTORE while the tree is frozen (a container's configuration)."""

    def _send_file(self, name, path):
        """One file as FILE frames, in parts: memory CRIU does not dump
        lazily can be large."""
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(FILE_PART)
                self.channel.send(Msg.FILE, wire.encode_file(name, offset, data))
                offset += len(data)
                if len(data) < FILE_PART:
                    break

    def _round_done(self, rnd):
        failed = self.dump.failed()
        if failed:  # a CRIU that cannot start (options, permissions) ends pre-copy now, not at its end
            raise CriuError(f"{failed}; the source keeps running")
        self.progress("round", rnd)

    def _connect(self):
        # no frame from the destination (an ack, RESULT) for --timeout ends
        # the migration: a destination that hangs must not hold the source
        self.channel = wire.connect(self.to, self.key, tls=self.tls, idle_timeout=self.timeout, mode=self.wire_mode)
        kind, payload = self.channel.recv()
        if kind != Msg.HOST:
            raise ProtocolError(f"{self.channel.peer} did not describe itself")
        host = self.host = Host.decode(payload)
        self.session = host.session
        # the destination's CRIU runs them: refused here, before the source is touched
        check_criu_opts(self.criu_opts, allowed=set(host.criu_opts_allowed))
        return host.boot_id == wire.boot_id()

    def _open_streams(self):
        """--streams N > 1: announce them (STREAMS), then N connections,
        each authenticated as the control channel is and joined to its
        session (STREAM). Before the process is touched."""
        if self.streams < 2:
            return
        self.channel.send(Msg.STREAMS, Streams(self.streams).encode())
        kind, payload = self.channel.recv()
        if kind != Msg.STREAMS or Streams.decode(payload).count != self.streams:
            raise ProtocolError(f"{self.channel.peer} answered STREAMS with {kind.name}")

        self.stream_channels = open_streams(self.channel, self.session, self.streams, self._connect_stream)
        log.info("pre-copy over %d page streams", self.streams)

    def _connect_stream(self):
        """A new authenticated connection flagged as a stream of this session."""
        return wire.connect(
            self.to, self.key, tls=self.tls, idle_timeout=self.timeout, mode=self.wire_mode, stream=True
        )

    def _open_faults(self):
        """Where post-copy may come (--switchover postcopy|auto): announce
        the fault channel (FAULTS) and open it, joined to the session as a
        page stream is (STREAM, index wire.FAULT_LANE). Before the process
        is touched; idle until the switch-over."""
        if self.switchover == "precopy":
            return
        self.channel.send(Msg.FAULTS, Faults().encode())
        try:
            kind, _ = self.channel.recv()
        except PeerError as e:  # an older serve refuses it (the process is not touched yet)
            raise PeerError(
                f"{e} (a serve older than this run has no fault channel: upgrade it, or run with "
                "--switchover precopy, which needs none)"
            ) from e
        if kind != Msg.FAULTS:
            raise ProtocolError(f"{self.channel.peer} answered FAULTS with {kind.name}")
        self.fault_channel = join_session(self.channel, self.session, wire.FAULT_LANE, self._connect_stream)

    def _switch_over(self, images_dir):
        self.dump.wait_hook("pre-dump", self.timeout)
        self.times["criu_ready"] = time.time()
        self._before_freeze()
        # Let go of an auto-converged tree only now, as CRIU seizes it next:
        # it runs free just for CRIU's few steps before the seizing.
        if self.converge is not None:
            self.converge.stop()
        self.times["go"] = time.time()
        self.dump.go()
        try:
            if self.postcopy:  # while CRIU freezes and dumps: out of the frozen step
                self._send_stale(self.pending)
            conn = self.dump.wait_hook("post-dump", self.timeout)
        except BaseException:
            self.dump.kill()  # CRIU resumes what it froze when it dies before post-dump
            raise
        self.times["dumped"] = time.time()
        with conn:
            if self.postcopy:
                verdict = self._postcopy(images_dir, conn)  # answers the hook itself, at once
                self.in_doubt = verdict is None
            else:
                verdict = self._final(images_dir) and self._source_still_frozen() and self._commit()
                self.in_doubt = verdict is None
                conn.sendall(IN_DOUBT if self.in_doubt else b"0" if verdict else b"1")
                if self.in_doubt:
                    self._hold_in_doubt()
        # read once the tree is no longer held on it
        self.criu_phases = dump_phases(self.dump.log)
        self.criu_early_vmas = early_vmas_used(self.dump.log)
        if self.in_doubt:
            raise InDoubtError(self._in_doubt_message())
        if self.lost is not None:
            raise self.lost
        rc = self.dump.wait(self.timeout)
        self.times["source_done"] = time.time()
        if verdict and (rc == 0 or rc is None or not alive(self.pid)):
            # Committed: the destination's copy is the one. A CRIU still
            # running here ends the source once its page server is closed.
            if rc is None:
                self._warn(f"criu dump has not finished {self.timeout}s after the commit; the source ends with it")
            try:
                self.channel.send(Msg.ENDED)
            except ProtocolError as e:  # the destination keeps its copy all the same
                self._warn(f"could not tell the destination that the source has ended: {e}")
            return
        if verdict:
            # CRIU failed (or was killed) after the commit and the source runs
            # again. The destination's copy is the one: it took the commit
            # holding every page. Only one side may decide, and the hook's
            # end-session child, told "commit", ends the source too when it
            # finds CRIU gone: so does run, never undoing a commit.
            self._end_source()
            self._warn(
                "criu dump failed after the commit (%s): the source, resumed by it, was ended"
                % (self.dump.failed() or "exit %s" % rc)
            )
            try:
                self.channel.send(Msg.ENDED)
            except ProtocolError as e:
                self._warn(f"could not tell the destination that the source has ended: {e}")
            return
        self._abort_destination()
        error = (self.result and self.result.error) or "no result"
        if self.criu_died_frozen:
            ended = "the destination's copy was ended" if "images_sent" in self.times else "nothing was restored"
            raise CriuError(f"{error}; {ended}")
        raise HybridmigError(f"the destination did not restore the process: {error}; the source was resumed")

    # --- post-copy (source/postcopy.py; docs/design.md, "Post-copy") ---------------

    def _in_doubt_message(self):
        why = (
            self.doubt
            or "the destination did not answer the commit, and could not be asked what it did within %ss: "
            "it may run the migrated copy"
            % self.timeout
        )
        if self.hold is None:  # (CRIU died before it could be held: _hold_in_doubt)
            return "%s. The source (pid %d) runs again: end it if the destination runs its copy" % (why, self.pid)
        if self.hold.criu_alive():
            held, settled_by = "frozen by criu dump (pid %d) and held stopped" % self.dump.criu_pid, self.dump.criu_pid
        else:
            held, settled_by = "held stopped (its criu dump, pid %d, has died)" % self.dump.criu_pid, self.pid
        return (
            "%s. The source (pid %d) is left %s. Once you know which copy to keep: `hybridmig settle %d resume` "
            "resumes the source (only if the destination has no copy running), `hybridmig settle %d end` ends it "
            "(only if it has); run either here, on the source host. CRIU's images and dump.log stay in %s"
            % (why, self.pid, held, settled_by, settled_by, self.images_dir)
        )

    def _hold_tree(self):
        """From here on the tree must not run again until run or the operator
        decides, even if CRIU dies: held stopped beside CRIU's hold
        (source/hold.py), once CRIU has been told to wait (IN_DOUBT).
        CriuError if CRIU is gone already: the tree may have run since."""
        pids = [self.pid] + [p for p in self.tracker.pids() if p != self.pid]
        self.hold = Hold.take(self.pid, pids, self.dump.criu_pid)
        if self.hold is None:
            self.criu_died_frozen = True
            raise CriuError(
                "%s before the source could be held: it ran again" % (self.dump.failed() or "criu dump died")
            )

    def _hold_in_doubt(self):
        try:
            self._hold_tree()
        except CriuError as e:
            self._warn(str(e))

    def _postcopy(self, images_dir, conn):
        """The tree frozen: tell the destination which of its pages are
        stale, keep the tree frozen whatever happens to run (hook verdict
        IN_DOUBT), restore there at once and serve what it lacks until it
        has every page. True: committed, the source was ended; False: the
        copy never ran, the source was resumed; None: left frozen (self.doubt
        says why), the operator decides."""
        final = self.final = Round(len(self.rounds))
        t0, cpu0 = time.monotonic(), time.process_time()
        try:
            # Frozen time: only what was written since the last scan is
            # looked at here (the pages carried from it were declared stale
            # while CRIU dumped); the owed set, tens of thousands of runs
            # after round 0, is worked out once RESTORE is out.
            fresh = self._final_scan(final, carry=False)
            self._send_stale(fresh)
            self.times["final_sent"] = time.time()
            self._check_snapshot()  # (pages are read later, but the scan must be of a frozen tree)
        except HybridmigError as e:  # nothing restored yet: the source resumes
            conn.sendall(b"1")
            self.result = Result(ok=False, error=str(e))
            return False
        # From here on CRIU holds the tree frozen until settled: `run`
        # killed, the link cut, the destination gone, nothing resumes it
        # behind the back of a copy that may have run; nor does CRIU's own
        # death, once run holds it too. (In this order: a run killed
        # between the two leaves a tree CRIU holds, never one stopped for
        # good behind a CRIU that resumed it.)
        conn.sendall(IN_DOUBT)
        try:
            self._hold_tree()
        except CriuError as e:  # nothing restored yet: the tree runs on, as CRIU's death left it
            self.result = Result(ok=False, error=str(e))
            return False
        try:
            self._send_images(images_dir, postcopy=True)
            # the destination restores meanwhile: the source's bookkeeping now
            owed = {}
            for pid, key in self.sender.keys.items():
                dirty = merge(fresh.get(pid, []) + list(self.pending.get(pid, [])))
                final.pages_written += pages_in(dirty)
                owed[pid] = Ranges(self._lacking(images_dir, key, dirty))
            postcopy = self.postcopy_run = PostCopy(
                self.channel,
                self.sender,
                owed,
                final,
                source_held=self.hold.holding,
                faults=self.fault_channel,
            )
            # From here PostCopy knows what the destination lacks. `held`,
            # full of the stale pages' holes, would move its whole array for
            # every pushed run that fills one (Ranges.add): it starts over,
            # the pushes appended at its end.
            self.sender.held = {}
            log.info("post-copy: %d pages owed to the destination", postcopy.owed_at_start)
            self.result = self._serve_postcopy(postcopy)
        except SourceLost as e:
            final.ended(t0, cpu0)
            return self._source_lost(e)
        except ProtocolError as e:
            final.ended(t0, cpu0)
            self.result = Result(ok=False, error=str(e), ran=True)
            return self._postcopy_broken(f"the session broke during post-copy ({e})")
        final.ended(t0, cpu0)
        self.times["restored"] = time.time()
        if not self.result.ok:
            if not self.result.ran:  # CRIU never let the copy run: the source may
                self._settle(end=False)
                return False
            self.doubt = "the destination's copy ran and then failed: %s" % self.result.error
            return None
        kept = self._commit()  # after DONE the destination holds its copy as the one
        if kept:
            return self._settle(end=True)
        self.doubt = "the destination has every page but did not take the commit (%s)" % (
            "it ended its copy" if kept is False else "no answer"
        )
        return None

    def _serve_postcopy(self, postcopy):
        """postcopy.serve(), over a new connection each time the link
        breaks, for as long as the source comes back within --timeout
        (the destination's copy waits in its faults meanwhile)."""
        while True:
            try:
                return postcopy.serve()
            except SourceLost:
                raise
            except ProtocolError as e:
                if isinstance(e, (PeerClosed, PeerError)) or not self._reconnect(postcopy, e):
                    raise

    def _reconnect(self, postcopy, error):
        """A new connection to the destination, on which it takes up this
        session's post-copy (RESUME); False if none within --timeout."""
        self._warn(f"the link broke during post-copy ({error}): reconnecting, the source frozen")
        self.bytes_earlier += self.channel.bytes_sent
        try:  # a reset, not a FIN the destination could read as "the source is gone"
            self.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.channel.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            channel = None
            try:
                left = deadline - time.monotonic()
                channel = wire.connect(
                    self.to, self.key, timeout=min(left, 10.0), tls=self.tls, idle_timeout=left, mode=self.wire_mode
                )
                channel.recv()  # HOST
                channel.send(Msg.RESUME, Resume(self.session).encode())
                kind, payload = channel.recv()
                if kind != Msg.RESUME or Resume.decode(payload).session != self.session:
                    raise ProtocolError(f"{channel.peer} answered RESUME with {kind.name}")
                channel.sock.settimeout(self.timeout)
                self.channel = self.sender.channel = channel
                postcopy.reattach(channel)
                self._warn("the destination took the post-copy up again on a new connection")
                return True
            except ProtocolError as e:
                log.warning("cannot reconnect to the destination yet: %s", e)
                if channel is not None:
                    channel.close()
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return False

    def _postcopy_broken(self, why):
        """No RESULT: ask what the destination did. A copy it kept (it had
        every page) is the one; otherwise it may have run: left frozen."""
        self.channel.close()
        kept = self._ask_outcome()
        if kept:
            self._warn(f"{why}; the destination, asked, has kept its copy with every page")
            return self._settle(end=True)
        self.doubt = "%s: the destination %s" % (
            why,
            "ended its copy, which had run: resuming the source would replay what it did"
            if kept is False
            else "could not be asked what became of its copy",
        )
        return None

    def _source_lost(self, e):
        """The frozen tree, or the CRIU holding it, is gone: the destination
        cannot get what it lacks; it is told, and ends its copy. A tree that
        CRIU's death let run again is the one copy left."""
        self._warn(str(e))
        try:
            self.channel.send_error(str(e))
        except ProtocolError:
            pass  # the destination ends its copy with the session anyway
        if self.hold.criu_alive() or self.hold.holding():
            self._settle(end=True)  # a process of it is gone: the rest can never run whole
        else:  # let go of it by someone else while its CRIU was gone: the one copy left, whole
            self.hold.release()
        self.result = Result(ok=False, error=str(e), ran=True)
        self.lost = e
        return False

    def _settle(self, end):
        """Decide for the tree left frozen by IN_DOUBT: end it, or resume it,
        through its CRIU, or by run's hold alone once that CRIU has died."""
        try:
            if not self.hold.settle(end, lambda: settle(self.dump.criu_pid, end=end, timeout=self.timeout)):
                self._warn(
                    "criu dump (pid %d) died after the switch-over; the source, held stopped by run, was %s"
                    % (self.dump.criu_pid, "ended" if end else "resumed")
                )
        except HybridmigError as e:
            self._warn(f"could not {'end' if end else 'resume'} the frozen source through criu dump: {e}")
        return end

    def _end_source(self):
        """End the source tree (stopped first, by pid: psutil checks identity)."""
        try:
            end_tree(psutil.Process(self.pid))
        except psutil.NoSuchProcess:
            pass

    def _final(self, images_dir):
        """Tasks frozen: the last dirty pages, the pages CRIU lists that the
        destination lacks, the images; then restore. True once confirmed."""
        try:
            final = self.final = Round(len(self.rounds))
            dirty = self._final_scan(final)
            # Not detached yet: closing the tracker's userfaultfd makes the
            # kernel clear write-protection over all the tracked memory (200 ms
            # at 4 GiB), frozen time better spent sending. run() detaches
            # once the outcome is known; if committed, the source's memory is
            # gone by then and the close costs nothing.
            t_scanned, t0, cpu0 = time.time(), time.monotonic(), time.process_time()
            for pid, key in self.sender.keys.items():
                need = self._lacking(images_dir, key, dirty.get(pid, []))
                self.sender.send_ranges(pid, need, final)
            self.times["final_sent"] = time.time()
            self._check_snapshot()
            final.ended(t0, cpu0)  # its send alone: no ack, the images follow
            log.info(
                "final round: scan %.1f ms, %d pages sent in %.1f ms",
                (t_scanned - self.times["dumped"]) * 1000,
                final.pages_sent,
                (self.times["final_sent"] - t_scanned) * 1000,
            )
            self._send_images(images_dir)
            self.result = self._await_result()
            self.times["restored"] = time.time()
            return self.result.ok
        except HybridmigError as e:
            self.result = Result(ok=False, error=str(e))
            return False

    def _send_stale(self, dirty):
        """STALE for the pages of `dirty` ({host pid: sorted ranges}) that
        the destination holds: sorted lists swept once, never a native call
        per run (55 000 runs at 1 GiB after round 0: those took 0.8 s)."""
        for pid, ranges in dirty.items():
            key = self.sender.keys.get(pid)
            stale = held_part(ranges, list(self.sender.held.get(key) or ())) if key is not None else []
            if stale:
                send_stale(self.channel, key, stale)

    def _final_scan(self, final, carry=True):
        """The tree frozen: {host pid: ranges} written since the last round
        (hot pages included), and (carry) those the last scan found and
        left for the final round, counted in final.pages_written; VMAs gone
        are invalidated on the destination."""
        dirty = {}
        for pid, res in self.tracker.scan().items():
            self.sender.adopt(pid)
            if res.removed:
                self.sender.invalidate(pid, res.removed)
            log.info(
                "final scan of %d: %d pages written since the last round, %d hot, %d carried from it",
                pid,
                res.dirty_pages,
                res.hot_pages,
                sum(e - s for s, e in self.pending.get(pid, [])) // PAGE_SIZE,
            )
            # hot pages were never sent in a round: they go now
            if carry:
                dirty[pid] = merge(res.owed + list(self.pending.get(pid, [])))
                final.pages_written += pages_in(dirty[pid])
            else:
                dirty[pid] = res.owed
        return dirty

    def _send_images(self, images_dir, postcopy=False):
        """CRIU's images, what else the destination needs, then RESTORE."""
        for name in sorted(os.listdir(images_dir)):
            if not name.endswith(".log"):
                self._send_file(name, os.path.join(images_dir, name))
        self._send_extra()
        self.channel.send(Msg.RESTORE, Restore(self.criu_opts, postcopy=postcopy, reconnect_s=self.timeout).encode())
        self.times["images_sent"] = time.time()

    def _check_snapshot(self):
        """The final pages were read from a tree frozen throughout: if CRIU
        died meanwhile, the tree ran again and the pages sent are torn (a
        page read before a write, its bookkeeping after). The destination
        must not run that: no RESTORE (the soak saw such a copy read a
        stale page)."""
        if all_held(self.tracker.pids()):
            return
        self.criu_died_frozen = True
        failed = self.dump.failed() or "criu dump let the tree go"
        raise CriuError(f"{failed} during the final round: the source ran again, the pages sent are no snapshot")

    def _source_still_frozen(self):
        """CRIU holds the tree frozen until its verdict; one that died has let
        it run again, and the pages sent since the final scan are no snapshot
        of it: no commit then (the source runs on, as it is)."""
        failed = self.dump.failed()
        if failed:
            self.result = Result(ok=False, error=f"{failed} before the commit, letting the source run again")
            self.criu_died_frozen = True
        return not failed

    def _commit(self):
        """COMMIT, answered by DONE once the destination holds its copy as
        the one: it keeps it from then on, even if the session breaks. Until
        then a session that breaks (this process killed, the link cut) makes
        it end its copy, while CRIU, given no verdict, resumes the source.
        Without DONE the destination may have committed all the same (DONE
        lost on its way): it is asked. True: it keeps its copy; False: it
        ended it, the source resumes; None: unknown, the source stays frozen."""
        try:
            self.channel.send(Msg.COMMIT)
            self._expect_done()
            return True
        except ProtocolError as e:
            self._warn(f"no answer to the commit ({e}); asking the destination what it did, the source frozen")
        self.channel.close()  # the destination's session ends, and records its outcome
        kept = self._ask_outcome()
        if kept is False:
            self.result = Result(ok=False, error="the destination did not take the commit: it ended its copy")
        elif kept:
            self._warn("the destination, asked again, has kept its copy: the commit stands")
        return kept

    def _ask_outcome(self):
        """Whether the destination kept its copy of this session (True/False),
        asked over new connections until --timeout is up; None if it never
        said."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.session is None:
                return None
            channel = None
            try:
                channel = wire.connect(self.to, self.key, timeout=min(left, 10.0), tls=self.tls, idle_timeout=left)
                kind, _ = channel.recv()  # HOST, of the connection: not ours
                channel.send(Msg.OUTCOME, OutcomeQuery(self.session).encode())
                kind, payload = channel.recv()
                if kind != Msg.OUTCOME:
                    raise ProtocolError(f"{channel.peer} answered OUTCOME with {kind.name}")
                outcome = Outcome.decode(payload).outcome
                log.warning("the destination says session %s: %s", self.session, outcome)
                if outcome in ("kept", "ended"):
                    return outcome == "kept"
                if outcome != "pending":  # it does not know the session: it never will
                    self._warn(f"the destination does not know session {self.session} ({outcome})")
                    return None
            except ProtocolError as e:
                log.warning("cannot ask the destination about the commit yet: %s", e)
            finally:
                if channel is not None:
                    channel.close()
            time.sleep(min(ASK_OUTCOME_EVERY_S, max(0.0, deadline - time.monotonic())))

    def _warn(self, text):
        log.warning("%s", text)
        self.warnings.append(text)

    def _lacking(self, images_dir, key, dirty):
        """Dirty pages (sorted, disjoint: a scan's), and lazy pages of the
        final images the destination lacks."""
        held = list(self.sender.held.get(key) or ())
        try:
            task = images.read_task(images_dir, key)
        except HybridmigError as e:
            log.info("pid %d: no lazy pages in the final images (%s)", key, e)
            return dirty  # a zombie, or a task that has no memory
        never_sent = subtract([(run.vaddr, run.end) for run in task.runs], held)
        need = merge(dirty + never_sent) if never_sent else dirty
        log.info(
            "pid %d: %d dirty pages, %d lazy pages in all, %d to send",
            key,
            pages_in(dirty),
            task.lazy_pages,
            pages_in(need),
        )
        if not task.lazy_pages and held:
            # CRIU wrote the memory into the images: it all travels while frozen
            log.warning(
                "pid %d: CRIU dumped no page lazily (%d MiB pre-copied in vain): the downtime will carry "
                "the whole memory; a released CRIU <= 4.2.1 does so when a thread's stack pointer is "
                "page-aligned (`hybridmig doctor`: criu patches)",
                key,
                pages_in(held) >> 8,
            )
        return need

    def _await_result(self):
        """Serve remote faults until the destination reports; the source is
        frozen meanwhile, so a silent destination is given up on (the
        session's timeout)."""
        host_of = {key: pid for pid, key in self.sender.keys.items()}
        while True:
            kind, payload = self.channel.recv()
            if kind == Msg.FETCH:
                key, vaddr, npages = wire.decode_range(payload)
                if key not in host_of or not 0 < npages <= wire.MAX_FRAME_PAGES or vaddr % PAGE_SIZE:
                    raise ProtocolError(
                        "%s asked for %d pages at 0x%x of pid %d, not one of the tree's, or not a valid range"
                        % (self.channel.peer, npages, vaddr, key)
                    )
                self.remote_faults += npages
                self.sender.send_ranges(host_of[key], [(vaddr, vaddr + npages * PAGE_SIZE)], self.final)
            elif kind == Msg.RESULT:
                return Result.decode(payload)
            else:
                raise ProtocolError(f"unexpected {kind.name} while the destination restores")

    def _expect_done(self):
        kind, _ = self.channel.recv()
        if kind != Msg.DONE:
            raise ProtocolError(f"expected DONE, got {kind.name}")

    def _abort_destination(self):
        try:
            self.channel.send(Msg.ABORT)
            self._expect_done()
        except ProtocolError:
            pass  # the destination is gone: it ends an unconfirmed restore itself

    def _missed_because(self, breakdown):
        """Why the blackout was longer than the target, in words."""
        if not self.postcopy and self.stop_reason and self.stop_reason != "fits":
            return self.stop_reason + ": the final round carried what the rounds could not"
        step, ms = max(
            ((k, v) for k, v in breakdown.items() if k != "installing_after_resume_ms"), key=lambda kv: kv[1]
        )
        return "the switch-over's steps took longer than estimated (the longest: %s, %.0f ms)" % (step, ms)

    # --- report --------------------------------------------------------------------

    def report(self):
        """The downtime runs from the freeze to the restored tasks running
        (criu restore done on the destination); pages still installing by
        then are served from the destination's RAM."""
        t = self.times
        dest = self.result  # a success: report() follows a commit
        phases = dict(self.criu_phases)
        # CRIU's read of the VMAs before the seize (--early-vmas): after go, but the tree still runs
        early_vmas_ms = phases.pop("early_vmas", 0.0)
        breakdown = {
            # the part of CRIU's start-up (begun with pre-copy) still to go
            # when pre-copy converged (the tree still runs, unless
            # auto-converge holds it)
            "criu_startup_ms": (t["criu_ready"] - t["precopy_done"]) * 1000,
            "freeze_to_dumped_ms": (t["dumped"] - t["go"]) * 1000 - early_vmas_ms,
            "final_pages_ms": (t["final_sent"] - t["dumped"]) * 1000,
            "images_ms": (t["images_sent"] - t["final_sent"]) * 1000,
            "restore_ms": dest.restore_s * 1000,
        }
        downtime = sum(breakdown.values())
        breakdown["installing_after_resume_ms"] = (dest.installed_s - dest.restore_s) * 1000
        rounds = [r.as_dict() for r in self.rounds] + [dict(self.final.as_dict(), final=True)]
        report_postcopy = None
        if self.postcopy_run is not None:
            pc = dict(self.postcopy_run.stats(), **dest.postcopy)
            # pages the copy lacked when it resumed, until all were in
            pc["post_resume_s"] = dest.installed_s - dest.restore_s
            report_postcopy = pc
        target = {"target_ms": self.target_downtime_ms, "missed": downtime > self.target_downtime_ms, "reason": None}
        if target["missed"]:
            target["reason"] = self._missed_because(breakdown)
            self._warn(
                "the blackout of %.0f ms missed --target-downtime %.0f ms: %s"
                % (downtime, self.target_downtime_ms, target["reason"])
            )
        return {
            "result": "migrated",
            "switchover": "postcopy" if self.postcopy else "precopy",
            "switchover_mode": self.switchover,
            "streams": self.streams,
            "stop_reason": self.stop_reason,
            "target_downtime": target,
            "postcopy": report_postcopy,
            "pid": self.pid,
            "to": self.to,
            "rounds": rounds,
            # whether lz4 paid on this link, measured in the rounds (compression.LinkProbe)
            "lz4_probes": self.sender.lz4_probes,
            "downtime_ms": downtime,
            "breakdown": breakdown,
            # freeze_to_dumped_ms as CRIU's own log splits it (seize, network
            # lock, namespaces, vmas, parasite, pagemap, page_pipes, images);
            # the rest is CRIU's hooks and our answers to them
            "criu_dump_phases_ms": dict(
                phases,
                hooks_and_rest=breakdown["freeze_to_dumped_ms"] - sum(phases.values()),
            )
            if phases
            else {},
            "criu_lazy_pages_in_place": self.dump.in_place,
            # --early-vmas: the pids whose VMAs the dump took from its read before the seize, and not
            "criu_early_vmas": dict(self.criu_early_vmas, read_ms=early_vmas_ms) if self.criu_early_vmas else {},
            "bytes_sent": self.bytes_earlier
            + self.channel.bytes_sent
            + sum(ch.bytes_sent for ch in self.stream_channels)
            + (self.fault_channel.bytes_sent if self.fault_channel is not None else 0),
            "remote_faults": report_postcopy["remote_faults"] if report_postcopy else self.remote_faults,
            "attach_stop_ms": t.get("attach_stop_ms"),
            "auto_converge_held_s": self.converge.held_s if self.converge else 0.0,
            "precopy_s": t["precopy_done"] - t["start"],
            "precopy_started_at": t["precopy_start"],  # (epoch s: round 0 starts then)
            "restored_pid": dest.restored_pid,
            "destination": dest.as_dict(),
            "warnings": self.warnings,
        }
