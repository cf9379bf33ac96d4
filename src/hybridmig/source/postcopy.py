"""Post-copy on the source: switch over before the destination has every
page, and serve the rest from the frozen tree.

At post-dump (the tree frozen by CRIU, the images written) the source
sends no page: it tells the destination which of the pages it holds are
stale (STALE: written since they were sent), answers CRIU's hook "keep the
tree frozen" (hook.IN_DOUBT: from now on nothing but an explicit decision
resumes or ends it, whatever happens to `run`), sends the images and
RESTORE. The destination restores at once and its copy runs, pulling the
pages it lacks (FETCH) while this side pushes every owed page in address
order, a fault's pages ahead of the push. When the destination has
installed every page it reports RESULT; COMMIT and DONE follow as in
pre-copy, and only then is the frozen tree ended (settled through CRIU's
page server). Why the source never resumes once the copy may have run,
and what each failure leaves: docs/design.md, "Post-copy"."""

import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import time
from collections import deque

from .. import wire
from ..bindings import PAGE_SIZE
from ..errors import HybridmigError, ProcessGone, ProtocolError
from ..messages import Result
from ..wire import Msg
from .tracker import merge

log = logging.getLogger("hybridmig.source.postcopy")
PUSH_PAGES = 64  # pages per pushed frame (256 KiB): what a fault's pages may wait behind
# Unsent bytes the socket may hold (TCP_NOTSENT_LOWAT): a fault's pages go
# out behind at most this much of the push and one pushed frame.
NOT_SENT_LOWAT = 128 << 10
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# What the socket buffers of both ends may hold (the pushes a broken link
# may have lost on their way): pushed again after a reconnection.
RESEND_BYTES = 32 << 20
HELD_CHECK_S = 0.1  # how often the serving loop looks that nothing of the frozen tree runs
# The push waits for the copy's first FETCH, this long at most: the
# destination's restore, then the first fault after the resume (which
# lengthens the workload's pause across the switch-over), have the link and
# the destination's CPU to themselves.
PUSH_AFTER_S = 1.0
# Locality: after a fault the push goes on from it (the copy's next faults
# are near its last ones) for this many owed pages, ahead of its cursor;
# the last NEAR_REGIONS faulted places take turns.
NEAR_PAGES = 256
NEAR_REGIONS = 8
NEAR_SPAN = 2 << 20  # a fault this close to a place being pushed renews it
# The push yields while a fault's pages are on their way (the fault
# channel's socket holds bytes not yet acknowledged): it looks again this
# often meanwhile. (Remote faults at 1 Gbit/s: p50 2.9 ms without, 0.4-0.6
# ms with: the link's queue holds no push in front of them.) Only while
# those bytes are being acknowledged: with none acknowledged for
# YIELD_MAX_S the link is in trouble and the push goes on (its unacknowledged
# bytes are what make a cut link break the session, and the recovery start).
YIELD_POLL_S = 0.0005
YIELD_MAX_S = 0.05


class SourceLost(HybridmigError):
    """The frozen tree is gone during post-copy, or runs again: pages the
    destination lacks are lost."""


def held_part(ranges, held):
    """The parts of `ranges` inside `held`, both sorted, disjoint lists of
    byte [start, end) pairs: one sweep (the switch-over's frozen time)."""
    out, j = [], 0
    for start, end in ranges:
        while j < len(held) and held[j][1] <= start:
            j += 1
        k = j
        while k < len(held) and held[k][0] < end:
            out.append((max(start, held[k][0]), min(end, held[k][1])))
            k += 1
    return out


def send_stale(channel, key, ranges):
    """STALE frames for `ranges` of store task `key`."""
    for i in range(0, len(ranges), wire.MAX_STALE_RANGES):
        channel.send(Msg.STALE, wire.encode_stale(key, ranges[i : i + wire.MAX_STALE_RANGES]))


class PostCopy:
    """Serves one destination's post-copy until its RESULT: FETCHed ranges
    at once, else the next PUSH_PAGES of the owed pages, task after task in
    address order. `owed`: host pid -> Ranges the destination lacks.
    `source_held()`: False once something of the frozen tree runs again.

    The push walks each task's owed Ranges with a cursor and leaves them
    whole: removing runs from the front of a native array of 55 000 moved
    the whole array each time (5 ms of memmove per pushed frame at 1 GiB).
    A FETCH removes what it sent from the part the push has yet to reach,
    and sends of its window the faulted page and what is still owed."""

    def __init__(self, channel, sender, owed, rnd, source_held=lambda: True, faults=None):
        self.channel, self.sender, self.owed, self.rnd = channel, sender, owed, rnd
        # the fault channel: FETCHes come and are answered on it, never
        # behind the push; lost, they come on the control channel
        self.faults_channel = faults
        self.on_fault_channel = 0  # FETCHes answered on it
        self.fault_channel_error = None
        self.near: deque = deque()  # [pid, next address, pages left]: the locality push's places
        self.pages_near = 0
        self._outq = 0  # the fault channel's unacknowledged bytes at the last look
        self._acked_at = 0.0  # monotonic: when they last went down (or were none)
        self.source_held = source_held
        self.host_of = {key: pid for pid, key in sender.keys.items()}
        self.faults: deque = deque()  # (monotonic when asked, host pid, start, end, channel)
        self.fetches = 0
        self.pages_fetched = 0
        self.pages_pushed = 0
        self.serve_s = []  # per FETCH: asked -> its pages in the socket
        self.started = self.pushed_all = None  # monotonic
        self._recent: deque = deque()  # the last pushes (pid, start, end, near), for a reconnection
        self.resent_pages = 0
        self.cursor = dict.fromkeys(owed, 0)  # host pid -> where its push goes on
        self.push_from = None  # monotonic: when the push may start (PUSH_AFTER_S)
        self.owed_at_start = self.pages_owed()

    def reattach(self, channel):
        """Serving goes on over `channel`. What the broken one carried last
        may not have arrived: the last RESEND_BYTES of the push are owed
        again, and the destination asks again for what its faults wait for."""
        self.channel = channel
        self.faults.clear()
        self.near.clear()
        resend = 0
        while self._recent and resend < RESEND_BYTES:  # (in address order: the push goes back to the first)
            pid, start, end, near = self._recent.pop()
            if near:  # taken out of the owed set ahead of the cursor: owed again
                self.owed[pid].add(start, end)
            self.cursor[pid] = min(self.cursor[pid], start)
            resend += end - start
        self.resent_pages += resend // PAGE_SIZE
        self.pushed_all = None

    def pages_owed(self):
        """Owed pages the push has not reached and no FETCH took."""
        left = 0
        for pid, owed in self.owed.items():
            at = self.cursor[pid]
            if not at:
                left += owed.total()
                continue
            while nxt := owed.next(at):
                left += nxt[1] - nxt[0]
                at = nxt[1]
        return left // PAGE_SIZE

    def _wait(self, timeout, push):
        """(channels with a frame to read, whether the push may send): the
        push only once its socket holds less than NOT_SENT_LOWAT unsent,
        so that this thread is never stuck in a send while a fault waits."""
        channels = [ch for ch in (self.channel, self.faults_channel) if ch is not None]
        pending = [ch for ch in channels if isinstance(ch.sock, ssl.SSLSocket) and ch.sock.pending()]
        if pending:
            return pending, False
        r, w, _ = select.select([ch.sock for ch in channels], [self.channel.sock] if push else [], [], timeout)
        return [ch for ch in channels if ch.sock in r], bool(w)

    def _fault_in_flight(self):
        """Whether the fault channel's socket holds bytes the destination
        has not acknowledged yet (a fault's pages on their way), and is
        being acknowledged (YIELD_MAX_S)."""
        if self.faults_channel is None:
            return False
        try:
            out = struct.unpack("i", fcntl.ioctl(self.faults_channel.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return False
        now = time.monotonic()
        if out == 0 or out < self._outq:
            self._acked_at = now
        self._outq = out
        return out > 0 and now - self._acked_at < YIELD_MAX_S

    def _recv(self, channel):
        """One frame from `channel` (_take); the fault channel failing
        only ends it (the destination asks again on the control channel)."""
        if channel is not self.faults_channel:
            kind, payload = channel.recv()
            return self._take(kind, payload, channel)
        try:
            kind, payload = channel.recv()
            if kind != Msg.FETCH:
                raise ProtocolError(f"unexpected {kind.name} on the fault channel")
        except ProtocolError as e:
            self._drop_fault_channel(e)
            return None
        return self._take(kind, payload, channel)

    def _drop_fault_channel(self, error):
        log.warning("the fault channel broke (%s): faults go on the control channel", error)
        self.fault_channel_error = str(error)
        self.faults_channel.close()
        self.faults_channel = None
        self.faults = deque(f for f in self.faults if f[4] is self.channel)

    def _take(self, kind, payload, channel):
        """One frame from the destination; a Result ends the serving."""
        if kind == Msg.RESULT and channel is self.channel:
            return Result.decode(payload)
        if kind != Msg.FETCH:
            raise ProtocolError(f"unexpected {kind.name} while the destination runs the copy (post-copy)")
        key, vaddr, npages = wire.decode_range(payload)
        if key not in self.host_of or not 0 < npages <= wire.MAX_FRAME_PAGES or vaddr % PAGE_SIZE:
            raise ProtocolError(
                "%s asked for %d pages at 0x%x of pid %d, not one of the tree's, or not a valid range"
                % (self.channel.peer, npages, vaddr, key)
            )
        self.faults.append((time.monotonic(), self.host_of[key], vaddr, vaddr + npages * PAGE_SIZE, channel))
        return None

    def _send(self, pid, ranges, channel=None):
        """The pages of `ranges` of pid, read from the frozen tree; how many
        went (a FETCH's window may reach past its VMA: those are not sent).
        Every process of it must still be there: a page of any that is gone
        is lost (Sender.send_ranges would skip it)."""
        before = self.rnd.pages_sent
        try:
            if channel is None or channel is self.channel:
                self.sender._send_ranges(pid, ranges, self.rnd)
            else:
                self.sender.send_on(channel, pid, ranges, self.rnd)
        except ProcessGone as e:
            raise SourceLost(
                "process %d of the frozen source is gone (%s): %d pages the destination lacks are lost"
                % (pid, e, self.pages_owed())
            ) from e
        return self.rnd.pages_sent - before

    def _fetched(self, pid, start, end):
        """A FETCH's pages went out: the push need not send them again."""
        owed, at = self.owed.get(pid), self.cursor.get(pid, 0)
        if owed is not None and end > at:
            owed.remove(max(start, at), end)

    def _gather(self, owed, at, room):
        """Up to `room` bytes of owed pages from `at` on, as ranges."""
        ranges = []
        while room > 0 and (nxt := owed.next(at)):
            end = min(nxt[1], nxt[0] + room)
            ranges.append((nxt[0], end))
            room -= end - nxt[0]
            at = end
        return ranges

    def _note_fault(self, pid, end):
        """A fault's pages went out: the push goes on from there (renewing
        the place it pushes near there, if any)."""
        for place in self.near:
            if place[0] == pid and abs(place[1] - end) < NEAR_SPAN:
                place[1], place[2] = max(place[1], end), NEAR_PAGES
                return
        if len(self.near) >= NEAR_REGIONS:
            self.near.popleft()
        self.near.append([pid, end, NEAR_PAGES])

    def _next_push(self):
        """(pid, ranges, near place or None): the next PUSH_PAGES owed
        pages of one task, across as many runs as it takes: near a recent
        fault first (ahead of the cursor), else in address order. After
        round 0 the owed set is what was written since, in short runs: a
        frame per run made tens of thousands of tiny frames (1 GiB at 20000
        pages/s over 1 Gbit/s pushed at 3.3 MB/s)."""
        while self.near:
            place = self.near[0]
            pid, at, left = place
            ranges = self._gather(self.owed[pid], max(at, self.cursor[pid]), min(left, PUSH_PAGES) * PAGE_SIZE)
            if ranges:
                return pid, ranges, place
            self.near.popleft()
        for pid, owed in self.owed.items():
            ranges = self._gather(owed, self.cursor[pid], PUSH_PAGES * PAGE_SIZE)
            if ranges:
                return pid, ranges, None
        return None

    def _pushed(self, pid, ranges, place):
        """Bookkeeping of a push that went out."""
        if place is None:
            self.cursor[pid] = ranges[-1][1]
        else:  # ahead of the cursor: out of the owed set; the places take turns
            for start, end in ranges:
                self.owed[pid].remove(start, end)
            pages = sum(end - start for start, end in ranges) // PAGE_SIZE
            self.pages_near += pages
            place[1], place[2] = ranges[-1][1], place[2] - pages
            if self.near and self.near[0] is place:
                self.near.popleft()
                if place[2] > 0:
                    self.near.append(place)
        self._recent.extend((pid, start, end, place is not None) for start, end in ranges)
        while len(self._recent) > RESEND_BYTES // PAGE_SIZE:  # at most that many pages, one run each
            self._recent.popleft()

    def serve(self):
        """Until the destination's RESULT (returned). Raises ProtocolError
        when the session breaks, SourceLost when the tree does."""
        sock = self.channel.sock
        try:  # a fault's pages wait behind less of the push
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOT_SENT_LOWAT)
        except OSError as e:
            log.info("no TCP_NOTSENT_LOWAT (%s): faults may wait behind more of the push", e)
        self.started = self.started or time.monotonic()
        if self.push_from is None:
            self.push_from = self.started + PUSH_AFTER_S
        checked = 0.0
        while True:
            pushing = time.monotonic() >= self.push_from
            push = None if self.faults or not pushing else self._next_push()
            if push is None and pushing and not self.faults and self.pushed_all is None:
                self.pushed_all = time.monotonic()
                log.info("post-copy: every owed page pushed in %.2f s", self.pushed_all - self.started)
            # with nothing to send, wait for the destination (its silence is
            # bounded by the socket's timeout, run's --timeout, in recv)
            yielding = push is not None and not self.faults and self._fault_in_flight()
            timeout = 0 if self.faults else YIELD_POLL_S if yielding else HELD_CHECK_S
            ready, writable = self._wait(timeout, push is not None and not yielding)
            for channel in ready:
                result = self._recv(channel)
                if result is not None:
                    return result
            now = time.monotonic()
            if self.faults:  # the copy runs: the push may start (after this fault)
                self.push_from = min(self.push_from, now)
            if now - checked >= HELD_CHECK_S:
                checked = now
                if not self.source_held():
                    raise SourceLost(
                        "the frozen source runs again during post-copy (its criu dump gone, and something "
                        "continued it): %d pages the destination lacks can no longer be sent as they were"
                        % self.pages_owed()
                    )
            if self.faults:
                self._serve_fault(*self.faults.popleft())
            elif push is not None and writable:
                pid, ranges, place = push
                self.pages_pushed += self._send(pid, ranges)
                self._pushed(pid, ranges, place)

    def _still_owed(self, pid, start, end):
        """What of a FETCH's window [start, end) to send: the faulted page
        (its first) always, the rest only where neither the push nor a FETCH
        sent it yet. A window reaches past the fault into pages the
        destination has (round 0's, installed since) or that the push has on
        their way: sent again, they were 6-14 % of the memory at 1 GiB,
        20000 pages/s over 1 Gbit/s, and the push stopped for them
        (docs/results.md, "FETCH windows trimmed to what is owed")."""
        first = min(end, start + PAGE_SIZE)
        ranges = [(start, first)]
        owed = self.owed.get(pid)
        if owed is None:
            return ranges
        at = max(first, self.cursor.get(pid, 0))
        while at < end and (nxt := owed.next(at)) and nxt[0] < end:
            ranges.append((nxt[0], min(nxt[1], end)))
            at = nxt[1]
        return merge(ranges)

    def _serve_fault(self, asked, pid, start, end, channel):
        if channel is not self.channel and channel is not self.faults_channel:
            return  # asked on a fault channel since lost: asked again on the control channel
        try:
            self.pages_fetched += self._send(pid, self._still_owed(pid, start, end), channel)
        except ProtocolError as e:
            if channel is self.channel:
                raise
            self._drop_fault_channel(e)
            return
        self._fetched(pid, start, end)
        self._note_fault(pid, end)
        self.fetches += 1
        self.on_fault_channel += channel is not self.channel
        self.serve_s.append(time.monotonic() - asked)

    def stats(self):
        return {
            "fetches": self.fetches,
            "pages_fetched": self.pages_fetched,
            "pages_pushed": self.pages_pushed,
            "push_s": (self.pushed_all - self.started) if self.pushed_all and self.started else None,
            "pages_resent": self.resent_pages,
            # owed at the switch-over: pushed and fetched stay under it but
            # for a FETCH's faulted page (maybe pushed already, on its way)
            "pages_owed": self.owed_at_start,
            "pages_pushed_near_faults": self.pages_near,
            # FETCHes answered on the fault channel, and why it broke if it did
            "fetches_served_on_fault_channel": self.on_fault_channel,
            "fault_channel_error": self.fault_channel_error,
            # FETCH received -> its pages in the socket (the destination times the whole way)
            "fetch_served_max_ms": max(self.serve_s, default=0.0) * 1000,
        }
