"""Benchmarks of hybridmig against stock CRIU (run as modules, e.g. python -m bench.lazy_pages)."""
