"""A session's frames read ahead: a thread receives (and opens) the next
frame while the session stores the one before, both outside the GIL
(recv_into, AES-GCM, the store's puts). Two payload buffers, used in turn:
a payload stays valid until the next recv(), and memory stays bounded."""

import queue
import threading

from ..wire import Msg

SLOTS = 2
# The reader stops after these: what follows them is read by the session
# itself (ENDED after COMMIT), or nothing.
LAST = (Msg.COMMIT, Msg.ABORT)


class Inbound:
    def __init__(self, channel):
        self.channel = channel
        self._full: queue.Queue[tuple] = queue.Queue()
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(SLOTS):
            self._free.put(slot)
        self._held = None  # the slot of the payload last handed out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="inbound", daemon=True)
        self._thread.start()

    def _read(self):
        try:
            while True:
                slot = self._free.get()
                if self._stop.is_set():
                    return
                kind, payload = self.channel.recv(transient=True, slot=slot)
                self._full.put((slot, kind, payload))
                if kind in LAST:
                    return
        except BaseException as e:  # noqa: BLE001 -- raised in the session's thread
            if not self._stop.is_set():
                self._full.put((None, e, None))

    def recv(self):
        """(kind, payload) of the next frame, as Channel.recv(transient=True)."""
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
        slot, kind, payload = self._full.get()
        if slot is None:
            raise kind
        self._held = slot
        return kind, payload

    def close(self):
        """No more frames wanted. A reader blocked in recv() stays until the
        channel closes (the session's end closes it)."""
        self._stop.set()
        self._free.put(0)  # wakes a reader waiting for a slot
