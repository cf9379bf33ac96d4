"""The action script of the switch-over dump (criu/command.py writes the
executable CRIU runs: this file, run by this interpreter without
site-packages).

CRIU runs it at each stage with CRTOOLS_SCRIPT_ACTION set, and it asks
`hybridmig run` through the socket in $HYBRIDMIG_HOOK_SOCKET. At pre-dump,
before CRIU has looked at the tree (CRIU starts with pre-copy and waits
here until it converged), the verdict is 0 to go on and seize the tree, 1
to give up. At post-dump (the images are written and the tasks frozen) it
is 0 to let the dump finish, 1 to make CRIU resume the tasks. Any failure
to ask means 1: the source is never lost.

After post-dump a lazy dump always starts its page server and waits, frozen,
for one client (criu/cr-dump.c, cr_dump_finish). A detached child of the
hook is that client: it closes the session well on a commit (the tasks then
end) and fails it otherwise (they resume), so nothing stays frozen even if
`hybridmig run` itself is gone by then. A verdict of 2 (the outcome in
doubt: the destination may have kept its copy) lets the dump go on but
starts no such child: CRIU waits for a client, the tasks frozen, until the
operator runs `hybridmig settle CRIU_PID resume|end`. CRIU, given no --port, binds its
page server to a port of the kernel's choosing only then: the child finds it
among CRIU's listening sockets (a port picked in advance could be taken by
another process in the minutes of pre-copy).

CRIU runs the hook with the tasks frozen, so its start-up is blackout.
native/hook/criu_hook.c does what main() does in about 1 ms, and is the
hook wherever it was built (`make setup`; criu/command.py's write_hook).
Here, the fall-back: `python -S` and no module that is not built in
(8 to 10 ms, against 70 ms with site-packages and hybridmig's imports;
`import socket` alone, with the enum and selectors it pulls in, would add
10 ms: _socket does the same here). The detached child, after the
verdict, runs `python -m hybridmig.criu.hook end-session CRIU_PID commit|abort`
with everything.
"""

import _socket
import os
import sys
import time

HOOK_ENV = "HYBRIDMIG_HOOK_SOCKET"
IN_DOUBT = b"2"  # post-dump: keep the tasks frozen, neither commit nor resume


def page_server_port(criu_pid, timeout=60.0):
    """The port CRIU's page server listens on, once it does; None if CRIU
    ends or does not listen within `timeout`."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        criu = psutil.Process(criu_pid)
        while time.monotonic() < deadline:
            # A CRIU that has exited but is not reaped yet (its parent, run,
            # killed) lists no socket, and raises nothing: ask its state.
            if criu.status() == psutil.STATUS_ZOMBIE:
                return None
            for c in criu.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN:
                    return c.laddr.port
            time.sleep(0.01)
    except psutil.NoSuchProcess:
        pass
    return None


def _end_page_server_session(criu_pid, commit):
    from .pageserver import PageServerSource

    try:
        port = page_server_port(criu_pid)
        if port is not None:
            src = PageServerSource("127.0.0.1", port)
            src.connect()
            if commit:
                src.close()
            else:
                src.abort()
            return
    except Exception as e:  # noqa: BLE001 -- whatever it was, CRIU must not wait on
        print(f"hybridmig's CRIU hook: cannot end CRIU's page server session: {e}", file=sys.stderr)
    _end_without_page_server(criu_pid, commit)


def _end_without_page_server(criu_pid, commit):
    """What CRIU would do, without it: it waits for its page server's client
    with no limit, the tree frozen. On a commit the tree ends (the
    destination's copy is the one); then CRIU, whose ptrace stops end with
    it: an uncommitted tree runs on."""
    import psutil

    from ..proctree import end_tree

    for pid in ([os.environ.get("CRTOOLS_INIT_PID")] if commit else []) + ([criu_pid] if criu_pid else []):
        try:
            end_tree(psutil.Process(int(pid)))
        except (TypeError, psutil.NoSuchProcess):
            pass  # no tree named, or ended meanwhile


def _detach_and_end_session(criu_pid, commit):
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    try:
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "hybridmig.criu.hook",
                "end-session",
                str(criu_pid),
                "commit" if commit else "abort",
            ],
        )
    finally:
        os._exit(0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["end-session"]:
        _end_page_server_session(int(argv[1]), argv[2] == "commit")
        return 0
    if argv[:1] == ["end-tree"]:  # (from the compiled hook: CRIU died after a commit)
        _end_without_page_server(None, True)
        return 0
    action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
    if action not in ("pre-dump", "post-dump"):
        return 0
    criu_pid = os.getppid()  # CRIU runs its action scripts itself, and waits for them
    path = os.environ.get(HOOK_ENV, "")
    verdict = b""
    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.sendall(action.encode() + b"\n")
            verdict = s.recv(1)
        finally:
            s.close()
    except OSError as e:
        print(f"hybridmig's CRIU hook: cannot reach hybridmig run at {path}: {e}", file=sys.stderr)
    commit = verdict == b"0"
    if action == "post-dump" and verdict == IN_DOUBT:
        # CRIU starts its page server next and waits, frozen, for a client:
        # `hybridmig settle` connects later, as the operator decides
        return 0
    if action == "pre-dump":
        # CRIU waits here from the start of pre-copy until the switch-over:
        # 0 lets it seize the tree; anything else (pre-copy failed, or
        # `hybridmig run` is gone) makes it give up before touching it.
        return 0 if commit else 1
    if os.getppid() != criu_pid:
        # CRIU died while we waited (we were reparented): its ptrace stops
        # ended with it, the tree runs again, and there is no page server
        # session to end. After a commit the destination's copy is the one.
        if commit:
            _end_without_page_server(None, commit)
        return 1
    _detach_and_end_session(criu_pid, commit)
    return 0 if commit else 1


if __name__ == "__main__":
    sys.exit(main())
