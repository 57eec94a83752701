"""``python -m a3_serve.bench``: the same command line as ``benchmarks/throughput.py``."""

import sys

from a3_serve.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
