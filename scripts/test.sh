#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest,
# e.g. scripts/test.sh -k export -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check a3_serve tests benchmarks scripts
export A3_SERVE_NO_PROGRESS=1
exec python -m pytest -q -m "not slow" --durations=15 "$@"
