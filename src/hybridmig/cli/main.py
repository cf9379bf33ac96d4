"""The `hybridmig` command line."""

import importlib
import json
import logging
import os
import sys

import click

from ..errors import HybridmigError, InDoubtError
from ..source.options import DEFAULTS, SWITCHOVERS


class LazyGroup(click.Group):
    """Commands whose modules are imported only when one of them runs:
    `hybridmig lazy-pages` must listen within milliseconds of its start
    (runc starts its restore right after it), and importing every command's
    module up front cost ~90 ms."""

    LAZY = {
        "doctor": "hybridmig.doctor:doctor",
        "dirty-rate": "hybridmig.source.dirtyrate:dirty_rate",
        "demo": "hybridmig.testing.demo:demo",
    }

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.LAZY:
            module, attr = self.LAZY[cmd_name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="hybridmig")
def main():
    """Live-migrate Linux processes with CRIU, pre-copy and a native userfaultfd handler."""


def _setup_logging(verbosity, log_file):
    # CRIU's scale: 0 errors only ... 4 debug.
    level = {0: logging.ERROR, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def fail(message):
    click.echo(f"hybridmig: error: {message}", err=True)
    sys.exit(1)


INSECURE_HELP = (
    "send pages and images in clear (only authenticated): anyone on the path reads the process's memory; "
    "both ends must say it"
)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def keygen(file):
    """Write a new shared key to FILE (32 random bytes, mode 0600) for run and serve."""
    from ..keys import generate_key

    try:
        generate_key(file)
    except HybridmigError as e:
        fail(str(e))
    click.echo(f"wrote a new key to {file}: copy it to the other host, mode 0600 (e.g. with scp -p)", err=True)


@main.command("lazy-pages")
@click.option("-D", "--images-dir", required=True, type=click.Path(file_okay=False), help="CRIU images directory")
@click.option(
    "-W", "--work-dir", type=click.Path(file_okay=False), help="where lazy-pages.socket goes (default: images dir)"
)
@click.option("--status-fd", type=int, help="write one NUL byte to this fd once listening")
@click.option("-o", "--log-file", help="log file, relative to the work dir")
@click.option("-v", "--verbosity", type=int, default=2, is_flag=False, flag_value=4, help="0 (errors) .. 4 (debug)")
@click.option("--no-default-config", is_flag=True, help="accepted for CRIU compatibility (there is no config)")
@click.option("--page-server", is_flag=True, help="fetch pages from a remote CRIU page server")
@click.option("--address", help="page server address")
@click.option("--port", type=int, help="page server port")
@click.option("--stats-json", type=click.Path(dir_okay=False), help="write the stats here as JSON")
@click.option("--timeout", type=float, default=None, help="seconds to wait for criu restore to connect")
@click.option(
    "--eager-delay",
    type=float,
    default=0.0,
    show_default=True,
    help="seconds after restore during which pages go in only on fault (experiments)",
)
@click.option(
    "--installers",
    type=click.IntRange(1, 8),
    default=None,
    help="threads installing pages eagerly [default: 2, or 1 on one CPU]",
)
@click.option(
    "--batch-pages",
    type=click.IntRange(1, 512),
    default=None,
    help="pages per eager copy (ioctl); a fault waits for at most one [default: 8]",
)
def lazy_pages(
    images_dir,
    work_dir,
    status_fd,
    log_file,
    verbosity,
    no_default_config,
    page_server,
    address,
    port,
    stats_json,
    timeout,
    eager_delay,
    installers,
    batch_pages,
):
    """Serve `criu restore --lazy-pages` from a RAM page store (drop-in for `criu lazy-pages`)."""
    from ..destination.guard import Guard
    from ..destination.lazypages import LazyPagesDaemon

    work_dir = work_dir or images_dir
    _setup_logging(verbosity, os.path.join(work_dir, log_file) if log_file else None)
    if not os.path.isdir(images_dir):
        fail(f"images dir {images_dir} does not exist")
    source = None
    if page_server:
        if not address or not port:
            fail("--page-server needs --address and --port")
        from ..criu.pageserver import PageServerSource

        source = PageServerSource(address, port)
    daemon = guard = None
    try:
        # ends the restored tasks if this daemon dies, or fails, before every page is in
        guard = Guard(owner="hybridmig lazy-pages")
        daemon = LazyPagesDaemon(
            images_dir, work_dir, source=source, installers=installers, batch_pages=batch_pages, guard=guard
        )
        # Listening first, as runc's users expect of a daemon they start just
        # before `runc restore --lazy-pages`; a failure below closes the
        # socket, and a restore already connected then fails.
        daemon.bind()
        if status_fd is not None:
            os.write(status_fd, b"\0")
            os.close(status_fd)
        if source is not None:
            source.connect()  # fail before the restore sends its tasks, not halfway
        daemon.prepare()
        stats = daemon.serve(timeout=timeout, eager_delay=eager_delay)
        guard.finish("done")
    except HybridmigError as e:
        fail(str(e))
    finally:
        if guard is not None:
            guard.close()
        if daemon is not None:
            daemon.close()
    if stats_json:
        with open(stats_json, "w") as f:
            json.dump(stats, f, indent=2)
    lat = stats["fault_latency_us"]
    click.echo(
        "lazy-pages: %d tasks, %d pages: %d by fault, %d prefetched, %d zero; installed in %s; "
        "fault latency p50 %.1f us, p99 %.1f us, max %.1f us"
        % (
            stats["tasks"],
            stats["lazy_pages"],
            stats["pages_fault"],
            stats["pages_prefetch"],
            stats["pages_zero"],
            "{:.3f} s".format(stats["install_s"]) if stats["install_s"] is not None else "-",
            lat["p50"],
            lat["p99"],
            lat["max"],
        ),
        err=True,
    )
    # Every page is in, every uffd closed, the stats written: what is left
    # is the interpreter's teardown of its modules, ~50 ms that CRIU (and the
    # bench, which takes the daemon's exit for "all installed") waits for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _size(text):
    """A byte count with an optional K/M/G suffix (powers of 1024)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 100M") from None


@main.command()
@click.option("--listen", required=True, help="ADDRESS:PORT to accept sources on")
@click.option("--dir", "base_dir", required=True, type=click.Path(file_okay=False), help="work directory for sessions")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False), help="shared secret, as on the source")
@click.option("--once", is_flag=True, help="exit after the first migration (0 if it committed)")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    help="also run the session in TLS: this certificate (with --tls-key and --tls-ca)",
)
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS private key")
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="TLS: the CA that signed the sources' certificates")
@click.option("--insecure-plaintext", is_flag=True, help=INSECURE_HELP)
@click.option("--keep", is_flag=True, help="keep each session's images and CRIU's restore.log in --dir")
@click.option(
    "--max-memory",
    help="most a session's pages and images may take, e.g. 8G (default: the memory available, less a margin)",
)
@click.option(
    "--allow-criu-opt",
    "allow_criu_opts",
    multiple=True,
    help="also let sources pass this CRIU option (full long name; repeatable)",
)
@click.option("--podman", "use_podman", is_flag=True, help="also restore podman containers (`run --container`)")
@click.option(
    "--podman-opt",
    "podman_opts",
    multiple=True,
    help="a global option of that podman, e.g. --podman-opt=--root=DIR (repeatable; implies --podman)",
)
@click.option("-v", "--verbosity", type=int, default=2, is_flag=False, flag_value=4, help="0 (errors) .. 4 (debug)")
def serve(
    listen,
    base_dir,
    key_file,
    once,
    tls_cert,
    tls_key,
    tls_ca,
    insecure_plaintext,
    keep,
    max_memory,
    allow_criu_opts,
    use_podman,
    podman_opts,
    verbosity,
):
    """Destination: keep pre-copied pages in RAM and restore migrated processes."""
    from .. import wire
    from ..criu.command import check_allowed_names
    from ..destination import serve as destination
    from ..keys import read_key
    from ..podman import Podman

    _setup_logging(verbosity, None)
    if (tls_cert, tls_key, tls_ca) != (None, None, None) and not (tls_cert and tls_key and tls_ca):
        fail("--tls-cert, --tls-key and --tls-ca go together (serve checks the source's certificate too)")
    try:
        key = read_key(key_file)
        tls = wire.tls_server_context(tls_cert, tls_key, tls_ca) if tls_cert else None
        mode = wire.PLAINTEXT if insecure_plaintext else wire.SEALED
        limits = destination.Limits(
            max_memory=_size(max_memory) if max_memory else None,
            criu_opts=check_allowed_names(allow_criu_opts),
            podman=Podman(podman_opts) if use_podman or podman_opts else None,
        )
        outcome = destination.serve(listen, base_dir, key, once=once, tls=tls, keep=keep, mode=mode, limits=limits)
    except HybridmigError as e:
        fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    if once and outcome != "committed":
        fail(f"the migration did not complete: {outcome}")


@main.command()
@click.argument("pid", type=int, required=False)
@click.option("--container", help="migrate this podman container (instead of PID): see docs/containers.md")
@click.option(
    "--podman-opt",
    "podman_opts",
    multiple=True,
    help="with --container: a global option of the source's podman, e.g. --podman-opt=--root=DIR (repeatable)",
)
@click.option("--rm", "remove", is_flag=True, help="with --container: remove the source container once migrated")
@click.option("--to", required=True, help="ADDRESS:PORT of `hybridmig serve`")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False), help="shared secret, as on the destination")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--max-rounds", type=int, default=DEFAULTS.max_rounds, show_default=True, help="pre-copy rounds at most")
@click.option(
    "--target-downtime",
    type=float,
    default=DEFAULTS.target_downtime_ms,
    show_default=True,
    help="ms: stop pre-copy once the last transfer is estimated to fit",
)
@click.option(
    "--bandwidth-limit", default=str(DEFAULTS.bandwidth_limit), help="bytes/s for pre-copy, e.g. 100M (0: no limit)"
)
@click.option(
    "--keep-cpu",
    type=click.FloatRange(0, 1),
    default=DEFAULTS.keep_cpu,
    show_default=True,
    help="pre-copy slows down while the process tree gets less than this share of the CPU it asks for "
    "(its threads' time running over running + waiting for a CPU; 0: never)",
)
@click.option(
    "--auto-converge/--no-auto-converge",
    default=DEFAULTS.auto_converge,
    help="hold the tree in ptrace stops a growing share of the time while rounds do not converge "
    "(default: only with --switchover precopy; with auto it replaces the switch to post-copy)",
)
@click.option(
    "--switchover",
    type=click.Choice(SWITCHOVERS),
    default=None,
    help="precopy: rounds, then the rest frozen; postcopy: after --postcopy-after rounds the copy resumes "
    "and pulls the rest from the frozen source; auto: pre-copy while rounds shrink, then post-copy "
    "(during round 0 already where the tree writes too fast for any round to converge) "
    f"(default: {DEFAULTS.switchover}; precopy for --container)",
)
@click.option(
    "--postcopy-after",
    type=click.FloatRange(min=0),
    metavar="N",
    default=DEFAULTS.postcopy_after,
    show_default=True,
    help="rounds (the first included) before --switchover postcopy switches over; below 1, the share of "
    "round 0 sent first (0: none, every page pushed or faulted in after the resume: each crosses the wire "
    "about once, where a whole round 0 resends what the process writes meanwhile). The default is 1 "
    "because the copy then runs at nearly its pace at once; with 0 a process writing all over its memory "
    "runs at a fraction of it until every page is in (memwork: 13 percent; docs/results.md)",
)
@click.option("--criu-opt", "criu_opts", multiple=True, help="extra CRIU option for dump and restore (repeatable)")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULTS.timeout,
    show_default=True,
    help="seconds for the dump, for the restore, and for any silence of the destination",
)
@click.option("--no-compress", is_flag=True, default=not DEFAULTS.compress, help="send pages without lz4")
@click.option(
    "--streams",
    type=int,
    default=DEFAULTS.streams,
    help="page streams for the pre-copy rounds' pages: 1, on the control connection; N (2 to 8), N TCP "
    "connections beside it, a page always on the same one. Default: 1 below 4 CPUs (on 2 vCPUs the extra threads "
    "cost more than they bring), else half the CPUs, at most 4. A stream that breaks fails the migration: the "
    "source resumes untouched (no retry)",
)
@click.option("--report", "report_file", type=click.Path(dir_okay=False), help="also write the JSON report here")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    help="keep CRIU's images and dump.log here (default: a temp dir, removed)",
)
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="also run the session in TLS: the destination's CA")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS: this source's certificate (with --tls-key)")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS: this source's private key")
@click.option("--tls-name", help="TLS: the name (or address) the destination's certificate must carry")
@click.option("--tls-fingerprint", help="TLS: or the SHA-256 fingerprint of the destination's certificate")
@click.option("--insecure-plaintext", is_flag=True, help=INSECURE_HELP)
@click.option("-v", "--verbosity", type=int, default=2, is_flag=False, flag_value=4, help="0 (errors) .. 4 (debug)")
def run(
    pid,
    container,
    podman_opts,
    remove,
    to,
    key_file,
    as_json,
    max_rounds,
    target_downtime,
    bandwidth_limit,
    keep_cpu,
    auto_converge,
    switchover,
    postcopy_after,
    criu_opts,
    timeout,
    no_compress,
    streams,
    report_file,
    work_dir,
    tls_ca,
    tls_cert,
    tls_key,
    tls_name,
    tls_fingerprint,
    insecure_plaintext,
    verbosity,
):
    """Source: live-migrate process tree PID (or a podman container) to a destination."""
    from .. import wire
    from ..keys import read_key
    from ..source.migration import Migration, alive
    from .progress import RunProgress

    _setup_logging(verbosity, None)
    if (pid is None) == (container is None):
        fail("give a PID or --container NAME (one of them)")
    if (podman_opts or remove) and container is None:
        fail("--podman-opt and --rm go with --container")
    if report_file and not os.access(os.path.dirname(os.path.abspath(report_file)), os.W_OK):
        fail(f"--report {report_file}: its directory is not writable (checked before migrating, not after)")
    if (tls_cert, tls_key, tls_ca) != (None, None, None) and not (tls_cert and tls_key and tls_ca):
        fail("--tls-ca, --tls-cert and --tls-key go together (the destination checks the source's certificate too)")
    show = RunProgress(enabled=not as_json)
    try:
        key = read_key(key_file)
        tls = wire.tls_client_context(tls_ca, tls_cert, tls_key, tls_name, tls_fingerprint) if tls_ca else None
        if switchover is None:  # post-copy through podman's restore is not built
            switchover = "precopy" if container is not None else DEFAULTS.switchover
        if container is not None and switchover != "precopy":
            fail(
                f"--switchover {switchover}: a container migrates with --switchover precopy only "
                "(post-copy through podman's restore is not built)"
            )
        options = dict(
            max_rounds=max_rounds,
            target_downtime_ms=target_downtime,
            bandwidth_limit=_size(bandwidth_limit),
            keep_cpu=keep_cpu,
            criu_opts=criu_opts,
            work_dir=work_dir,
            timeout=timeout,
            progress=show.update,
            compress=not no_compress,
            streams=streams,
            tls=tls,
            wire_mode=wire.PLAINTEXT if insecure_plaintext else wire.SEALED,
            auto_converge=auto_converge,
            switchover=switchover,
            postcopy_after=postcopy_after,
        )
        if container is not None:
            from ..source.container import ContainerMigration

            migration = ContainerMigration(container, to, key, podman_opts=podman_opts, remove=remove, **options)
            pid = migration.pid
            report = migration.run()
        else:
            report = Migration(pid, to, key, **options).run()
    except HybridmigError as e:
        in_doubt = isinstance(e, InDoubtError)
        failed = {"result": "in doubt" if in_doubt else "failed", "error": str(e), "pid": pid}
        if container is not None:
            failed["container"] = container
        if report_file:
            with open(report_file, "w") as f:
                json.dump(failed, f, indent=2)
        if as_json:
            click.echo(json.dumps(failed))
        # (not said of a pid that is gone or a zombie, or left frozen: the error is about that)
        if container is not None:
            fail(
                "%s (container %s keeps running on the source)" % (e, container)
                if pid and alive(pid) and not in_doubt
                else str(e)
            )
        fail("%s (pid %d keeps running on the source)" % (e, pid) if alive(pid) and not in_doubt else str(e))
    if report_file:
        with open(report_file, "w") as f:
            json.dump(report, f, indent=2)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        show.summary(report)


@main.command()
@click.argument("pid", type=int)
@click.argument("decision", type=click.Choice(["resume", "end"]))
def settle(pid, decision):
    """Settle a migration `run` left in doubt: resume the frozen source, or
    end it. PID: the one run named (its criu dump's, or the source's once
    that CRIU has died)."""
    from ..criu.command import settle as settle_dump
    from ..source.hold import Hold

    end = decision == "end"
    hold = Hold.find(pid)
    try:
        if hold is None:  # a source frozen by a run older than the hold
            settle_dump(pid, end=end)
        elif not hold.settle(end, lambda: settle_dump(hold.criu_pid, end=end)):
            click.echo("criu dump %d has died; the source was held stopped by run" % hold.criu_pid)
    except HybridmigError as e:
        fail(str(e))
    click.echo("the source was %s" % ("ended" if end else "resumed"))


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """Compare migration strategies side by side, with plots (--help for the options)."""
    from ..bench.research import main as research

    sys.exit(research(list(args)))
