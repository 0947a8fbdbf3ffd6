"""Every private DeepSpeed API peer_dist depends on, in one place.

DeepSpeed is pinned (pyproject.toml) and ``tests/test_deepspeed_contract.py`` runs these
functions against it on real gloo ranks: an upgrade that changes any of them fails
there first, instead of silently averaging expert gradients over the wrong ranks. The
rest of the code uses DeepSpeed's public API (``deepspeed.initialize``,
``safe_get/set_full_*``) or these functions, never ``deepspeed.utils.groups._*`` or
optimizer internals directly.

What we depend on and why:

* the MoE layer class: DeepSpeed treats parameters as expert parameters (reduced over
  the expert-data-parallel group, partitioned by ZeRO over it) only when their module
  is an instance of ``deepspeed.moe.layer.MoE``; parameter attributes ``allreduce`` and
  ``group_name`` name the group;
* the expert and data-parallel group tables of ``deepspeed.utils.groups`` (created by
  ``_create_expert_and_data_parallel``, read by ``_get_*_group``);
* ``_init_tp_mesh_device``, DeepSpeed's own TP/DP groups, passed as ``mpu``;
* ``_hp_mapping`` on parameters whose fp32 master lives in a ZeRO/bf16 partition;
* the gradient-norm methods of ZeRO 1/2 (``scaled_global_norm``) and of the bf16
  optimizer at ZeRO 0 (``unscale_and_clip_grads``, ``loss_scale_config``), wrapped so the
  global norm includes the row-sparse expert tables kept outside DeepSpeed;
* ``deepspeed.ops.__compatible_ops__``, to skip the JIT build of an op we never use.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op at init_distributed.

    We never use it (it serves DeepSpeed's inference all-reduce), and the build holds a
    file lock in the torch extensions folder: a process killed during the build (a
    preemption, a crash, a kill -9 of the job) leaves the lock behind, and every later
    start on that machine waits on it forever. Marking the op incompatible makes
    DeepSpeed skip it (deepspeed/comm/torch.py build_shm_op).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---------------------------------------------------------------------------- expert parameters


def moe_layer_class() -> type:
    """DeepSpeed's MoE layer: wrappers of expert shards derive from it (its __init__ is not called)."""
    from deepspeed.moe.layer import MoE

    return MoE


def mark_expert_parameter(param: nn.Parameter, group_name: str) -> None:
    """Make DeepSpeed reduce ``param`` over the expert-data-parallel group ``group_name`` only."""
    param.allreduce = False
    param.group_name = group_name


def is_expert_parameter(param: Tensor) -> bool:
    return not getattr(param, "allreduce", True)


def count_in_every_tp_lane(param: nn.Parameter) -> None:
    """Make ZeRO's gradient norm count ``param`` on every TP rank (model-parallel), not on lane 0 only."""
    param.model_parallel = True


def split_moe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DeepSpeed's MoE optimizer groups: expert params move to their own groups ('moe': True)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


# ---------------------------------------------------------------------------- process groups


def ensure_expert_groups(group_name: str, ep: int, tp: int) -> None:
    """Create DeepSpeed's expert and expert-data-parallel groups of size ``ep`` (once per name)."""
    from deepspeed.utils import groups

    if group_name not in groups._get_expert_parallel_group_dict():
        if tp > 1:
            groups._create_expert_and_data_parallel(ep, mp_size=tp, mp_mode="tp")
        else:
            groups._create_expert_and_data_parallel(ep)


def expert_group_ranks(group_name: str) -> tuple[list[int], list[int]]:
    """(expert-parallel ranks, expert-data-parallel ranks) of this rank's groups, as DeepSpeed built them."""
    from deepspeed.utils import groups

    return (list(groups._EXPERT_PARALLEL_GROUP_RANKS.get(group_name, [])),
            list(groups._EXPERT_DATA_PARALLEL_GROUP_RANKS.get(group_name, [])))


def expert_parallel_group(group_name: str) -> Any:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(group_name)


def expert_data_parallel_group(group_name: str) -> Any:
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(group_name)


def data_parallel_group() -> Any:
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()


def tensor_parallel_group() -> Any:
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_group()


def init_tensor_parallel_groups(tp: int) -> Any:
    """DeepSpeed's own TP/DP groups (TP innermost); returns the ``mpu`` for ``deepspeed.initialize``."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return groups


# ---------------------------------------------------------------------------- optimizer internals


def has_partitioned_master(param: Tensor) -> bool:
    """Whether ``param``'s fp32 master and optimizer state live in a ZeRO 1/2 or bf16 partition."""
    return hasattr(param, "_hp_mapping")


def add_to_global_grad_norm(optimizer: Any, extra_sq_norm: Callable[[], Tensor]) -> None:
    """Make DeepSpeed's global gradient norm (clipping, overflow check, reported norm) include
    ``extra_sq_norm()``, a squared norm identical on every rank, of gradients DeepSpeed does not hold.

    ZeRO 1/2: ``scaled_global_norm`` returns the norm times the loss scale. bf16 at ZeRO 0
    (the unfused fp16/bf16 optimizer): ``unscale_and_clip_grads`` receives the loss-scaled
    norm and records ``_global_grad_norm``.
    """
    if hasattr(optimizer, "scaled_global_norm"):
        original_norm = optimizer.scaled_global_norm

        def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
            norm = original_norm(norm_type)
            if float(norm) < 0:  # DeepSpeed's sentinel for an invalid (NaN/Inf) norm
                return norm
            extra = extra_sq_norm().to(norm.device, torch.float64) * float(optimizer.loss_scale) ** 2
            return (norm.double().square() + extra).sqrt().to(norm.dtype)

        optimizer.scaled_global_norm = scaled_global_norm
    elif hasattr(optimizer, "unscale_and_clip_grads") and hasattr(optimizer, "loss_scale_config"):
        original_clip = optimizer.unscale_and_clip_grads

        def unscale_and_clip_grads(total_norm: Any, apply_scale: bool = True) -> Any:
            scale = float(optimizer.loss_scale_config.cur_scale)
            total = math.sqrt(float(total_norm) ** 2 + float(extra_sq_norm()) * scale**2)
            optimizer._global_grad_norm = total
            return original_clip(total, apply_scale)

        optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    else:
        raise RuntimeError(f"cannot add the expert tables' gradient norm to {type(optimizer).__name__}'s; "
                           "use train.expert_update='dense'")
