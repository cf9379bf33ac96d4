"""Where the destination's time goes in each pre-copy round: in the socket,
opening frames, storing pages. Told to the source in ROUND_ACK
(messages.Stored), which reports it with the round (`run --json`)."""

import time

from ..messages import Stored


class RoundPace:
    """Counts one round's frames and times; `ack()` ends the round."""

    def __init__(self, channel, read_ahead=False):
        self.channel = channel
        self.read_ahead = read_ahead  # frames opened by the inbound thread: not in recv_s
        self._streams_open0 = self._streams_open = 0.0  # the page streams' open_s: cumulative, and this round's
        self._reset()

    def _reset(self):
        self.stats = Stored()
        self._open0 = self.channel.open_s
        self._cpu0 = time.process_time()

    def received(self, seconds):
        """The session waited this long for a frame (and opened it, unless
        the inbound thread does)."""
        self.stats.recv_s += seconds

    def stored(self, seconds):
        self.stats.frames += 1
        self.stats.store_s += seconds

    def add_streams(self, streams):
        """The page streams' part of the round (StreamSet.end_round),
        summed over the streams, which overlap."""
        self.stats.frames += streams["frames"]
        self.stats.recv_s += streams["recv_s"]
        self.stats.store_s += streams["store_s"]
        self._streams_open = streams["open_s"] - self._streams_open0
        self._streams_open0 = streams["open_s"]

    def ack(self):
        """The round's stats as ROUND_ACK carries them; the next round starts."""
        st = self.stats
        st.open_s = self.channel.open_s - self._open0
        if not self.read_ahead:
            st.recv_s = max(0.0, st.recv_s - st.open_s)
        st.open_s += self._streams_open  # (opened in the streams' recv: part of their recv_s)
        self._streams_open = 0.0
        st.cpu_s = time.process_time() - self._cpu0
        self._reset()
        return st.encode()
