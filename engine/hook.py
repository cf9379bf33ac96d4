"""The action script of the switch-over dump (engine/criu.py writes the
executable CRIU runs: this file, run by this interpreter without
site-packages).

CRIU runs it at each stage with CRTOOLS_SCRIPT_ACTION set. At pre-dump,
just before CRIU seizes the tasks, it tells `hybridmig run` (which then
stops holding an auto-converged tree) and waits for its reply. At post-dump (the
images are written and the tasks frozen) it hands over to `hybridmig run`
through the socket in $HYBRIDMIG_HOOK_SOCKET and exits with its verdict:
0 to let the dump finish, 1 to make CRIU resume the tasks. Any failure to
ask means 1: the source is never lost.

After post-dump a lazy dump always starts its page server and waits, frozen,
for one client (criu/cr-dump.c, cr_dump_finish). A detached child of the
hook is that client: it closes the session well on a commit (the tasks then
end) and fails it otherwise (they resume), so nothing stays frozen even if
`hybridmig run` itself is gone by then.

CRIU runs the hook with the tasks frozen, so its start-up is blackout:
`python -S` and the standard library only (about 15 ms, against 70 ms with
site-packages and hybridmig's imports). The detached child, after the
verdict, runs `python -m hybridmig.hook end-session PORT commit|abort` with
everything.
"""
import os
import socket
import sys
import time

HOOK_ENV = "HYBRIDMIG_HOOK_SOCKET"
PAGE_SERVER_ENV = "HYBRIDMIG_PAGE_SERVER_PORT"


def _end_page_server_session(port, commit):
    from .errors import ProtocolError
    from .pageserver import PageServerSource

    deadline = time.monotonic() + 60
    while True:
        src = PageServerSource("127.0.0.1", port)
        try:
            src.connect()
            break
        except ProtocolError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
    if commit:
        src.close()
    else:
        src.abort()


def _detach_and_end_session(port, commit):
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    try:
        os.execv(sys.executable, [sys.executable, "-m", "hybridmig.hook", "end-session", str(port),
                                  "commit" if commit else "abort"])
    finally:
        os._exit(0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["end-session"]:
        _end_page_server_session(int(argv[1]), argv[2] == "commit")
        return 0
    action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
    if action not in ("pre-dump", "post-dump"):
        return 0
    path = os.environ.get(HOOK_ENV)
    port = int(os.environ.get(PAGE_SERVER_ENV, "0"))
    verdict = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(action.encode() + b"\n")
            verdict = s.recv(1)
    except (OSError, TypeError) as e:
        print("hybridmig's CRIU hook: cannot reach hybridmig run at %s: %s" % (path, e), file=sys.stderr)
    if action == "pre-dump":
        # Only a signal that CRIU is about to seize the tree (hybridmig run
        # lets go of it); whatever happens, the dump may go on: safety is
        # the post-dump verdict's job.
        return 0
    commit = verdict == b"0"
    if port:
        _detach_and_end_session(port, commit)
    return 0 if commit else 1


if __name__ == "__main__":
    sys.exit(main())
