"""Two local "hosts": network namespaces joined by a veth pair, for the demo,
the tests and the bench. Addresses come from 198.18.0.0/15, the range set
aside for benchmarking; everything created here is removed on exit."""
import os
import subprocess
import uuid

from .errors import SetupError


def _ip(*args, check=True):
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SetupError("ip %s: %s" % (" ".join(args), proc.stderr.strip()))
    return proc


class TwoHosts:
    """`with TwoHosts() as h:` gives h.src and h.dst (namespace names) and
    h.src_addr / h.dst_addr; h.run_in(ns) prefixes a command to run there.

    Processes enter a namespace with nsenter --net, not `ip netns exec`:
    the latter also makes a mount namespace, which CRIU refuses to dump."""

    def __init__(self, prefix="hm", subnet=18, rate=None):
        tag = uuid.uuid4().hex[:6]
        self.src, self.dst = "%s-src-%s" % (prefix, tag), "%s-dst-%s" % (prefix, tag)
        self.veth = ("hm%sa" % tag, "hm%sb" % tag)
        self.src_addr, self.dst_addr = "198.%d.%d.1" % (subnet, int(tag[:2], 16)), "198.%d.%d.2" % (subnet, int(tag[:2], 16))
        self.rate = rate
        self._made = []

    def __enter__(self):
        if os.geteuid() != 0:
            raise SetupError("network namespaces need root")
        try:
            for ns in (self.src, self.dst):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")  # CRIU needs lo up to check TCP repair
            a, b = self.veth
            _ip("link", "add", a, "netns", self.src, "type", "veth", "peer", "name", b, "netns", self.dst)
            for ns, dev, addr in ((self.src, a, self.src_addr), (self.dst, b, self.dst_addr)):
                _ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                if self.rate:
                    # tbf: a token bucket shaping the link to `rate` (netem is not available here)
                    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                                    "rate", self.rate, "burst", "256kb", "latency", "50ms"], check=True,
                                   capture_output=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def run_in(self, ns):
        return ["nsenter", "--net=/run/netns/%s" % ns]

    def __exit__(self, *exc):
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)  # takes its end of the veth along
        self._made = []
