"""lazy-pages.socket, where `criu restore --lazy-pages` connects to its
daemon: bound with nothing but the standard library, so that `hybridmig
lazy-pages` listens before it imports the rest (the native module, the
page store, the image readers: ~60 ms of Python imports here). runc's users
start the daemon and `runc restore --lazy-pages` back to back, and a
restore that finds no socket fails ("connect to lazy-pages.socket
failed")."""

import atexit
import contextlib
import os
import socket

from ..errors import SetupError

SOCKET_NAME = "lazy-pages.socket"

_early: tuple[str, socket.socket] | None = None  # (work dir, its bound socket)


def listen(work_dir):
    """Bind lazy-pages.socket in work_dir, refusing one a live daemon holds."""
    path = os.path.join(os.path.abspath(work_dir), SOCKET_NAME)
    if not os.path.isdir(work_dir):
        raise SetupError(f"work dir {work_dir} does not exist")
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise SetupError(f"work dir {work_dir} is not writable")
    # A UNIX socket path holds 107 bytes; a longer work dir is reached
    # through a descriptor of it (CRIU itself connects with a relative name).
    dirfd = os.open(work_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = "/proc/self/fd/%d/%s" % (dirfd, SOCKET_NAME)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(short)
                raise SetupError(f"{path} is in use: another lazy-pages daemon is listening there")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale socket of a daemon that is gone
            finally:
                probe.close()
        # Bound under a private name and renamed once it listens: a client
        # that finds the name never meets a socket that refuses it (bind()
        # creates the file, listen() comes after).
        private = ".%s.%d" % (SOCKET_NAME, os.getpid())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(private, dir_fd=dirfd)
            except FileNotFoundError:
                pass
            sock.bind("/proc/self/fd/%d/%s" % (dirfd, private))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # each uffd comes with its task's pid
            sock.listen(1)
            os.rename(private, SOCKET_NAME, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(private, dir_fd=dirfd)
            raise SetupError(f"cannot create {path}: {e.strerror} (is the work dir writable?)") from e
    finally:
        os.close(dirfd)
    return sock


def _option(args, short, long):
    """The value of -X V, -XV, --long V or --long=V in args, the last one
    given (as click takes it), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in (short, long):
            value = args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith(long + "="):
            value = arg[len(long) + 1 :]
        elif arg.startswith(short) and not arg.startswith("--") and len(arg) > len(short):
            value = arg[len(short) :]
    return value


def bind_early(args):
    """`hybridmig lazy-pages ARGS`: lazy-pages.socket bound and listening
    now, from the work dir (-W, else the images dir -D) read off the
    command line. Anything amiss is left for the command itself to find
    and say (it binds again); a socket the command does not take is
    removed at exit."""
    global _early
    work_dir = _option(args, "-W", "--work-dir") or _option(args, "-D", "--images-dir")
    if not work_dir:
        return
    try:
        _early = (os.path.abspath(work_dir), listen(work_dir))
    except (SetupError, OSError):
        return
    atexit.register(_drop_early)


def take(work_dir):
    """The socket bind_early() made, if it was for work_dir; else None (and
    one made for another dir is removed)."""
    global _early
    if _early is None:
        return None
    bound, sock = _early
    if bound == os.path.abspath(work_dir):
        _early = None
        return sock
    _drop_early()
    return None


def _drop_early():
    global _early
    if _early is not None:
        bound, sock = _early
        _early = None
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(bound, SOCKET_NAME))
