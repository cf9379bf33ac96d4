"""The `hybridmig` command line: one click group, its commands in cli/main.py
and beside the code they drive (doctor, dirty-rate, demo)."""

from .main import main

__all__ = ["main"]
