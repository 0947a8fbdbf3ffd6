"""Validation and metrics: loss, perplexity, and the paper's Table 2 expert metrics.

Only rank 0 writes TensorBoard events; every rank takes part in the reductions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.model.moe import MoE
from peer_dist.model.peer import usage_metrics


class MetricsWriter:
    """Scalars from rank 0 into TensorBoard and ``metrics.jsonl`` (one JSON object per
    call: ``{"step": ..., tag: value, ...}``). A no-op on the other ranks.

    ``resume_step``: the step training continues after (0 for a new run). Whatever an
    earlier process logged after it is dropped - the rows of ``metrics.jsonl`` and, through
    TensorBoard's ``purge_step``, its events - because those steps are trained again.
    """

    def __init__(self, log_dir: Path, jsonl_path: Path, enabled: bool, tensorboard: bool = True,
                 resume_step: int = 0) -> None:
        self.log_dir, self._jsonl_path = log_dir, jsonl_path
        self._enabled, self._tensorboard = enabled, tensorboard
        self._writer = None
        self._jsonl = None
        if enabled:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self.rewind(resume_step)

    def rewind(self, step: int) -> None:
        """Forget everything logged after ``step`` (a resume or a rollback trains those steps again)."""
        if not self._enabled:
            return
        self.close()
        _drop_rows_after(self._jsonl_path, step)
        self._jsonl = open(self._jsonl_path, "a")
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def close(self) -> None:
        for handle in (self._writer, self._jsonl):
            if handle is not None:
                handle.close()
        self._writer = self._jsonl = None


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without the rows logged after ``step``, and without a torn last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a process killed mid-write
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tensor], device: torch.device) -> dict[str, float]:
    """Validation loss, perplexity and per-PEER/PKM-layer expert usage/unevenness.

    Collective over the default group: every rank must pass the same number of
    batches. Loss = (sum of token losses over all ranks) / (token count over all
    ranks); expert counts and gate mass are summed over ranks before the metrics.
    Runs the model in eval mode (BatchNorm uses its running statistics).
    """
    was_training = model.training
    model.eval()
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "track_usage")]  # PEER, PKM
    for _, layer in layers:
        layer.reset_usage()
        layer.track_usage(True)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, tokens]
    try:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            logits = model(batch[:, :-1])
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += torch.stack([loss_sum.double(), torch.tensor(batch[:, 1:].numel(), device=device, dtype=torch.float64)])
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp_min(1)).item()  # NOTE: host sync (once per evaluation)
        out = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)), "val/tokens": total[1].item()}
        for name, layer in layers:
            counts, mass = layer.usage_counts.clone(), layer.usage_mass.clone()
            dist.all_reduce(counts)
            dist.all_reduce(mass)
            for key, value in usage_metrics(counts, mass).items():
                out[f"experts/{name}/{key}"] = value
    finally:
        for _, layer in layers:
            layer.track_usage(False)
        model.train(was_training)
    return out


def router_metrics(model: nn.Module) -> dict[str, float]:
    """The last training forward's MoE router statistics per layer (already global over the DP group)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            for key, value in module.router_stats.items():
                out[f"moe/{name}/{key}"] = float(value)  # NOTE: host sync (once per log interval)
    return out
