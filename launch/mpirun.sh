#!/usr/bin/env bash
# Train under mpirun (MPICH's hydra from the `mpich` wheel in .venv/bin by default).
# Each rank reads PMI_RANK/PMI_SIZE; mpi4py checks that MPI sees the same world and rank 0
# shares its address and a free port (MASTER_ADDR/MASTER_PORT), so nothing needs exporting.
# Extra arguments are config overrides:
#   bash launch/mpirun.sh train.max_steps=50
#   NPROC=16 HOSTS=node0:8,node1:8 bash launch/mpirun.sh
# Environment: NPROC (2) ranks in all; HOSTS (unset: this machine) hydra's host list;
# CONFIG (configs/tiny.toml); MPIRUN (.venv/bin/mpirun): use the mpirun of the MPI library
# mpi4py was built with, else every rank is a separate MPI world of 1 and training refuses
# to start (a launcher/world mismatch, exit code 2).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEER_DIST_VENV:-.venv}
MPIRUN=${MPIRUN:-$VENV/bin/mpirun}
CONFIG=${CONFIG:-configs/tiny.toml}
# Hydra passes the whole environment to every rank (including this).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
hosts=()
if [ -n "${HOSTS:-}" ]; then
  hosts=(-hosts "$HOSTS")  # hydra syntax; Open MPI's mpirun takes --host instead
fi
exec "$MPIRUN" -n "${NPROC:-2}" "${hosts[@]}" "$VENV/bin/python" -m peer_dist.cli train --config "$CONFIG" "$@"
