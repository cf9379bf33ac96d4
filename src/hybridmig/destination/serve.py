"""`hybridmig serve`: the destination.

It keeps the pages that pre-copy rounds send resident in a RAM page store,
takes the final CRIU images, restores them with `criu restore --lazy-pages`
while its own fault loop serves every page from that store, and reports the
result to the source, which only then lets go of its copy (docs/design.md).
"""

import dataclasses
import logging
import os
import secrets
import shlex
import socket
import subprocess
import threading
import time
from typing import Any

import psutil

from .. import scratch, wire
from ..bindings import PAGE_SIZE
from ..bindings.pagestore import PageStore
from ..cpus import data_threads
from ..criu import images
from ..criu.command import ALLOWED_CRIU_OPTS, CRIU_LOG_LEVEL, check_criu_opts, criu_binary, log_tail
from ..errors import CriuError, HybridmigError, PeerClosed, PeerError, ProtocolError
from ..messages import (
    Container,
    ContainerStart,
    Faults,
    Host,
    Outcome,
    OutcomeQuery,
    Restore,
    Result,
    RoundStats,
    Streams,
)
from ..proctree import end_tree
from ..wire import Msg
from .accept import Acceptor
from .container import ContainerRestore, is_podman_file
from .faults import FaultLane
from .guard import Guard
from .inbound import Inbound
from .lazypages import LazyPagesDaemon
from .pace import RoundPace
from .streams import MAX_STREAMS, Registry, StreamSet

log = logging.getLogger("hybridmig.destination.serve")
# A source silent for this long (stopped, hung) ends its session, so that
# other sources are served: longer than any step of a live one (its CRIU's
# dump at the switch-over is bounded by its --timeout, 120 s by default).
SESSION_IDLE_S = 600
# After COMMIT the source's CRIU ends its tasks (within its own --timeout)
# and reports; no word for this long, and the session is over.
END_WAIT_S = 600
# How long serve remembers what became of a session's copy, for a source
# whose DONE was lost and that asks again (OUTCOME).
OUTCOME_KEEP_S = 3600
# serve --once, committed without hearing ENDED: the source may not know
# that its DONE came (it asks, OUTCOME, for up to its --timeout, 120 s by
# default); serve stays this long to tell it, answering nothing else.
ONCE_LINGER_S = 150
# What an authenticated source may make a session hold: store tasks (pids),
# image files. Pages and image bytes count against Limits.max_memory.
MAX_TASKS = 1 << 16
MAX_IMAGE_FILES = 1 << 16
# The action script of serve's criu restore: at setup-namespaces the
# restored root exists (CRIU passes its pid) while the pidfile comes only at
# the end of the restore. A serve killed in between takes its CRIU along
# (parent-death signal) and leaves that root half-restored in CRIU's
# restorer: the guard ends it by this file (found by the soak).
ROOT_HOOK = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = setup-namespaces ] && echo "$CRTOOLS_INIT_PID" > {root}.tmp && mv {root}.tmp {root}
exit 0
"""
# Run by setpriv once it has set the parent-death signal: a parent that died
# before then is caught here, as the child has been reparented meanwhile.
_PARENT_CHECK = 'test "$PPID" = "$1" || exit 111; shift; exec "$@"'


def dies_with_me(cmd):
    """`cmd` wrapped so that it gets SIGKILL when this process dies, and does
    not start at all if this process is already gone by then. serve runs
    criu restore so: a serve that dies must not leave a restore running to
    bring up, unattended, a copy the source never committed to (the source
    resumes when serve is gone)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _PARENT_CHECK, "sh", str(os.getpid()), *cmd]


def default_max_memory():
    """serve's page-store quota unless told: the memory available now, less
    a margin for the restored process to start and the system to go on."""
    vm = psutil.virtual_memory()
    return max(0, vm.available - max(1 << 30, vm.total // 16))


@dataclasses.dataclass
class Limits:
    """What one session may take on the destination."""

    max_memory: int | None = None  # bytes of pages and images; None: default_max_memory() at the session's start
    criu_opts: frozenset = ALLOWED_CRIU_OPTS  # CRIU options a source may ask for (full long names)
    podman: object = None  # podman.Podman that containers are restored into (serve --podman); None: no containers


class Outcomes:
    """What became of recent sessions' copies, by session id: "kept",
    "ended", or "pending" while a session runs. A source that sent COMMIT
    and got no DONE asks (OUTCOME) before it resumes or ends its own copy."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id = {}  # id -> (outcome, when)

    def set(self, session_id, outcome):
        with self._lock:
            now = time.monotonic()
            self._by_id = {k: v for k, v in self._by_id.items() if now - v[1] < OUTCOME_KEEP_S}
            self._by_id[session_id] = (outcome, now)

    def get(self, session_id):
        with self._lock:
            outcome, when = self._by_id.get(session_id, ("unknown", 0.0))
        return outcome if outcome == "pending" or time.monotonic() - when < OUTCOME_KEEP_S else "unknown"


def store_pages(store, key, extents, data):
    """Put one PAGES body into the store: zero pages as flags (one native
    call per extent)."""
    data = memoryview(data)
    off = 0
    for vaddr, npages, zero in extents:
        off += store.put_pages(key, vaddr, npages, zero, data[off:])


class RemotePages:
    """The lazy daemon's page source on the destination: pages are already in
    the store; any that are not (a remote fault, which pre-copy should make
    impossible) are fetched from the frozen source over the session."""

    preload = False  # a PageSource (sources.py)
    prefetch = False  # the store holds every page already: fetch only what a fault asks for
    arrives_later = False

    def __init__(self, channel, store, timeout=60.0):
        self.channel, self.store, self.timeout = channel, store, timeout
        self.arrived = threading.Condition()
        self.remote_pages = 0
        self.gone = None  # why the source is gone: a fetch fails at once

    def add_task(self, key, task):
        pass  # every lazy run is owed; presence is checked per request

    def _complete(self, key, vaddr, npages):
        data, zero = self.store.count(key, vaddr, npages)
        return data + zero == npages

    def read_into(self, store, key, vaddr, npages, pid=None, src=None):
        """Fetch what the store lacks from the source. A task forked after
        restore (pid != key) owes its parent's pages: they are fetched for the
        parent's pid and copied to the child's key. (Pages mremap moved before
        their data came, src != vaddr, cannot happen here: every page is in
        the store before the restore starts.)"""
        if self._complete(key, vaddr, npages):
            return
        src = key if pid is None else pid
        data, zero = self.store.count(src, vaddr, npages)
        if data + zero < npages:
            if self.gone is not None:
                raise ProtocolError(f"pid {src} needs {npages} pages at 0x{vaddr:x}; the source is gone: {self.gone}")
            self.remote_pages += npages - data - zero
            log.warning("remote fault: pid %d, %d pages at 0x%x", src, npages, vaddr)
            self.channel.send(Msg.FETCH, wire.encode_range(src, vaddr, npages))
            self._wait_for(src, vaddr, npages)
        for i in range(npages if src != key else 0):
            addr = vaddr + i * PAGE_SIZE
            kind, data = self.store.get(src, addr)
            if data is not None:
                self.store.put(key, addr, data)
            else:
                self.store.put_zero(key, addr, 1)

    def _wait_for(self, key, vaddr, npages):
        deadline = time.monotonic() + self.timeout
        with self.arrived:
            while not self._complete(key, vaddr, npages):
                if self.gone is not None:
                    raise ProtocolError(f"the source is gone before it sent {npages} pages at 0x{vaddr:x} of pid {key}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(
                        "source did not send %d pages at 0x%x of pid %d in %ss" % (npages, vaddr, key, self.timeout)
                    )
                self.arrived.wait(left)

    def pages_arrived(self, key=None, extents=(), data=b""):
        """PAGES of task `key` came (extents: (vaddr, npages, zero bitmap); data: their pages)."""
        with self.arrived:
            self.arrived.notify_all()

    def source_gone(self, why):
        """The session broke: a fetch waiting for the source, or asking it
        now, fails at once; a restore that needs nothing more goes on."""
        with self.arrived:
            self.gone = why
            self.arrived.notify_all()

    def abort(self):
        pass

    def close(self):
        pass


class Session:
    """One migration from one source, from the first page to COMMIT/ABORT."""

    # What may come in each state; anything else ends the session.
    ACCEPTS = {
        "rounds": {
            Msg.PAGES,
            Msg.INVALIDATE,
            Msg.STALE,
            Msg.ROUND,
            Msg.FILE,
            Msg.RESTORE,
            Msg.ABORT,
            Msg.CONTAINER,
            Msg.CONTAINER_START,
            Msg.STREAMS,
            Msg.FAULTS,
            Msg.ROUND_START,
        },
        "restoring": {Msg.PAGES, Msg.COMMIT, Msg.ABORT},  # PAGES: answers to FETCH
    }

    def __init__(
        self, channel, base_dir, restore_timeout=120.0, keep=False, limits=None, session_id=None, registry=None
    ):
        self.channel = channel
        self.registry = registry  # streams.Registry: where this session's page streams join, if it has any
        self.streams = None  # its StreamSet, after STREAMS
        self.faults = None  # its FaultLane, after FAULTS
        self._quota_lock = threading.Lock()  # page streams store from their own threads
        self._reserved = 0  # bytes of puts under way outside the lock, counted against the quota
        self.id = session_id or secrets.token_hex(16)
        self.limits = limits or Limits()
        self.max_memory = self.limits.max_memory if self.limits.max_memory is not None else default_max_memory()
        self.state = "rounds"
        self.over_quota = None  # why pages are being dropped: reported at the next ROUND or RESTORE
        self.tasks = set()
        self.image_sizes = {}  # file name -> end of its furthest part
        self.store = PageStore()
        # swept by a later serve if this one dies, unless kept (serve --keep)
        self.dir = scratch.make("session-", base_dir)
        if keep:
            scratch.disown(self.dir)
        self.images = os.path.join(self.dir, "images")
        os.mkdir(self.images)
        self.container = None  # ContainerRestore, after CONTAINER
        self.remote: Any = RemotePages(channel, self.store)  # destination/postcopy.py PostCopyPages in post-copy
        self.restore_timeout = restore_timeout
        self.restored_pid = None
        self.result = None
        self.committed = False  # COMMIT came: the restored copy stays, whatever happens to the session
        self.source_ended = False  # ENDED came after the commit: the source knows
        self.rounds = 0
        self._restorer = None
        self.postcopy = False  # RESTORE said so: the copy runs before every page is here
        self.reconnect_s = 0.0
        self._daemon = None  # the restore's LazyPagesDaemon, while it serves
        # holds the restored tasks' uffds, and ends the copy if serve dies
        # before the commit (destination/guard.py); started now, its start-up
        # is not in the restore's time
        self.pidfile = os.path.join(self.dir, "restore.pid")
        self._root_file = root_file = os.path.join(self.dir, "restore.root")
        self._root_hook = os.path.join(self.dir, "restore-hook")
        with open(self._root_hook, "w") as f:
            f.write(ROOT_HOOK.format(root=shlex.quote(root_file)))
        os.chmod(self._root_hook, 0o700)
        self._guard = Guard(pidfile=self.pidfile, root_file=root_file)

    def run(self, first=None):
        """Serve frames (`first`, then what comes) until the source commits
        or aborts; returns 'committed' or 'aborted'."""
        inbound = Inbound(self.channel) if data_threads() else None
        pace = RoundPace(self.channel, read_ahead=inbound is not None)
        try:
            return self._run(first, pace, inbound)
        finally:
            if inbound is not None:
                inbound.close()

    def _run(self, first, pace, inbound):
        recv = inbound.recv if inbound is not None else lambda: self.channel.recv(transient=True)
        while True:
            # transient: each payload is done with before the next recv()
            t = time.perf_counter()
            kind, payload = first or recv()
            t_got = time.perf_counter()
            pace.received(t_got - t)
            first = None
            if kind not in self.ACCEPTS[self.state]:
                raise ProtocolError(f"unexpected {kind.name} from the source ({self.state})")
            if self.streams is not None and kind in (Msg.PAGES, Msg.STALE, Msg.FILE, Msg.RESTORE):
                self.streams.finish()  # the rounds are over: only this channel writes the store now
            if kind == Msg.PAGES:
                key, extents, data = wire.decode_pages(payload)
                self._store(key, extents, data)
                pace.stored(time.perf_counter() - t_got)
                self.remote.pages_arrived(key, extents, data)
            elif kind == Msg.INVALIDATE:
                if self.streams is not None and self.streams.in_round():
                    raise ProtocolError("INVALIDATE while the page streams' round is open")
                # costs what the store holds in the range, not its length (pagestore.c)
                self.store.invalidate(*wire.decode_range(payload))
            elif kind == Msg.STALE:  # (post-copy) pages written since they were sent: the source owes them
                self.store.forget(*wire.decode_stale(payload))
            elif kind == Msg.STREAMS:
                self._open_streams(Streams.decode(payload))
            elif kind == Msg.FAULTS:
                self._open_faults(Faults.decode(payload))
            elif kind == Msg.ROUND_START:
                if self.streams is None:
                    raise ProtocolError("ROUND_START without page streams")
                self.streams.start_round(wire.decode_round_number(payload))
            elif kind == Msg.ROUND:
                number = RoundStats.decode(payload).number
                if self.streams is not None:
                    pace.add_streams(self.streams.end_round(number, SESSION_IDLE_S))
                self._check_quota()
                self.rounds = number
                st = self.store.stats()
                held = st["pages_data"] + st["pages_zero"]
                self.channel.send(Msg.ROUND_ACK, wire.encode_ack(self.rounds, held, pace.ack()))
            elif kind == Msg.FILE:
                self._write_image(*wire.decode_file(payload))
            elif kind == Msg.CONTAINER:
                self._container(Container.decode(payload))
            elif kind == Msg.CONTAINER_START:
                if self.container is None or self.container.proc is not None:
                    raise ProtocolError("CONTAINER_START comes once, after CONTAINER")
                # podman's restore starts now, during pre-copy, and waits at
                # its conmon for RESTORE
                body = ContainerStart.decode(payload)
                check_criu_opts(body.criu_opts, self.limits.criu_opts)
                self.container.start(body.config, body.spec, body.criu_opts)
            elif kind == Msg.RESTORE:
                restore = Restore.decode(payload)
                self.state = "restoring"
                if restore.postcopy:
                    from .postcopy import PostCopyPages  # (it builds on RemotePages, above)

                    self.remote = PostCopyPages(self.channel, self.store)
                    self.postcopy = True
                    # its FETCHes and their pages on the fault channel
                    if self.faults is not None and self.faults.start(self._store, self.remote, self._copy_whole):
                        self.remote.faults = self.faults
                    # a broken link: the copy waits for its source as long as the source tries
                    self.reconnect_s = min(self.restore_timeout, restore.reconnect_s)
                self._restorer = threading.Thread(target=self._restore, args=(restore,), name="restore", daemon=True)
                self._restorer.start()
            elif kind == Msg.COMMIT:
                self._join_restorer()
                if not (self.result and self.result.ok):
                    raise ProtocolError("the source committed to a restore that failed")
                self.committed = True
                self._tell_guard("commit")
                self.channel.send(Msg.DONE)
                return self._await_end()
            elif kind == Msg.ABORT:
                self._join_restorer()
                if not self.committed:  # (post-copy: committed once every page was in)
                    self.kill_restored()
                self.channel.send(Msg.DONE)
                return "aborted"
            else:
                raise ProtocolError(f"unexpected {kind.name} from the source")

    def _open_streams(self, body):
        """STREAMS: the rounds' pages come over body.count connections of
        their own, which join through the registry."""
        if self.streams is not None or self.rounds or self.tasks or self.image_sizes:
            raise ProtocolError("STREAMS comes once, before any page or file")
        if self.registry is None:
            raise HybridmigError("this serve takes no page streams")
        if not 2 <= body.count <= MAX_STREAMS:
            raise HybridmigError(f"refused {body.count} page streams: this serve takes 2 to {MAX_STREAMS}")
        self.streams = StreamSet(self.id, body.count, self.channel.binding_key, self._store, self._stream_broken)
        self.registry.add(self.id, self.streams)
        self.channel.send(Msg.STREAMS, body.encode())
        log.info("session %s: pages over %d streams", self.id[:8], body.count)

    def _open_faults(self, body):
        """FAULTS: post-copy's faults go over a connection of their own,
        which joins through the registry (destination/faults.py)."""
        if self.faults is not None or self.rounds or self.tasks or self.image_sizes:
            raise ProtocolError("FAULTS comes once, before any page or file")
        if self.registry is None:
            raise HybridmigError("this serve takes no fault channel")
        if body.count != 1:
            raise HybridmigError(f"refused {body.count} fault channels: a session has one")
        self.faults = FaultLane(self.id, self.channel.binding_key)
        self.registry.add_faults(self.id, self.faults)
        self.channel.send(Msg.FAULTS, body.encode())

    def _copy_whole(self):
        """Post-copy: the copy has every page (and is held as the one)."""
        return self.committed

    def _stream_broken(self, why):
        """A page stream failed (cut, or a bad frame): the session fails
        now, and the source hears why on the control channel."""
        self.channel.send_error(why)
        try:
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _used(self):
        """Bytes held or being put (with the quota lock held)."""
        return self.store.stats()["pages_data"] * PAGE_SIZE + sum(self.image_sizes.values()) + self._reserved

    def _store(self, key, extents, data):
        """A PAGES body into the store, within the quota and the task cap.
        Over either, pages are dropped and the session fails at the next
        ROUND or RESTORE, where the source hears why (while it sends it
        does not read)."""
        # The puts run outside the lock (page streams put in parallel), so
        # each reserves its bytes first: N streams cannot each pass the check
        # against the same store size and overshoot the quota together.
        with self._quota_lock:
            if self.over_quota is None and key not in self.tasks and len(self.tasks) >= MAX_TASKS:
                self.over_quota = f"more than {MAX_TASKS} processes"
            if self.over_quota is None and self._used() + len(data) > self.max_memory:
                self.over_quota = "the page store would exceed serve's --max-memory of %d MiB" % (self.max_memory >> 20)
            if self.over_quota is not None:
                return
            self.tasks.add(key)
            self._reserved += len(data)
        try:
            store_pages(self.store, key, extents, data)
        finally:
            with self._quota_lock:
                self._reserved -= len(data)

    def _container(self, body):
        """CONTAINER, before any page: the restore is a container's; its
        image and name are checked now."""
        podman = self.limits.podman
        if podman is None:
            raise HybridmigError("this serve does not restore podman containers (start it with --podman)")
        if self.container is not None or self.tasks or self.image_sizes:
            raise ProtocolError("CONTAINER comes once, before any page or file")
        files = os.path.join(self.dir, "podman")
        os.mkdir(files)
        self.container = ContainerRestore(
            podman, body.name, self.dir, self.images, files, self._root_hook, self._root_file, dies_with_me
        )
        self.container.check(body.image)
        self.channel.send(Msg.CONTAINER, body.encode())  # checked: the source goes on

    def _write_image(self, name, offset, data):
        directory = self.images
        if self.container is not None and is_podman_file(name):  # podman's, not CRIU's
            directory, name = self.container.files, "podman/" + name  # (its key in image_sizes)
        end = max(self.image_sizes.get(name, 0), offset + len(data))
        with self._quota_lock:
            if name not in self.image_sizes and len(self.image_sizes) >= MAX_IMAGE_FILES:
                self.over_quota = self.over_quota or f"more than {MAX_IMAGE_FILES} image files"
            elif self._used() - self.image_sizes.get(name, 0) + end > self.max_memory:
                self.over_quota = self.over_quota or "the images would exceed serve's --max-memory of %d MiB" % (
                    self.max_memory >> 20
                )
            if self.over_quota is not None:
                return
            self.image_sizes[name] = end
        fd = os.open(os.path.join(directory, os.path.basename(name)), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def _check_quota(self):
        if self.over_quota is not None:
            raise HybridmigError(f"migration refused: {self.over_quota}")

    def _await_end(self):
        """Committed: the copy here is the one, whatever comes now (a source
        whose CRIU failed after the commit ends its own tasks: one decision,
        never undone). The source says ENDED once they are gone. Not
        hearing from it, the copy stays: the source may well be gone."""
        self.channel.sock.settimeout(END_WAIT_S)
        try:
            kind, _ = self.channel.recv()
        except ProtocolError as e:
            log.warning("no word from the source after its commit (%s): the restored copy stays", e)
            return "committed"
        if kind != Msg.ENDED:
            log.warning("unexpected %s from the source after its commit: the restored copy stays", kind.name)
        else:
            self.source_ended = True
        return "committed"

    def _join_restorer(self):
        if self._restorer is not None:
            self._restorer.join(self.restore_timeout + 60)

    def _restore(self, restore):
        """criu restore --lazy-pages served from the store; RESULT to the source."""
        t0 = time.monotonic()
        daemon = server = None
        try:
            self._check_quota()
            criu_opts = restore.criu_opts
            check_criu_opts(criu_opts, self.limits.criu_opts)
            if self.container is not None:
                self.container.prepare(criu_opts)
            t_prepared = time.monotonic()
            daemon = LazyPagesDaemon(self.images, self.images, source=self.remote, store=self.store, guard=self._guard)
            self._daemon = daemon
            if self.postcopy and self.remote.gone is not None:  # (broken() came before the daemon)
                raise HybridmigError(f"the source is gone before the restore: {self.remote.gone}")
            if self.postcopy:
                self.remote.loop = daemon.loop
            if self.container is not None:
                # podman's restore waits at its conmon (CONTAINER_START): it
                # goes on once the socket is bound (its CRIU, if quicker than
                # the images' reading, waits in the socket's backlog)
                daemon.bind()
                self.container.release(self.restore_timeout)
                t_criu = time.monotonic()
                daemon.prepare()
                t_listening = time.monotonic()
            else:
                daemon.listen()
                t_listening = t_criu = time.monotonic()
            served = {}

            def serve_pages():
                try:
                    served["stats"] = daemon.serve(timeout=30)
                except Exception as e:  # noqa: BLE001 -- reported by the restore below
                    served["error"] = e
                    # The copy never runs on, so it ends now (the guard ends
                    # its tasks): its CRIU may be waiting for a task stuck in
                    # a fault no one will answer, until the restore's timeout
                    self._guard.close()

            server = threading.Thread(target=serve_pages, name="lazy-pages", daemon=True)
            server.start()
            if self.container is not None:
                self.restored_pid = self.container.wait(self.restore_timeout)
            else:
                self._criu_restore(criu_opts)
            t_restored = time.monotonic()
            self._wait_installed(server)
            if server.is_alive() or "stats" not in served:
                raise HybridmigError("the restored process's pages were not all installed: %s" % served.get("error"))
            # (read by the daemon's thread: they can come after CRIU's exit)
            finished = min(daemon.restore_finished_at / 1e9, t_restored) if daemon.restore_finished_at else t_restored
            connected = min(daemon.connected_at / 1e9, finished) if daemon.connected_at else finished
            result = Result(
                ok=True,
                restored_pid=self.restored_pid,
                restore_s=t_restored - t0,
                installed_s=time.monotonic() - t0,
                remote_pages=self.remote.remote_pages,
                lazy=served["stats"],
                postcopy=self.remote.stats() if self.postcopy else {},
                # where the restore's time goes: images read and socket up; CRIU
                # until it connects to the lazy-pages socket (its tasks forked),
                # then until its restore-finished message; CRIU's exit after it
                restore_breakdown_ms={
                    "daemon_ready": (t_listening - t0) * 1000,
                    "criu_to_connected": (connected - t_criu) * 1000,
                    "connected_to_finished": (finished - connected) * 1000,
                    "finished_to_exit": (t_restored - finished) * 1000,
                },
            )
            if self.container is not None:
                # CRIU's config written; then podman's restore at its conmon, the
                # root's changes applied, released (all in daemon_ready)
                result.restore_breakdown_ms["container_prepared"] = (t_prepared - t0) * 1000
                result.restore_breakdown_ms["container_released"] = (t_criu - t_prepared) * 1000
                c = self.container  # podman's own start, and how long it then waited: out of the blackout
                result.restore_breakdown_ms["podman_to_conmon"] = (c.held_at - c.started) * 1000
                result.restore_breakdown_ms["held_at_conmon"] = (c.released_at - c.held_at) * 1000
                result.restore_breakdown_ms["rootfs_changes"] = c.applied_s * 1000
            if self.postcopy:
                # The source never resumes once the copy may have run: this
                # copy, whole now, is the one, whatever happens next.
                self.committed = True
                self._tell_guard("commit")
        except Exception as e:  # reported to the source, which then resumes its copy
            ran = daemon is not None and daemon.restore_finished_at is not None
            if self.postcopy and ran:
                lost = daemon.loop.stats()["pages_owed"]
                log.error("post-copy failed with %d pages never received: %s", lost, e)
                e = HybridmigError(f"{e}; the copy lacked {lost} pages, and was ended")
            log.error("restore failed: %s", e)
            self.kill_restored()
            result = Result(ok=False, error=str(e), ran=ran)
        try:
            self.channel.send(Msg.RESULT, result.encode())
        except ProtocolError as e:
            # the source never learns of the success: it resumes its copy
            # (after a post-copy it stays frozen: this copy is the one)
            log.error("could not report the restore result: %s", e)
            if not self.committed:
                self.kill_restored()
                result = Result(ok=False, error=str(e))
        self.result = result
        if daemon is not None:
            # Freed only once its thread is out of the fault loop: after a
            # failure it still serves the copy just killed, or waits for a
            # CRIU that never connected (30 s at most).
            if server is not None:
                server.join(40)
            if server is not None and server.is_alive():
                log.error("the lazy-pages daemon did not stop: left as it is, not freed under its thread")
            else:
                if self.postcopy:
                    self.remote.detach_loop()  # pages still on their way must not wake a freed loop
                daemon.close()

    def _wait_installed(self, server):
        """Until the daemon has installed every page: pre-copy within the
        restore timeout; post-copy as long as pages keep coming (the source
        pushes them all), failing once none came for the restore timeout."""
        if not self.postcopy:
            server.join(self.restore_timeout)
            return
        while server.is_alive() and self.remote.idle_s() < self.restore_timeout:
            server.join(0.5)
        if server.is_alive():
            self.broken(f"no page came from the source for {self.restore_timeout}s")
            server.join(10)

    def resumable(self, error):
        """Whether a post-copy whose session broke may wait for its source
        to reconnect: the copy still lacks pages, and the source did not
        close or say why (it died, or gave up), it went silent (the link)."""
        return (
            self.postcopy
            and not self.committed
            and self._restorer is not None
            and self._restorer.is_alive()
            and isinstance(error, ProtocolError)
            and not isinstance(error, (PeerClosed, PeerError))
        )

    def reattach(self, channel):
        """The source came back on `channel` (RESUME)."""
        self.channel = channel
        self.remote.reattach(channel)

    def broken(self, why):
        """The session broke (or the source is silent). A post-copy daemon,
        owed pages that will not come, fails at once. A pre-copy restore
        holds every page but those a fault may still fetch: only such a
        fetch fails; the restore runs its course and its copy, never
        committed, is ended after it. (Failing the daemon while CRIU
        restores makes CRIU kill the tree itself: released 4.2.1 then
        waited for ever on a multi-threaded pid-namespace init, fixed by
        scripts/criu-patches/0004; docs/design.md, "Failure".) A daemon
        that fails ends the copy at once through the guard (_restore)."""
        self.remote.source_gone(why)
        if self.postcopy and self._daemon is not None:
            self._daemon.fail(HybridmigError(f"the source is gone: {why}"))

    def _criu_restore(self, criu_opts):
        """criu restore --lazy-pages of the images, detached; the restored
        root's pid in self.restored_pid."""
        cmd = dies_with_me(
            [
                criu_binary(),
                "restore",
                "-D",
                self.images,
                "-W",
                self.images,
                "--lazy-pages",
                "-d",
                "--pidfile",
                self.pidfile,
                "--action-script",
                self._root_hook,
                "-o",
                "restore.log",
                CRIU_LOG_LEVEL,
                *criu_opts,
            ]
        )
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.restore_timeout
        )
        if os.path.exists(self.pidfile):
            self.restored_pid = int(open(self.pidfile).read().strip() or 0) or None
        if proc.returncode != 0:
            self.kill_restored()
            raise CriuError(
                "criu restore failed (exit %d): %s"
                % (proc.returncode, log_tail(os.path.join(self.images, "restore.log")))
            )

    def kill_restored(self):
        """End a restored copy the source did not commit to: its whole tree
        (only the init of a pid namespace takes its tree down with it)."""
        if self.container is not None:  # podman's record of it too, whether or not it runs
            self.container.remove(self.restored_pid)
        if not self.restored_pid:
            return
        try:
            end_tree(psutil.Process(self.restored_pid))
        except psutil.NoSuchProcess:
            pass
        self.restored_pid = None
        self._tell_guard("release")

    def _tell_guard(self, word):
        """ "commit" or "release": the guard's work is over, either way."""
        if not self._guard.finish(word):  # serve alone ends copies now
            log.warning("the restored copy's guard is gone")

    def cleanup(self, keep=False):
        """At the session's end: the copy was committed, or ended."""
        if self.streams is not None or self.faults is not None:
            self.registry.remove(self.id)
        if self.streams is not None:
            self.streams.close()
        if self.faults is not None:
            self.faults.close()
        if self.container is not None and not keep:
            self.container.cleanup()
        self._tell_guard("release")
        self._guard.wait(10)
        if keep:
            scratch.disown(self.dir)
        else:
            try:
                scratch.remove(self.dir)  # (a killed CRIU's mounts in its work dir)
            except OSError as e:
                log.error("%s", e)


def answer_outcome(channel, outcomes, payload):
    """OUTCOME: what became of the copy of the session the source names."""
    session_id = OutcomeQuery.decode(payload).session
    outcome = outcomes.get(session_id)
    log.warning("%s asks what became of session %s: %s", channel.peer, session_id, outcome)
    channel.send(Msg.OUTCOME, Outcome(session_id, outcome).encode())
    return session_id


def linger(acceptor, outcomes, session_id):
    """Answer OUTCOME queries (only) until the one about `session_id`, or
    for ONCE_LINGER_S: a --once serve that exits at once leaves a source
    whose DONE was lost unable to learn that its copy was kept."""
    log.warning(
        "the source did not say it has ended: waiting up to %ds for it to ask what became of its copy", ONCE_LINGER_S
    )
    deadline = time.monotonic() + ONCE_LINGER_S
    while (left := deadline - time.monotonic()) > 0:
        channel = acceptor.next_channel(timeout=left)
        if channel is None:
            break
        try:
            channel.sock.settimeout(10)
            channel.send(Msg.HOST, Host(wire.boot_id(), os.uname().release, secrets.token_hex(16), []).encode())
            kind, payload = channel.recv()
            if kind != Msg.OUTCOME:
                channel.send_error("this serve --once has served its migration")
                continue
            asked = answer_outcome(channel, outcomes, payload)
        except ProtocolError as e:
            log.warning("%s: %s", channel.peer, e)
            continue
        finally:
            channel.close()
        if asked == session_id:
            return


def serve(listen, base_dir, key, once=False, ready=None, tls=None, keep=False, mode=wire.SEALED, limits=None):
    """Serve sources one at a time (their handshakes at once: accept.py); with `once`, return after the
    first session's outcome. `keep`: leave every session's directory (images, CRIU's restore.log) in
    base_dir. `mode`: wire.PLAINTEXT only with --insecure-plaintext. `limits`: what a session may take
    (Limits)."""
    limits = limits or Limits()
    outcomes = Outcomes()
    host, port = wire.parse_addr(listen)
    base_dir = os.path.abspath(base_dir)  # CRIU resolves the paths we pass it from its own working directory
    if not os.path.isdir(base_dir) or not os.access(base_dir, os.W_OK):
        raise HybridmigError(f"--dir {base_dir} is not a writable directory")
    criu_binary()  # a CRIU that cannot restore is reported now, not to a source
    if limits.podman is not None:  # so is a podman that cannot run with serve's options
        log.info("restoring containers into podman %s %s", limits.podman.version(), " ".join(limits.podman.opts))
        limits.podman.runtime()  # asked now, not in a restore's blackout
        limits.podman.conmon()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        lsock.bind((host, port))
    except OSError as e:
        raise HybridmigError(f"cannot listen on {listen}: {e.strerror}") from e
    lsock.listen(128)
    images.load_reader()  # now, not in a session's blackout (its restore reads the images)
    registry = Registry()
    acceptor = Acceptor(lsock, key, tls=tls, mode=mode, streams=registry)
    log.info("listening on %s", listen)
    if ready is not None:
        ready()
    outcome = None
    try:
        while True:
            channel = acceptor.next_channel()
            channel.sock.settimeout(SESSION_IDLE_S)
            session_id = secrets.token_hex(16)
            try:
                host_msg = Host(
                    wire.boot_id(),
                    os.uname().release,
                    session_id,
                    sorted(limits.criu_opts),
                    ["podman"] if limits.podman is not None else [],
                )
                channel.send(Msg.HOST, host_msg.encode())
                first = channel.recv()
                if first[0] == Msg.OUTCOME:  # a source asking about an earlier session, not a migration
                    answer_outcome(channel, outcomes, first[1])
                    channel.close()
                    continue
            except ProtocolError as e:
                log.warning("%s: %s", channel.peer, e)
                channel.close()
                if once and not isinstance(e, PeerClosed):
                    # the source came and broke in its first frame (the link
                    # cut); one that closed at once (a run refusing itself
                    # on HOST's allowlist) migrated nothing: serve waits on
                    return "broken"
                continue
            session = Session(channel, base_dir, keep=keep, limits=limits, session_id=session_id, registry=registry)
            outcomes.set(session_id, "pending")
            try:
                outcome = session.run(first)
                log.info("session from %s %s", channel.peer, outcome)
            except Exception as e:  # noqa: BLE001 -- any failure ends this session, not the server
                # The source is gone, or broke the protocol (it is told
                # why). A restore it did not commit to is ended (once it has
                # run its course): without COMMIT answered the source
                # resumes its own copy. (After COMMIT the session ends in
                # _await_end, which keeps the copy.)
                log.error("session from %s broke: %s", channel.peer, e)
                channel.sock.settimeout(5)  # a source that reads nothing does not hold serve
                channel.send_error(str(e))
                outcome = None
                if session.resumable(e):  # post-copy: the copy waits for its source to come back
                    from .postcopy import recover

                    outcome = recover(session, acceptor, outcomes, limits)
                if outcome is None:
                    session.broken(str(e))
                    session._join_restorer()
                    if not session.committed:
                        session.kill_restored()
                    outcome = "broken"
            finally:
                channel.close()
                session.channel.close()  # (a channel the source came back on)
                # a committed copy stays unless the source said ABORT since
                outcomes.set(session_id, "kept" if session.committed and session.restored_pid else "ended")
                session.cleanup(
                    keep=keep or (outcome != "committed" and logging.getLogger().isEnabledFor(logging.DEBUG))
                )
            if once:
                if session.committed and not session.source_ended:
                    linger(acceptor, outcomes, session_id)
                return outcome
    finally:
        acceptor.close()
        lsock.close()
