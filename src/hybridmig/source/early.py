"""`--switchover auto`: a switch-over during round 0, where the rounds
cannot converge.

Round 0 sends the memory once. A page written after it was read is stale
and goes again (pushed after the switch-over), so once the tree writes a
fair share of the link's pace, every page round 0 still sends raises what
the migration carries twice, and the rounds after it would not shrink
(docs/results.md, issue 17: 1.35 x the memory on the wire after a whole
round 0 at 1 GiB and 20000 pages/s over 1 Gbit/s, 1.6 x with auto's round
1). So round 0 is sent in pieces of about PIECE_S each, and after each the
pages it already sent are looked at without protecting them again
(TreeTracker.peek: round 0 refreshes each page before reading it, so a
written one there is stale). Round 0 stops, and post-copy takes over, once
both hold:

- the stale pages reach STALE_SHARE of the memory (the bytes on the wire
  stay near 1 + STALE_SHARE times the memory, whatever the rate);
- the tree's write rate against round 0's pace, x = w / b, is at least
  MIN_X: w from the stale pages and how long each sent page has been
  exposed (uniform writes: stale ~= w / N * sum of pages x age), b the
  pages round 0 sent per second. Below it a round after round 0 halves
  what is owed (its scattered pages travel at about half of round 0's
  pace), so pre-copy converges and auto stays pre-copy: at 500 pages/s
  over 1 Gbit/s x is ~0.02 and round 0 ends whole.

Once x reaches MIN_X, round 0 is no longer paced to keep the tree's CPU
share (source/pacing.py): post-copy follows whatever round 0 does, and
the tree runs slowly until the push is done, so the sooner round 0 and the
push end, the sooner it has its pace back; paced, round 0 takes longer and
more of what it sent goes stale.

Only with exact tracking (uffd-wp): the soft-dirty tracker cannot look
without clearing."""

import time

from ..bindings import PAGE_SIZE

PIECE_S = 0.25  # round 0's pieces: about this long at its pace so far
FIRST_PIECE_PAGES = 1024  # 4 MiB, before a pace is known
MIN_PIECE_PAGES = 256
STALE_SHARE = 0.04
MIN_X = 0.25
MIN_STALE_PAGES = 256  # fewer tell too little of the rate


def _pages(ranges):
    return sum((e - s) // PAGE_SIZE for s, e in ranges)


def _split(ranges, pages):
    """(the first `pages` pages of sorted ranges, the rest)."""
    budget = pages * PAGE_SIZE
    head, tail = [], []
    for start, end in ranges:
        if budget <= 0:
            tail.append((start, end))
            continue
        cut = min(end, start + budget)
        head.append((start, cut))
        if cut < end:
            tail.append((cut, end))
        budget -= cut - start
    return head, tail


class EarlySwitch:
    """Cuts round 0 into pieces and decides after each whether to stop.
    `peek(pid, ranges)` counts the written pages of ranges of pid without
    protecting them (None: cannot tell); `total` is the tree's pages."""

    def __init__(self, peek, total, on_diverging=lambda: None):
        self.peek = peek
        self.total = total
        self.on_diverging = on_diverging  # called once x first reaches MIN_X
        self.diverging = False
        self.t0 = time.monotonic()
        self.sent = {}  # pid -> ranges round 0 sent
        self.pages = 0  # pages sent
        self.exposure = 0.0  # sum over sent pages of the time they were sent (s since t0)
        self.stale = 0  # pages found written since they were sent, at the last look
        self.x = 0.0  # the write rate against round 0's pace, at the last look
        self.stopped = False  # round 0 stopped here: post-copy follows
        self.piece = FIRST_PIECE_PAGES  # pages of the last piece

    def pieces(self, pid, ranges):
        """Ranges of pid in pieces to send one after the other; ends early
        (self.stopped) once round 0 should stop."""
        while ranges and not self.stopped:
            piece, ranges = _split(ranges, self._piece_pages())
            t = time.monotonic()
            yield piece
            n = _pages(piece)
            self.sent.setdefault(pid, []).extend(piece)
            self.pages += n
            self.exposure += n * ((t + time.monotonic()) / 2 - self.t0)
            self.stopped = self._decide()

    def _piece_pages(self):
        elapsed = time.monotonic() - self.t0
        if not self.pages or elapsed <= 0:
            self.piece = FIRST_PIECE_PAGES
        else:  # (at most twice the last: the socket's buffers take the first pieces at once)
            self.piece = min(2 * self.piece, max(MIN_PIECE_PAGES, int(self.pages / elapsed * PIECE_S)))
        return self.piece

    def _decide(self):
        stale = 0
        for pid, ranges in self.sent.items():
            n = self.peek(pid, ranges)
            if n is None:
                return False
            stale += n
        self.stale = stale
        elapsed = time.monotonic() - self.t0
        age = self.pages * elapsed - self.exposure  # page-seconds the sent pages were exposed
        if stale < MIN_STALE_PAGES or age <= 0 or elapsed <= 0:
            return False
        w = stale * self.total / age
        self.x = w / (self.pages / elapsed)
        if self.x >= MIN_X and not self.diverging:
            self.diverging = True
            self.on_diverging()
        return self.x >= MIN_X and stale >= STALE_SHARE * self.total
