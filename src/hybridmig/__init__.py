"""hybridmig: live migration of Linux processes over CRIU."""

__version__ = "0.1.0"
