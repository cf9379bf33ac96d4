"""Benchmark: how soon `hybridmig lazy-pages` listens after it is started.

    .venv/bin/python -m bench.lazy_listen [--pairs 10]

runc's users start the daemon and `runc restore --lazy-pages` back to back,
and a restore that finds no socket fails (issue 13: within 50 ms of its
start on an idle machine). Each start is timed from the exec to the first
successful connect() to lazy-pages.socket (polled every 0.5 ms), with
images the daemon cannot read (pstree.img a FIFO nobody writes: the socket
must come first), then the daemon is killed by its pid. Alternating, per
pair: `hybridmig lazy-pages` as installed (`hybridmig`: the socket bound
before click and the command's modules are imported, destination/
lazysocket.py) and the same command run with every module imported first
(`imports-first`, as before the early bind). (Stock `criu lazy-pages`
reads the images before it listens: it never would here.) Prints one JSON
object: per mode the times (ms), their median, and the load average."""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.join(os.path.dirname(sys.executable), "hybridmig")
MODES = {
    "hybridmig": [BIN, "lazy-pages", "-D"],
    "imports-first": [
        sys.executable,
        "-c",
        "import sys; from hybridmig.cli.main import main; import hybridmig.destination.lazypages;"
        " sys.argv[0] = 'hybridmig'; sys.exit(main())",
        "lazy-pages",
        "-D",
    ],
}


def start_to_listen(cmd, limit=5.0):
    """ms from the exec to a connectable socket, or None within limit s."""
    d = tempfile.mkdtemp(prefix="hm-lazy-listen-")
    try:
        os.mkfifo(os.path.join(d, "pstree.img"))
        path = os.path.join(d, "lazy-pages.socket")
        t0 = time.monotonic()
        proc = subprocess.Popen([*cmd, d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = None
        try:
            while took is None and time.monotonic() - t0 < limit:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    took = (time.monotonic() - t0) * 1000
                except OSError:
                    time.sleep(0.0005)
                finally:
                    s.close()
        finally:
            proc.kill()
            proc.wait(30)
        return took
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()
    modes = ["hybridmig", "imports-first"]
    times: dict[str, list] = {m: [] for m in modes}
    load = [os.getloadavg()[0]]
    for i in range(args.pairs):
        for m in modes if i % 2 == 0 else modes[::-1]:
            took = start_to_listen(MODES[m])
            times[m].append(None if took is None else round(took, 1))
    load.append(os.getloadavg()[0])
    out = {
        m: {"ms": t, "median_ms": statistics.median(x for x in t if x is not None) if any(t) else None}
        for m, t in times.items()
    }
    print(json.dumps({"modes": out, "load": load}, indent=2))


if __name__ == "__main__":
    main()
