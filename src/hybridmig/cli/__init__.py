"""The `hybridmig` command line: one click group, its commands in cli/main.py
and beside the code they drive (doctor, dirty-rate, demo)."""

import sys


def main():
    """The `hybridmig` command. `hybridmig lazy-pages` binds its socket
    first, before click and the command's modules are imported (~50 ms
    here): runc's users start the daemon and the restore back to back."""
    if sys.argv[1:2] == ["lazy-pages"]:
        from ..destination import lazysocket

        lazysocket.bind_early(sys.argv[2:])
    from ..heap import keep_freed_memory

    keep_freed_memory()  # (before any frame: heap.py says why)
    from .main import main as group

    return group()


__all__ = ["main"]
