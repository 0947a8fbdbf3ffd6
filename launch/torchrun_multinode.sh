#!/usr/bin/env bash
# Train under torchrun on one node or several, with the c10d rendezvous (no static ranks).
# Run the same command on every node; extra arguments are config overrides.
#   one node:   bash launch/torchrun_multinode.sh train.max_steps=50
#   two nodes:  node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/torchrun_multinode.sh
#               node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash launch/torchrun_multinode.sh
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (2; GPUs per node on GPU nodes),
# MASTER_ADDR (127.0.0.1) / MASTER_PORT (29400): the rendezvous endpoint, hosted by node 0;
# RDZV_ID (peer-dist; must differ between jobs sharing an endpoint), CONFIG
# (configs/tiny.toml), MAX_RESTARTS (0), JOIN_TIMEOUT (600 s), SHUTDOWN_TIMEOUT (120 s).
# Inside a Slurm allocation prefer slurm/train.sbatch (srun starts the ranks itself).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEER_DIST_VENV:-.venv}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29400}
CONFIG=${CONFIG:-configs/tiny.toml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# c10d rendezvous: the agents meet in a TCP store at MASTER_ADDR:MASTER_PORT. With
# --rdzv-backend=c10d torchrun ignores --node-rank for rank assignment (ranks follow the
# order of arrival), so NODE_RANK only decides which node hosts that store (is_host):
# node 0, instead of torchrun guessing from whether MASTER_ADDR names this machine.
# join_timeout: how long the first agents wait for the others (slow node start-up);
# last_call_timeout: extra wait for stragglers once the minimum has joined;
# close_timeout: how long a closed rendezvous waits for agents to notice;
# read_timeout: one store request (a dead endpoint fails fast instead of hanging).
is_host=$([ "$NODE_RANK" = 0 ] && echo true || echo false)
rdzv_conf="is_host=$is_host,join_timeout=${JOIN_TIMEOUT:-600},last_call_timeout=30,close_timeout=60,read_timeout=60"

# --max-restarts: torchrun restarts ALL workers when one dies; the trainer then resumes
#   from the newest good checkpoint. Off by default (a bug should fail, not loop).
# --signals-to-handle: SIGUSR1 is Slurm's usual "time limit soon" signal; forward it to the
#   workers (the default list lacks it). --shutdown-timeout: how long the workers get to
#   write their checkpoint after a stop signal before torchrun sends SIGKILL.
# peer-dist torchrun = torchrun with these options, exiting with the workers' code (2 for a
# user error, 75 when they stopped on a stop signal after checkpointing) instead of 1.
exec "$VENV/bin/peer-dist" torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${NPROC_PER_NODE:-2}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-peer-dist}" \
  --rdzv-conf "$rdzv_conf" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
  train --config "$CONFIG" "$@"
