"""DeepSpeed engine for the dense weights: its JSON is generated from the typed config.

Never edit a DeepSpeed JSON by hand: :func:`deepspeed_config` is the one place
where ``train.*`` keys become DeepSpeed settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peer_dist.config import Config, TrainConfig
from peer_dist.model.peer import PEER


def deepspeed_config(train: TrainConfig, dp_world: int) -> dict[str, Any]:
    """DeepSpeed JSON for ``train`` at data-parallel size ``dp_world``."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * dp_world,
        # ZeRO-0 in fp32 clips without reporting the norm: there we clip ourselves.
        "gradient_clipping": 0.0 if clips_manually(train) else train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # We pass a torch AdamW (there is no fused CPU Adam); DeepSpeed must be told
        # that ZeRO may partition a client optimizer.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 1 << 30,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }


def clips_manually(train: TrainConfig) -> bool:
    """True when the trainer (not DeepSpeed) clips and measures the gradient norm."""
    return train.zero_stage == 0 and train.precision == "fp32"


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 grad norm over all parameters; clipped to ``max_norm`` (0: measure only).

    Called after the last micro-step's backward (gradients already averaged over
    data-parallel ranks by DeepSpeed) and before the optimizer step.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on vectors (norms) and on PEER tables.

    PEER expert tables and product keys are not decayed: a row is only retrieved by a
    few tokens per step while decoupled decay would shrink every row every step, so
    rarely used experts would fade regardless of their value (PKM and Memory Layers
    train their memories without weight decay for the same reason).
    """
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, PEER)
                    for p in (m.expert_u, m.expert_v, m.sub_keys)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def lr_lambda(train: TrainConfig) -> Any:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine

    return factor


def build_engine(model: nn.Module, cfg: Config, dp_world: int) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warmup+cosine schedule.

    Gradient reduction (done by DeepSpeed): each rank's loss is the mean over its
    micro-batch tokens; DeepSpeed divides it by ``grad_accum`` and averages the
    gradients over the ``dp_world`` ranks, so the update is the gradient of the mean
    loss over the whole global batch (every micro-batch has the same token count).
    """
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(t, dp_world),
    )
    return engine
