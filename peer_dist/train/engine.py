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
from peer_dist.model.pkm import PKM
from peer_dist.model.retrieval import ProductKeyLayer
from peer_dist.parallel.deepspeed_private import (add_to_global_grad_norm, count_in_every_tp_lane, data_parallel_group,
                                                  expert_data_parallel_group, expert_parallel_group,
                                                  init_tensor_parallel_groups, is_expert_parameter,
                                                  split_moe_param_groups)
from peer_dist.parallel.layout import ParallelLayout
from peer_dist.train.optim import GuardedAdamW
from peer_dist.train.sparse_tables import SparseTableAdamW, TableSpec

# AutoTP partition plan for our transformer (explicit: AutoTP's heuristics need HF models).
# Column-parallel: q/k/v projections and the dense MLP input (and gate); row-parallel
# (output all-reduced): the attention output and the MLP output. Everything else -
# embeddings, norms, PEER/MoE layers - stays replicated over the TP group.
TP_LAYER_SPECS = [
    {"patterns": [r".*\.attn\.w[qkv]\.weight$", r".*\.ffn\.fc_(in|gate)\.weight$"], "partition_type": "column"},
    {"patterns": [r".*\.attn\.wo\.weight$", r".*\.ffn\.fc_out\.weight$"], "partition_type": "row"},
]


def deepspeed_config(train: TrainConfig, dp_world: int, tp: int = 1) -> dict[str, Any]:
    """DeepSpeed JSON for ``train`` at data-parallel size ``dp_world`` and tensor-parallel size ``tp``."""
    config = {
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
    if tp > 1:
        config["tensor_parallel"] = {
            "autotp_size": tp,
            "partition_config": {"use_default_specs": False, "layer_specs": TP_LAYER_SPECS},
        }
    return config


def clips_manually(train: TrainConfig) -> bool:
    """True when the trainer (not DeepSpeed) clips and measures the gradient norm."""
    return train.zero_stage == 0 and train.precision == "fp32"


def clip_gradients(model: nn.Module, max_norm: float, ep_group: Any = None, tp_group: Any = None,
                   extra_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Global L2 grad norm over all parameters; clipped to ``max_norm`` (0: measure only).

    ``extra_sq``: the squared norm of gradients that live outside ``.grad`` (row-sparse
    tables, already summed over every rank); it counts in the norm, and the caller scales
    those gradients by the same factor (:func:`~peer_dist.train.sparse_tables.clip_scale`).

    Called after the last micro-step's backward (gradients already averaged over
    data-parallel ranks by DeepSpeed) and before the optimizer step. Sharded
    parameters differ between ranks: expert shards (``allreduce=False``) across the
    EP group, AutoTP shards (``tensor_model_parallel``) across the TP group. Their
    squared norms are summed over that group, replicated ones counted once, so every
    rank computes the norm of the whole model and clips by the same factor.
    """
    import torch.distributed as dist

    kinds: dict[str, list[torch.Tensor]] = {"replicated": [], "tp": [], "expert": []}
    for p in model.parameters():
        if p.grad is None:
            continue
        kind = "expert" if is_expert_parameter(p) else "tp" if getattr(p, "tensor_model_parallel", False) \
            else "replicated"
        kinds[kind].append(p.grad)
    device = next(model.parameters()).device
    # One fused fp32 norm per tensor (a float64 copy of a 1M-row table costs 50x more), squares
    # summed in float64.
    sq = {k: (torch.stack([torch.linalg.vector_norm(g.detach()).double() for g in grads]).pow(2).sum() if grads
              else torch.zeros((), dtype=torch.float64, device=device)) for k, grads in kinds.items()}
    for kind, group in (("tp", tp_group), ("expert", ep_group)):
        if group is not None:
            dist.all_reduce(sq[kind], group=group)
    norm = (sum(sq.values()) + (extra_sq if extra_sq is not None else 0.0)).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        for grads in kinds.values():
            for grad in grads:
                grad.mul_(scale)
    return norm.float()


def param_groups(model: nn.Module, weight_decay: float, table_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on vectors (norms), product keys and tables.

    ``table_lr`` is the tables' own peak learning rate (train.lr * train.table_lr_scale; the
    schedule scales it like every other group's). Memory Layers at Scale trains its memory
    values at a higher rate than the dense weights: a row gets a gradient only from the few
    tokens that retrieve it.

    Tables with row-sparse gradients (train.expert_update = "sparse") have
    ``requires_grad=False`` and their own optimizer: they are in no group here.

    PEER expert tables and product keys are not decayed: a row is only retrieved by a
    few tokens per step while decoupled decay would shrink every row every step, so
    rarely used experts would fade regardless of their value (PKM and Memory Layers
    train their memories without weight decay for the same reason).
    """
    tables = {id(p) for p in table_parameters(model)}
    keys = {id(m.sub_keys) for m in model.modules() if isinstance(m, ProductKeyLayer)}
    decay, no_decay, table = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in tables:
            table.append(p)
        else:
            (no_decay if p.ndim < 2 or id(p) in keys else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
              {"params": table, "weight_decay": 0.0, "name": "tables"}]
    if table_lr is not None:
        groups[2]["lr"] = table_lr
    # Nothing dense trains (train.trainable = "experts", row-sparse tables): one empty group keeps the
    # optimizer (and DeepSpeed's schedule) valid; it updates nothing.
    return [g for g in groups if g["params"]] or groups[:1]


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Row-indexed tables a step touches sparsely: PEER expert u/v (local shard) and PKM values."""
    out = []
    for m in model.modules():
        if isinstance(m, PEER):
            out += [m.expert_u, m.expert_v]
        elif isinstance(m, PKM):
            out.append(m.value_table.weight)
    return out


def freeze_outside(model: nn.Module, trainable: str) -> None:
    """train.trainable = "peer" | "added" | "experts": every parameter outside the PEER layers (the
    layers model.add_peer added, the expert tables) stops training (``requires_grad=False``: no gradient, in no
    optimizer group, bit-identical after training)."""
    if trainable == "all":
        return
    if trainable == "experts":
        inside = {id(p) for p in table_parameters(model)}
    else:
        kept = (lambda m: isinstance(m, PEER)) if trainable == "peer" else (lambda m: getattr(m, "added", False))
        inside = {id(p) for m in model.modules() if kept(m) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)


def old_expert_row_scales(model: nn.Module, grown_from: int, scale: float) -> dict[int, torch.Tensor]:
    """id(table) -> (L,) learning-rate factor per local row: ``scale`` for the experts from
    before growth (model.peer.grown_from), 1 for the new ones; empty when nothing differs."""
    from peer_dist.checkpoint.grow import old_expert_mask

    if not grown_from or scale == 1.0:
        return {}
    out = {}
    for m in model.modules():
        if isinstance(m, PEER):
            tables = m.expert_tables
            old = old_expert_mask(tables.sharding.global_ids(), grown_from, m.num_sub_keys)
            factor = torch.where(old, scale, 1.0).to(tables.u.device)
            out[id(tables.u)] = out[id(tables.v)] = factor
    return out


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


def build_engine(model: nn.Module, cfg: Config, layout: ParallelLayout) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warmup+cosine schedule.

    Gradient reduction (done by DeepSpeed): each rank's loss is the mean over its
    micro-batch tokens; DeepSpeed divides it by ``grad_accum`` and averages the dense
    gradients over the ``layout.dp`` data-parallel ranks, so the update is the
    gradient of the mean loss over the whole global batch (every micro-batch has the
    same token count). Expert shards are summed over their expert-data-parallel group
    and divided by the same ``layout.dp`` (see peer_dist/parallel/expert_parallel.py).

    With train.expert_update = "sparse" (default) the expert tables stay out of
    DeepSpeed: ``engine.table_optimizer`` (:class:`SparseTableAdamW`) reduces and updates
    their row-sparse gradients, and DeepSpeed's gradient norm includes theirs.
    """
    import deepspeed

    t = cfg.train
    freeze_outside(model, t.trainable)
    tables = None
    trained_tables = [p for p in table_parameters(model) if p.requires_grad]  # frozen by train.trainable: none
    if t.expert_update == "sparse" and trained_tables:
        scales = old_expert_row_scales(model, cfg.model.peer.grown_from, t.old_expert_lr_scale)
        specs = [TableSpec(p, row_scale=scales.get(id(p))) for p in trained_tables]
        tables = SparseTableAdamW(specs, lr=t.lr * t.table_lr_scale,
                                  betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0,
                                  grad_divisor=layout.dp, lr_factor=lr_lambda(t))
    groups = param_groups(model, t.weight_decay, table_lr=t.lr * t.table_lr_scale)
    if layout.ep > 1:
        # DeepSpeed's MoE optimizer groups: expert params get their own groups ('moe': True)
        # that ZeRO partitions over the expert-data-parallel group only.
        groups = split_moe_param_groups(groups)
        # A group whose params all moved into MoE groups stays behind empty; DeepSpeed drops
        # empty groups later, which would leave the lr scheduler with one lr too many.
        groups = [g for g in groups if g["params"]] or groups[:1]  # see param_groups: nothing dense trains
    optimizer = GuardedAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    mpu = None
    if layout.tp > 1:
        # DeepSpeed's own TP/DP groups (TP-innermost, as ParallelLayout), created before the
        # engine so its batch-size check counts data-parallel ranks (world / tp), not the world.
        mpu = init_tensor_parallel_groups(layout.tp)
    if layout.ep > 1 and layout.tp > 1:
        _count_expert_norms_on_every_lane(model)
    if layout.ep > 1:
        from peer_dist.parallel.expert_parallel import create_expert_groups

        create_expert_groups(model)  # wrappers of row-sparse tables are no DeepSpeed MoE layers
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
        config=deepspeed_config(t, layout.dp, layout.tp),
    )
    engine.table_optimizer = tables
    _fit_scheduler_to_groups(engine)
    if tables is not None:
        _set_table_groups(tables, layout)
        if not clips_manually(t):
            include_table_norm(engine.optimizer, tables)
    return engine


def _fit_scheduler_to_groups(engine: Any) -> None:
    """DeepSpeed drops an empty parameter group (param_groups keeps one when nothing dense trains):
    the schedule then has one lr too many for the groups that are left."""
    scheduler, groups = engine.lr_scheduler, engine.optimizer.param_groups
    if len(scheduler.lr_lambdas) > len(groups):
        scheduler.lr_lambdas = scheduler.lr_lambdas[:len(groups)]
        scheduler.base_lrs = scheduler.base_lrs[:len(groups)]
        scheduler._last_lr = scheduler._last_lr[:len(groups)]


def table_optimizer(engine: Any) -> SparseTableAdamW | None:
    """The engine's row-sparse table optimizer (None with train.expert_update = "dense")."""
    return getattr(engine, "table_optimizer", None)


def _set_table_groups(tables: SparseTableAdamW, layout: ParallelLayout) -> None:
    """Replica and shard groups of the tables, from DeepSpeed's groups (created by now).

    Without EP the replicas are the data-parallel group (TP lanes hold identical copies
    and identical gradients: each counted once). With EP the replicas of a shard are its
    expert-data-parallel group, and the shards of a table form the EP group.
    """
    if layout.ep > 1:
        name = f"ep_size_{layout.ep}"
        replica, shard = expert_data_parallel_group(name), expert_parallel_group(name)
    else:
        replica, shard = (data_parallel_group() if layout.dp > 1 else None), None
    for spec in tables.tables:
        spec.replica_group, spec.shard_group = replica, shard


def include_table_norm(optimizer: Any, tables: SparseTableAdamW) -> None:
    """Make DeepSpeed's global gradient norm include the tables'.

    The trainer stores the tables' squared norm (summed over all ranks, identical
    everywhere) in ``tables.pending_sq_norm`` before ``engine.step()``.
    """
    add_to_global_grad_norm(optimizer, lambda: tables.pending_sq_norm)


def _count_expert_norms_on_every_lane(model: nn.Module) -> None:
    """ZeRO's gradient norm counts a parameter that is not model-parallel only on TP rank 0, but with
    TP > 1 the expert-data-parallel group spans the TP lanes, so ZeRO partitions each expert shard
    ACROSS the lanes: counted on lane 0 only, part of the expert gradient is missing from the norm
    (measured: clipping then differs from one process by ~4e-4 relative). Marked model-parallel,
    every lane counts its partition and ZeRO's sum over the TP group adds them up."""
    for p in model.parameters():
        if is_expert_parameter(p):
            count_in_every_tp_lane(p)
