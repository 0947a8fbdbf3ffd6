#!/usr/bin/env bash
# Install a single-machine Slurm (controller + node daemons) and munge from the Debian
# packages, for the Slurm launcher tests (tests/slurm_cluster.py starts the daemons;
# nothing here starts or enables a service). Idempotent: a no-op when the binaries are
# already present. Needs root and apt-get.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
  && command -v sbatch >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: need root and apt-get to install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: the daemons and client commands only (no docs, no mail server).
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages' postinst may start munge/slurm services where systemd runs; the test
# fixture runs its own daemons on its own config, so stop any that were started.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl stop slurmd slurmctld munge >/dev/null 2>&1 || true
fi
echo "installed: ${need[*]}"
