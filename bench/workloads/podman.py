"""memwork in a podman container, for the container strategies
(podman-stop-copy, hybridmig-container): two podman storages on the
machine, the source's and the destination's (hybridmig.testing.podman),
made by start() and removed by stop()."""

from __future__ import annotations

from hybridmig.testing.podman import PodmanPair

from .memwork import Memwork

NAME = "hm-bench"


class PodmanMemwork(Memwork):
    """Memwork's memory and checks, in container NAME of the source podman."""

    kind = "podman-memwork"
    container = True  # only the container strategies migrate it

    def __init__(self, size_mb: int, rate: float = 500, hot: float = 100, threads: int = 1):
        super().__init__(size_mb, rate=rate, hot=hot, threads=threads)
        self.pair: PodmanPair | None = None
        self.name = NAME

    @property
    def label(self) -> str:
        return "podman-" + super().label

    def start(self, hosts) -> None:
        self.pair = PodmanPair()
        self._wl = self.pair.src.start(
            self.name, self.pair.report_dir, size_mb=self.size_mb, rate=self.rate, threads=self.threads
        )
        self.host_pid = self._wl.host_pid

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.pair is not None:
                self.pair.close()  # every container, image, mount and cgroup of both storages
            self.pair = None
