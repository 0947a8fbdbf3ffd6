"""Shared test helpers: run the CLI as one process or under torchrun, read run outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "PMI_", "OMPI_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_cli(args: list[str], nproc: int = 1, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`peer-dist ARGS` as one plain process (nproc=1) or under torchrun --standalone."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "peer_dist.cli", *args]
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "peer_dist.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint

    return load_module_state(resolve_checkpoint(run_dir))
