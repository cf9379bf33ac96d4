"""`python -m bench [ARGS...]`: the research bench, as `hybridmig bench`
(bench/research.py). The lazy-pages and pre-copy benchmarks have their own
entry points: `python -m bench.lazy_pages`, `python -m bench.precopy`."""

import sys

from .research import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
