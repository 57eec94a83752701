"""``python -m a3_serve.bench.server``: the same as ``a3-bench-server``."""

import sys

from a3_serve.bench.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
