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
    # The checkout first; keep a PYTHONPATH that holds dependencies (launch/gpu_check.sh installs there).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
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


def assert_same_run(run: Path, reference: Path, steps: int = 4) -> None:
    """Same losses and same final weights as the reference run (tight fp32 tolerances).

    Losses: 1e-5 relative per step. Weights: per tensor, 1e-5 relative in norm and 1e-5
    absolute per element. The element bound sits far below one optimizer step (lr 3e-3
    moves a weight ~3e-3 per step under Adam) yet above the fp32 noise that Adam's
    normalisation amplifies for gradients near zero, which differ in summation order.
    """
    ref_losses, losses = train_losses(reference), train_losses(run)
    assert len(losses) == len(ref_losses) == steps
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    ref_w, w = final_weights(reference), final_weights(run)
    assert ref_w.keys() == w.keys()
    for name, ref in ref_w.items():
        got = w[name].double()
        ref = ref.double()
        assert got.shape == ref.shape, name
        diff = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        assert diff <= 1e-5, f"{name}: relative difference {float(diff):.2e}"
        assert (got - ref).abs().max() <= 1e-5, f"{name}: max abs difference {float((got - ref).abs().max()):.2e}"
    # The run actually moved the weights (so equality above is not the initial state twice).
    assert losses[-1] < losses[0]


def small_lm(ffn: str, seed: int = 0, vocab: int = 257, **model: Any) -> torch.nn.Module:
    """A small LM of one feed-forward kind in every other block, in eval mode, with non-trivial
    query-BatchNorm running statistics (so a test sees whether inference uses them)."""
    from peer_dist.config import from_dict
    from peer_dist.model import build_model
    from peer_dist.model.retrieval import QueryBatchNorm

    settings = {"d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 48, "ffn": ffn, "ffn_blocks": [0, 2],
                "peer": {"num_experts": 256, "heads": 2, "topk": 4, "d_key": 16},
                "pkm": {"num_values": 256, "heads": 2, "topk": 4, "d_key": 16},
                "moe": {"num_experts": 4, "topk": 2, "d_expert": 24}, **model}
    cfg = from_dict({"model": settings}).model
    torch.manual_seed(seed)
    lm = build_model(cfg, vocab)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, QueryBatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return lm.eval()
