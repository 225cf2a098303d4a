#!/usr/bin/env bash
# Set up .venv and run the CPU test suite: one pytest worker per core (pytest-xdist), one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n auto tests "$@"
