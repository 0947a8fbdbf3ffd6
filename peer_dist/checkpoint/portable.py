"""Model and optimizer state in a form that does not depend on the parallel layout.

What a checkpoint holds (``<step>/state/``):

    dense.pt                      rank 0: every non-expert parameter as a full fp32 tensor
                                  (ZeRO partitions gathered, AutoTP shards concatenated),
                                  its Adam moments, and the model's buffers
    experts/<layer>.ep<k>.pt      the owner of expert shard k (one file per layer and EP
                                  rank, never one per expert): rows of every expert
                                  parameter of that layer with their GLOBAL expert ids,
                                  plus their Adam moments (and, for row-sparse tables,
                                  every row's own Adam step count ``row_step``)

Names are those of the unsharded model (``blocks.2.ffn.experts.u``), so a checkpoint
written at one layout loads at any other: every rank takes the rows of its new shard
by global id (one old shard file at a time, never the whole table), slices its AutoTP
shard, and hands values and moments to DeepSpeed's ZeRO partitions through its public
``safe_set_full_*`` API (or to the torch optimizer directly without ZeRO).

Saving is collective: gathering a ZeRO-partitioned parameter is an all-reduce over
its data-parallel group, an AutoTP shard an all-gather over the TP group; every rank
walks the parameters in the same order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peer_dist.errors import CheckpointError
from peer_dist.parallel.deepspeed_private import has_partitioned_master
from peer_dist.parallel.layout import ParallelLayout

OPT_KEYS = ("exp_avg", "exp_avg_sq")
DENSE_FILE = "dense.pt"
EXPERTS_DIR = "experts"
_SHIM = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.\d+")


def canonical_name(name: str) -> str:
    """The parameter's name in the unsharded model (the expert-parallel wrapper path removed)."""
    return _SHIM.sub("", name)


def _tp_dim(name: str) -> int | None:
    """0 for column-, 1 for row-parallel AutoTP weights, None for replicated parameters."""
    from peer_dist.train.engine import TP_LAYER_SPECS

    for spec in TP_LAYER_SPECS:
        if any(re.fullmatch(pattern, name) for pattern in spec["patterns"]):
            return 0 if spec["partition_type"] == "column" else 1
    return None


def _expert_shardings(model: nn.Module) -> dict[int, Any]:
    """id(param) -> ExpertSharding for every expert-table parameter."""
    out = {}
    for module in model.modules():
        sharding = getattr(module, "sharding", None)
        if sharding is not None and hasattr(sharding, "global_ids"):
            for p in module.parameters(recurse=False):
                out[id(p)] = sharding
    return out


# ---------------------------------------------------------------------------- reading values out


def _full_value(p: Tensor, optimizer: Any, key: str | None) -> Tensor:
    """fp32 parameter (key None) or Adam moment, complete w.r.t. ZeRO; collective under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if has_partitioned_master(p):  # ZeRO 1/2 and the bf16 optimizer: partitions all-reduced
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return value.detach().float().cpu()
    if key is None:
        return p.detach().float().cpu()
    state = optimizer.state.get(p, {})
    return state[key].detach().float().cpu() if key in state else torch.zeros(p.shape)


def _table_optimizer(engine: Any) -> Any:
    """The engine's row-sparse table optimizer (peer_dist.train.sparse_tables), or None."""
    return getattr(engine, "table_optimizer", None)


def _table_values(p: Tensor, tables: Any) -> dict[str, Tensor]:
    """A row-sparse table's values (fp32 master under bf16), moments and per-row step counts."""
    state = tables.state_for(p)
    values = {"param": state.get("master", p).detach().float().cpu()}
    values.update({k: state[k].detach().cpu() for k in ("exp_avg", "exp_avg_sq", "row_step")})
    return values


def _gather_tp(value: Tensor, dim: int, group: Any, tp: int) -> Tensor:
    parts = [torch.empty_like(value) for _ in range(tp)]
    dist.all_gather(parts, value.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def optimizer_step_count(optimizer: Any) -> int:
    """Adam's step count (updates applied); the same for every parameter in our runs."""
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO / bf16 wrappers keep the torch optimizer here
    for state in base.state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def link_optimizer_states(optimizer: Any) -> None:
    """Make every ZeRO/bf16 parameter's Adam moments reachable through DeepSpeed's safe_*_full_* API.

    DeepSpeed (0.19.8) links each parameter to its slice of the flat optimizer state
    once, right after the FIRST parameter group's first update; groups updated after it
    (we have several: decay, no-decay, tables, MoE groups) stay unlinked, and before any
    update (resuming into a fresh engine) nothing is. Here: create Adam's state where it
    is missing (what AdamW's first step would create, moments at zero) and link again.
    A no-op for a plain torch optimizer (ZeRO 0 in fp32).
    """
    if not hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        return
    base = optimizer.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            state = base.state[flat]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(flat)
                state["exp_avg_sq"] = torch.zeros_like(flat)
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def collect_portable(engine: Any, layout: ParallelLayout, tp_group: Any, copy: bool = False) -> dict[str, Any]:
    """Collective: this rank's share of the checkpoint as {path relative to state/: object}.

    Rank 0 gets ``dense.pt``, the owner of each expert shard its ``experts/<layer>.epK.pt``
    files. ``copy``: detach every tensor from the live model (an asynchronous save writes
    them while training goes on; without copies fp32 CPU parameters would be shared).
    """
    rank = dist.get_rank()
    model, optimizer, tables = engine.module, engine.optimizer, _table_optimizer(engine)
    link_optimizer_states(optimizer)
    shardings = _expert_shardings(model)
    writes_experts = layout.tp_rank(rank) == 0 and layout.dp_index(rank) < layout.ep
    dense: dict[str, dict[str, Tensor]] = {}
    experts: dict[str, dict[str, dict[str, Tensor]]] = {}
    for name, p in model.named_parameters():
        if tables is not None and tables.owns(p):
            values = _table_values(p, tables)
        else:
            values = {"param": _full_value(p, optimizer, None), **{k: _full_value(p, optimizer, k) for k in OPT_KEYS}}
        if copy:
            values = {k: v.clone() for k, v in values.items()}
        canon = canonical_name(name)
        dim = _tp_dim(canon) if layout.tp > 1 else None
        if dim is not None:
            values = {k: _gather_tp(v, dim, tp_group, layout.tp) for k, v in values.items()}
        if id(p) in shardings:
            if writes_experts:
                layer, _, param = canon.rpartition(".")
                experts.setdefault(layer, {})[param] = {"rows": shardings[id(p)].global_ids(), **values}
        elif rank == 0:
            dense[canon] = values
    files: dict[str, Any] = {}
    if rank == 0:
        params = {n for n, _ in model.named_parameters()}
        buffers = {canonical_name(n): t.detach().cpu().clone() for n, t in model.state_dict().items()
                   if n not in params}
        files[DENSE_FILE] = {"params": dense, "buffers": buffers, "step_count": optimizer_step_count(optimizer)}
    for layer, params in experts.items():
        files[f"{EXPERTS_DIR}/{layer}.ep{layout.ep_rank(rank):03d}.pt"] = params
    return files


def write_files(folder: Path, files: dict[str, Any]) -> None:
    """torch.save each object of :func:`collect_portable` under ``folder``."""
    for relative, obj in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)


# ---------------------------------------------------------------------------- putting values back


def _set_value(p: Tensor, optimizer: Any, values: dict[str, Tensor], step_count: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    with torch.no_grad():
        p.data.copy_(values["param"].to(p.dtype))
        if has_partitioned_master(p):
            safe_set_full_fp32_param(p, values["param"].to(p.device))
            for key in OPT_KEYS:
                safe_set_full_optimizer_state(p, values[key].to(p.device), key)
            return
        state = optimizer.state[p]
        state["step"] = torch.tensor(float(step_count))
        for key in OPT_KEYS:
            state[key] = values[key].to(device=p.device, dtype=p.dtype).clone()


def _set_table_values(p: Tensor, tables: Any, values: dict[str, Tensor]) -> None:
    state = tables.state_for(p)
    with torch.no_grad():
        p.data.copy_(values["param"].to(p.dtype))
        if "master" in state:
            state["master"].copy_(values["param"])
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            state[key].copy_(values[key])


def _set_step_count(optimizer: Any, step_count: int) -> None:
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        if "step" in state:
            state["step"] = torch.full_like(torch.as_tensor(state["step"], dtype=torch.float32), float(step_count))


def _tp_slice(value: Tensor, dim: int, layout: ParallelLayout, rank: int) -> Tensor:
    return value.chunk(layout.tp, dim=dim)[layout.tp_rank(rank)]


def expert_files_to_read(names: list[str], layout: ParallelLayout, rank: int, saved_ep: int | None) -> list[str]:
    """Of a checkpoint's state files (``names``, relative to ``state/``), the expert shards ``rank`` reads.

    ``saved_ep``: the saving run's EP size when it used the same owner layout as this run
    (``parallel.expert_layout``), else None. Under either layout EP rank r of E holds the
    r-th of E equal ranges of expert positions (ids, or permuted ids: the same positions
    for every E), so rank r needs exactly the saved shards k whose range [k/E', (k+1)/E')
    meets [r/E, (r+1)/E): its own shard at an unchanged EP size, one or two when E changes
    by a factor of two. Without that knowledge (another owner layout, an older checkpoint)
    it reads every shard. Rows are then picked by global id from what was read.
    """
    experts = sorted(n for n in names if n.startswith(f"{EXPERTS_DIR}/"))
    if saved_ep is None:
        return experts
    new_ep, r = layout.ep, layout.ep_rank(rank)

    def needed(name: str) -> bool:
        k = int(name.rsplit(".ep", 1)[1].removesuffix(".pt"))
        return k * new_ep < (r + 1) * saved_ep and r * saved_ep < (k + 1) * new_ep

    return [n for n in experts if needed(n)]


def load_portable(folder: Path, engine: Any, layout: ParallelLayout, expert_files: set[str] | None = None) -> int:
    """Put the saved model and optimizer state into ``engine`` at THIS layout; returns Adam's step count.

    ``expert_files``: the expert shard files to read (relative to ``folder``, see
    :func:`expert_files_to_read`); None reads every shard.
    """
    rank = dist.get_rank()
    model, optimizer, tables = engine.module, engine.optimizer, _table_optimizer(engine)
    saved = torch.load(folder / DENSE_FILE, map_location="cpu", weights_only=False)
    step_count = saved["step_count"]
    link_optimizer_states(optimizer)
    shardings = _expert_shardings(model)
    expert_values = _assemble_expert_rows(folder, model, shardings, step_count, expert_files)
    for name, p in model.named_parameters():
        canon = canonical_name(name)
        if id(p) in shardings:
            values = expert_values[canon]
        else:
            if canon not in saved["params"]:
                raise CheckpointError(f"checkpoint {folder.parent} has no parameter {canon}: another model?")
            values = saved["params"][canon]
            dim = _tp_dim(canon) if layout.tp > 1 else None
            if dim is not None:
                values = {k: _tp_slice(v, dim, layout, rank) for k, v in values.items()}
        if values["param"].shape != p.shape:
            raise CheckpointError(f"checkpoint {folder.parent}: {canon} has shape {tuple(values['param'].shape)}, "
                                  f"this model {tuple(p.shape)}")
        if tables is not None and tables.owns(p):
            _set_table_values(p, tables, values)
        else:
            _set_value(p, optimizer, values, step_count)
    _set_step_count(optimizer, step_count)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            canon = canonical_name(name)
            if canon in saved["buffers"]:
                buf.copy_(saved["buffers"][canon])
    return step_count


def _assemble_expert_rows(folder: Path, model: nn.Module, shardings: dict[int, Any], step_count: int,
                          only: set[str] | None = None) -> dict[str, dict[str, Tensor]]:
    """For every local expert parameter, its rows (and moments) by global id from the saved shard files.

    ``row_step`` (per-row Adam step counts of row-sparse tables) is read where saved; a
    checkpoint written with dense table updates gives every row with a non-zero second
    moment the dense step count ``step_count`` and the others 0.
    """
    named = {canonical_name(n): p for n, p in model.named_parameters() if id(p) in shardings}
    by_layer: dict[str, list[str]] = {}
    for canon in named:
        by_layer.setdefault(canon.rpartition(".")[0], []).append(canon)
    out: dict[str, dict[str, Tensor]] = {}
    for layer, canons in by_layer.items():
        files = [f for f in sorted((folder / EXPERTS_DIR).glob(f"{layer}.ep*.pt"))
                 if only is None or f"{EXPERTS_DIR}/{f.name}" in only]
        if not files:
            raise CheckpointError(f"checkpoint {folder.parent} has no expert files for {layer}")
        sharding = shardings[id(named[canons[0]])]
        local_of = torch.full((sharding.num_experts,), -1, dtype=torch.int64)
        local_of[sharding.global_ids()] = torch.arange(sharding.rows_per_rank)
        filled = torch.zeros(sharding.rows_per_rank, dtype=torch.bool)
        for canon in canons:
            p = named[canon]
            out[canon] = {k: torch.zeros(p.shape) for k in ("param", *OPT_KEYS)}
            out[canon]["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64)
        for f in files:  # one saved shard in memory at a time
            saved = torch.load(f, map_location="cpu", weights_only=False)
            for canon in canons:
                entry = saved[canon.rpartition(".")[2]]
                if "row_step" not in entry:  # saved with dense table updates
                    # (a row of an MoE expert weight is a whole (d_in, d_out) matrix: any over the rest)
                    entry["row_step"] = torch.where(entry["exp_avg_sq"].ne(0).flatten(1).any(1), step_count, 0)
                target = local_of[entry["rows"]]
                mine = target >= 0
                for key in ("param", *OPT_KEYS, "row_step"):
                    out[canon][key][target[mine]] = entry[key][mine]
                filled[target[mine]] = True
            del saved
        if not bool(filled.all()):
            raise CheckpointError(f"checkpoint {folder.parent}: expert files of {layer} miss "
                                  f"{int((~filled).sum())} of this rank's rows (incomplete save?)")
    return out


# ---------------------------------------------------------------------------- the unsharded model


def full_model_state(folder: Path) -> dict[str, Tensor]:
    """The unsharded state dict (full expert tables): for `peer-dist eval` and exports."""
    saved = torch.load(folder / DENSE_FILE, map_location="cpu", weights_only=False)
    state = {name: v["param"] for name, v in saved["params"].items()}
    state.update(saved["buffers"])
    tables: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for f in sorted((folder / EXPERTS_DIR).glob("*.ep*.pt")):
        layer = f.name.rsplit(".ep", 1)[0]
        for param, entry in torch.load(f, map_location="cpu", weights_only=False).items():
            tables.setdefault(f"{layer}.{param}", []).append((entry["rows"], entry["param"]))
    for name, parts in tables.items():
        rows = torch.cat([r for r, _ in parts])
        full = torch.empty((len(rows), *parts[0][1].shape[1:]))
        full[rows] = torch.cat([v for _, v in parts])
        state[name] = full
    return state
