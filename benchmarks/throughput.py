#!/usr/bin/env python
"""Dense vs compressed serving throughput, latency and memory, side by side (see --help).

    python benchmarks/throughput.py --dense ./Llama-3.1-8B --compressed ./compressed

The implementation lives in :mod:`a3_serve.bench` (the benchmarking service runs the same code).
"""

import sys

from a3_serve.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
