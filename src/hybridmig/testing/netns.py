"""Two local "hosts": network namespaces joined by a veth pair, for the demo,
the tests and the bench. Addresses come from 198.18.0.0/15, the range set
aside for benchmarking; everything created here is removed on exit."""

import json
import os
import subprocess
import uuid

from ..errors import SetupError


def _ip(*args, check=True):
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SetupError("ip {}: {}".format(" ".join(args), proc.stderr.strip()))
    return proc


class TwoHosts:
    """`with TwoHosts() as h:` gives h.src and h.dst (namespace names) and
    h.src_addr / h.dst_addr; h.run_in(ns) prefixes a command to run there.
    ``rate`` shapes the link with tbf; ``fast_link`` adds a second, never
    shaped veth pair (h.src_fast_addr / h.dst_fast_addr, in 198.19.0.0/16)
    for traffic that should cost what a local copy costs.

    Processes enter a namespace with nsenter --net, not `ip netns exec`:
    the latter also makes a mount namespace, which CRIU refuses to dump."""

    def __init__(self, prefix="hm", subnet=18, rate=None, fast_link=False):
        tag = uuid.uuid4().hex[:6]
        self.src, self.dst = f"{prefix}-src-{tag}", f"{prefix}-dst-{tag}"
        self.veth = (f"hm{tag}a", f"hm{tag}b")
        self.src_addr, self.dst_addr = (
            "198.%d.%d.1" % (subnet, int(tag[:2], 16)),
            "198.%d.%d.2" % (subnet, int(tag[:2], 16)),
        )
        self.rate = rate
        self.fast_link = fast_link
        self.fast_veth = (f"hm{tag}c", f"hm{tag}d")
        self.src_fast_addr, self.dst_fast_addr = "198.19.%d.1" % int(tag[:2], 16), "198.19.%d.2" % int(tag[:2], 16)
        self._made = []

    def __enter__(self):
        if os.geteuid() != 0:
            raise SetupError("network namespaces need root")
        try:
            for ns in (self.src, self.dst):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")  # CRIU needs lo up to check TCP repair
            self._pair(self.veth, self.src_addr, self.dst_addr, self.rate)
            if self.fast_link:
                self._pair(self.fast_veth, self.src_fast_addr, self.dst_fast_addr, None)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _pair(self, veth, src_addr, dst_addr, rate):
        a, b = veth
        _ip("link", "add", a, "netns", self.src, "type", "veth", "peer", "name", b, "netns", self.dst)
        for ns, dev, addr in ((self.src, a, src_addr), (self.dst, b, dst_addr)):
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            if rate:
                # tbf: a token bucket shaping the link to `rate` (netem is not available here)
                subprocess.run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        "256kb",
                        "latency",
                        "50ms",
                    ],
                    check=True,
                    capture_output=True,
                )

    def wire_bytes(self):
        """Bytes sent so far over the veth pairs, both directions."""
        total = 0
        pairs = [self.veth] + ([self.fast_veth] if self.fast_link else [])
        for ns, i in ((self.src, 0), (self.dst, 1)):
            for pair in pairs:
                out = _ip("-n", ns, "-s", "-j", "link", "show", "dev", pair[i]).stdout
                total += json.loads(out)[0]["stats64"]["tx"]["bytes"]
        return total

    def run_in(self, ns):
        return ["nsenter", f"--net=/run/netns/{ns}"]

    def __exit__(self, *exc):
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)  # takes its end of the veth along
        self._made = []
