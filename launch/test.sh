#!/usr/bin/env bash
# The test suite: install (same as the quickstart), then every test, slow ones included.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${PEER_DIST_VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/python" -m pytest -q -ra "$@"
