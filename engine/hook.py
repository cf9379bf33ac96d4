"""hybridmig-criu-hook: the action script of the switch-over dump.

CRIU runs it at each stage with CRTOOLS_SCRIPT_ACTION set. At post-dump (the
images are written and the tasks frozen) it hands over to `hybridmig run`
through the socket in $HYBRIDMIG_HOOK_SOCKET and exits with its verdict:
0 to let the dump finish, 1 to make CRIU resume the tasks. Any failure to
ask means 1: the source is never lost.

After post-dump a lazy dump always starts its page server and waits, frozen,
for one client (criu/cr-dump.c, cr_dump_finish). A detached child of the
hook is that client: it closes the session well on a commit (the tasks then
end) and fails it otherwise (they resume), so nothing stays frozen even if
`hybridmig run` itself is gone by then.
"""
import os
import socket
import sys
import time

from .criu import HOOK_ENV, PAGE_SERVER_ENV


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
        _end_page_server_session(port, commit)
    finally:
        os._exit(0)


def main():
    action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
    if action != "post-dump":
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
        print("hybridmig-criu-hook: cannot reach hybridmig run at %s: %s" % (path, e), file=sys.stderr)
    commit = verdict == b"0"
    if port:
        _detach_and_end_session(port, commit)
    return 0 if commit else 1


if __name__ == "__main__":
    sys.exit(main())
