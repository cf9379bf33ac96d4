"""`hybridmig demo`: migrate a self-verifying workload between two local
"hosts" (network namespaces joined by a veth), with live progress, and show
that every page arrived intact. Everything it creates is removed on exit,
also on Ctrl-C."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click
from rich.console import Console

from .. import doctor
from ..errors import HybridmigError
from ..keys import generate_key
from .netns import TwoHosts
from .workload import Workload, become_subreaper

PORT = 7790


def _hybridmig():
    return os.path.join(os.path.dirname(sys.executable), "hybridmig")


def run_demo(size_mb, threads, rate, console):
    doctor.require_lazy_restore()
    doctor.require_dirty_tracker()
    become_subreaper()  # the restored workload is re-parented to us
    tmp = tempfile.mkdtemp(prefix="hybridmig-demo-")
    serve = workload = restored = None
    try:
        key = os.path.join(tmp, "key")
        generate_key(key)
        dst_dir = os.path.join(tmp, "destination")
        os.mkdir(dst_dir)
        with TwoHosts(prefix="hmdemo") as hosts:
            console.print(
                f"[b]hosts[/b]: {hosts.src} ({hosts.src_addr}) and {hosts.dst} ({hosts.dst_addr}), joined by a veth"
            )
            workload = Workload.start(size_mb, threads=threads, rate=rate, netns=hosts.src)
            first = workload.verify()[0]
            console.print(
                "[b]workload[/b]: memwork, %d MiB, %d writer threads, pid %d on %s; all %d pages verified"
                % (size_mb, threads, workload.host_pid, hosts.src, first["pages"])
            )
            serve = subprocess.Popen(
                hosts.run_in(hosts.dst)
                + [
                    _hybridmig(),
                    "serve",
                    "--listen",
                    "%s:%d" % (hosts.dst_addr, PORT),
                    "--dir",
                    dst_dir,
                    "--key-file",
                    key,
                    "--once",
                ],
                stdin=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            report_path = os.path.join(tmp, "report.json")
            console.print("[b]migrating[/b] pid %d to %s:%d ..." % (workload.host_pid, hosts.dst_addr, PORT))
            rc = subprocess.call(
                hosts.run_in(hosts.src)
                + [
                    _hybridmig(),
                    "run",
                    str(workload.host_pid),
                    "--to",
                    "%s:%d" % (hosts.dst_addr, PORT),
                    "--key-file",
                    key,
                    "--report",
                    report_path,
                ],
                stdin=subprocess.DEVNULL,
            )
            with open(report_path) as f:
                report = json.load(f)
            if rc != 0:
                raise HybridmigError("migration failed: {}".format(report.get("error")))
            serve.wait(30)
            workload.wait_gone()
            restored = Workload.adopt(report["restored_pid"], report=workload)
            workload = None
            results = restored.verify()
            bad = sum(r["bad"] + r.get("zero_pages_bad", 0) for r in results)
            netns = os.readlink("/proc/%d/ns/net" % restored.host_pid)
            in_dst = os.stat("/proc/%d/ns/net" % restored.host_pid).st_ino == os.stat(f"/run/netns/{hosts.dst}").st_ino
            console.print(
                "[b]on the destination[/b]: pid %d in %s (%s); %d pages verified, [b]%d bad[/b]"
                % (
                    restored.host_pid,
                    hosts.dst if in_dst else "another namespace",
                    netns,
                    sum(r["pages"] for r in results),
                    bad,
                )
            )
            console.print(
                "the workload's longest pause, seen on CLOCK_REALTIME: [b]%.0f ms[/b]; "
                "hybridmig's downtime: %.0f ms; remote faults: %d"
                % (max(r["max_gap_ms"] for r in results), report["downtime_ms"], report["remote_faults"])
            )
            if bad or not in_dst:
                raise HybridmigError("the migrated workload did not verify")
    finally:
        for w in (workload, restored):
            if w is not None:
                w.stop()
        if serve is not None and serve.poll() is None:
            serve.kill()
            serve.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@click.command()
@click.option("--size", "size_mb", type=int, default=512, show_default=True, help="workload memory, MiB")
@click.option("--threads", type=int, default=2, show_default=True, help="writer threads")
@click.option("--rate", type=float, default=2000, show_default=True, help="pages written per second per thread")
def demo(size_mb, threads, rate):
    """Migrate a self-verifying workload between two local network namespaces."""
    console = Console(stderr=True)
    try:
        run_demo(size_mb, threads, rate, console)
    except HybridmigError as e:
        console.print(f"[red]demo failed:[/red] {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted: everything the demo created was removed")
        sys.exit(130)
    console.print("[green]demo passed[/green]")
