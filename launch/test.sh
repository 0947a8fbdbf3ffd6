#!/usr/bin/env bash
# The test suite: install (same as the quickstart), then every test, slow ones included.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${PEER_DIST_VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The Slurm launcher tests (-m slurm) start a private cluster from the Debian packages;
# install them first when they are missing and we may (root + apt-get).
if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash launch/install_slurm.sh || echo "launch/install_slurm.sh failed: the slurm tests will say why they skip" >&2
fi
exec "$VENV/bin/python" -m pytest -q -ra "$@"
