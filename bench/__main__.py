"""`python -m bench [--quick] [ARGS...]` (what `make bench` / `make bench-full` run):
the lazy-pages benchmark, bench/lazy_pages.py.  --quick: one 256 MiB round
(--sizes 256 --repeat 1); other arguments go to bench.lazy_pages."""
import sys

from .lazy_pages import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--quick" in args:
        args = ["--sizes", "256", "--repeat", "1"] + [a for a in args if a != "--quick"]
    sys.exit(main(args))
