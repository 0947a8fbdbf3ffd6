"""Expert parallelism: expert tables sharded over an EP group, tokens dispatched with all_to_all.

Shape suffixes:
    T  this rank's tokens           J  slots per token (PEER: heads * topk; MoE: topk)
    S  slots (token, expert), flat  C  (token, destination rank) pairs this rank sends
    R  (token, source rank) pairs this rank received     D  d_model     E  EP group size

A layer's forward in named phases (Megatron-Core style), each all_to_all in its own function:

1. route      owner rank and local row of every retrieved expert; group the slots by
              (destination, token). Each token becomes ONE pair per destination rank,
              whatever the number of its experts there.
2. dispatch   two-phase, dropless: ``_exchange_counts`` sends the per-destination
              [pairs, slots] counts (E x 2 integers, never per-expert histograms); then
              ``_exchange_slots`` sends each pair's slot count and each slot's expert row
              (int32) and ``_exchange_payload`` each pair's hidden row plus each slot's gate.
3. compute    the owner runs its experts on the rows it received:
              partial[p] = sum over the pair's slots g * sigma(u . x_p) * v (PEER), or
              g * MLP_e(x_p) (MoE) - one partial row per (token, rank).
4. combine    ``_return_partials`` sends the partial rows back; the source adds them
              per token (index_add).

Backward runs through :func:`peer_dist.parallel.collectives.all_to_all`, whose backward is the all_to_all with
the splits swapped. Every rank enters every collective, also with zero rows.
Bytes per token: 2 * D * (destinations per token) values for the rows, plus per
slot its gate (one value) and its expert row (int32), plus one int32 per pair; the
lower bound is 2 * D * (distinct destination ranks per token) values.

Gradient bookkeeping (why expert grads come out right): the owner's table gradient
sums contributions of tokens from every rank of its EP group (through the
backward all_to_all); DeepSpeed then sums over the expert-data-parallel group and
divides by the dense data-parallel size W / TP, so the result is the gradient of
the mean loss over the global batch, exactly as for dense weights.

With tensor parallelism the TP ranks hold identical tokens: each TP rank dispatches
only its contiguous slice (duplicates dropped) and the outputs are all-gathered;
the backward of the slice all-gathers the input gradients, so every TP rank ends
with the full, identical gradient for the replicated retrieval weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peer_dist.model.expert_ops import ExpertRouting
from peer_dist.parallel.collectives import all_to_all
from peer_dist.parallel.deepspeed_private import (ensure_expert_groups, expert_parallel_group, mark_expert_parameter,
                                                  moe_layer_class, tensor_parallel_group)
from peer_dist.parallel.layout import ParallelLayout, check_deepspeed_groups

_INT_BYTES = 4  # slot counts and expert rows travel as int32; the E x 2 counts as int64


# ---------------------------------------------------------------------------- the phases


@dataclass
class _Plan:
    """The send side of one dispatch."""

    pair_token_C: Tensor  # (C,) token of each pair, grouped by destination rank
    slots_per_pair_C: Tensor  # (C,) int32 number of slots (experts) of each pair
    slot_order_S: Tensor  # (S,) permutation of the flat slots grouping them by (destination, token)
    local_row_S: Tensor  # (S,) int32 owner-local expert row of each grouped slot
    counts_E2: Tensor  # (E, 2) pairs and slots sent to each rank
    send_pairs: list[int] = field(default_factory=list)  # host copies, filled by _exchange_counts
    send_slots: list[int] = field(default_factory=list)


@dataclass
class _Received:
    """The receive side: pairs and slots from every source rank, in source order."""

    recv_pairs: list[int]
    recv_slots: list[int]
    local_row_S: Tensor | None = None  # (S_r,) int64 local expert row of each received slot
    row_S: Tensor | None = None  # (S_r,) received pair (0..R-1) each slot belongs to, non-decreasing


def _route(ids_TJ: Tensor, sharding: Any, num_ranks: int) -> _Plan:
    """Phase "route": group the slots by (destination rank, token); one pair per (token, destination)."""
    num_tokens, num_slots = ids_TJ.shape
    stride = max(num_tokens, 1)
    with torch.no_grad():
        dest_S = sharding.owner(ids_TJ).reshape(-1)
        token_S = torch.arange(num_tokens, device=ids_TJ.device).repeat_interleave(num_slots)
        key_sorted, order_S = torch.sort(dest_S * stride + token_S, stable=True)
        pair_keys_C, slots_per_pair_C = torch.unique_consecutive(key_sorted, return_counts=True)
        pair_dest_C = torch.div(pair_keys_C, stride, rounding_mode="floor")
        pairs_E = torch.bincount(pair_dest_C, minlength=num_ranks)
        slots_E = torch.bincount(dest_S, minlength=num_ranks)
        local_row_S = sharding.local_row(ids_TJ).reshape(-1)[order_S].to(torch.int32)
    return _Plan(pair_keys_C - pair_dest_C * stride, slots_per_pair_C.to(torch.int32), order_S, local_row_S,
                 torch.stack([pairs_E, slots_E], dim=1))


def _exchange_counts(plan: _Plan, group: Any) -> _Received:
    """Dispatch phase 1: every rank learns how many pairs and slots each source sends it."""
    recv_E2 = torch.empty_like(plan.counts_E2)
    dist.all_to_all_single(recv_E2, plan.counts_E2, group=group)
    # NOTE: host sync: the payload all_to_alls need their split sizes as Python ints.
    send, recv = plan.counts_E2.tolist(), recv_E2.tolist()
    plan.send_pairs, plan.send_slots = [c[0] for c in send], [c[1] for c in send]
    return _Received([c[0] for c in recv], [c[1] for c in recv])


def _exchange_slots(plan: _Plan, received: _Received, group: Any) -> None:
    """Dispatch phase 2a: per pair its slot count, per slot its owner-local expert row (int32).

    Per destination r the message is [slot counts of r's pairs, local rows of r's slots]; the
    receiver turns the counts back into the received pair of every slot.
    """
    count_parts = plan.slots_per_pair_C.split(plan.send_pairs)
    row_parts = plan.local_row_S.split(plan.send_slots)
    send = torch.cat([t for c, r in zip(count_parts, row_parts) for t in (c, r)])
    in_splits = [p + s for p, s in zip(plan.send_pairs, plan.send_slots)]
    out_splits = [p + s for p, s in zip(received.recv_pairs, received.recv_slots)]
    recv = all_to_all(send, out_splits, in_splits, group)
    counts, rows = [], []
    for part, pairs in zip(recv.split(out_splits), received.recv_pairs):
        counts.append(part[:pairs])
        rows.append(part[pairs:])
    counts_R = torch.cat(counts).long()
    received.row_S = torch.repeat_interleave(torch.arange(len(counts_R), device=send.device), counts_R)
    received.local_row_S = torch.cat(rows).long()


def _exchange_payload(x_TD: Tensor, gates_TJ: Tensor, plan: _Plan, received: _Received,
                      group: Any, needs_rows: bool = True) -> tuple[Tensor, Tensor]:
    """Dispatch phase 2b: each pair's hidden row and each slot's gate, packed into ONE all_to_all.

    Per destination r the message is [rows of r (pairs_r * D values), gates of r (slots_r values)],
    so the forward and the backward are a single collective each.
    """
    # Tables that read no input (PKM values) get zero-width rows: only the gates travel.
    d_model = x_TD.shape[1] if needs_rows else 0
    rows_CD = x_TD.index_select(0, plan.pair_token_C)[:, :d_model]
    gates_S = gates_TJ.reshape(-1).index_select(0, plan.slot_order_S).to(x_TD.dtype)
    row_parts = rows_CD.split(plan.send_pairs)
    gate_parts = gates_S.split(plan.send_slots)
    send = torch.cat([t for r, g in zip(row_parts, gate_parts) for t in (r.reshape(-1), g)])
    in_splits = [p * d_model + s for p, s in zip(plan.send_pairs, plan.send_slots)]
    out_splits = [p * d_model + s for p, s in zip(received.recv_pairs, received.recv_slots)]
    recv = all_to_all(send, out_splits, in_splits, group)
    rows, gates = [], []
    for part, pairs in zip(recv.split(out_splits), received.recv_pairs):
        rows.append(part[: pairs * d_model].view(pairs, d_model))
        gates.append(part[pairs * d_model:])
    return torch.cat(rows), torch.cat(gates)


def _return_partials(partial_RD: Tensor, plan: _Plan, received: _Received, num_tokens: int,
                     group: Any) -> Tensor:
    """Combine: partial rows go back to their sources and are summed per token, (T, D)."""
    back_CD = all_to_all(partial_RD, plan.send_pairs, received.recv_pairs, group)
    out_TD = back_CD.new_zeros(num_tokens, partial_RD.shape[1])
    return out_TD.index_add(0, plan.pair_token_C, back_CD)


# ---------------------------------------------------------------------------- tensor-parallel token split


def _tp_bounds(num_tokens: int, tp_size: int) -> list[int]:
    """Slice boundaries of the TP ranks' token shares (sizes differ by at most one)."""
    base, extra = divmod(num_tokens, tp_size)
    bounds = [0]
    for r in range(tp_size):
        bounds.append(bounds[-1] + base + (r < extra))
    return bounds


class _SliceForTP(torch.autograd.Function):
    """Forward: this TP rank's token slice. Backward: all-gather the slices' grads (full grad everywhere)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp_rank: int, tp_size: int, group: Any) -> Tensor:
        ctx.meta = (x.shape[0], tp_rank, tp_size, group)
        bounds = _tp_bounds(x.shape[0], tp_size)
        return x[bounds[tp_rank]: bounds[tp_rank + 1]].clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        num_tokens, _, tp_size, group = ctx.meta
        return _gather_slices(grad, num_tokens, tp_size, group), None, None, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather the TP ranks' slices into all tokens. Backward: this rank's slice of the grad.

    The slice backward (not a sum) is right because every TP rank computes the same
    loss from the same gathered output: their upstream grads are identical copies.
    """

    @staticmethod
    def forward(ctx: Any, part: Tensor, num_tokens: int, tp_rank: int, tp_size: int, group: Any) -> Tensor:
        ctx.meta = (num_tokens, tp_rank, tp_size)
        return _gather_slices(part, num_tokens, tp_size, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        num_tokens, tp_rank, tp_size = ctx.meta
        bounds = _tp_bounds(num_tokens, tp_size)
        return grad[bounds[tp_rank]: bounds[tp_rank + 1]].contiguous(), None, None, None, None


def _gather_slices(part: Tensor, num_tokens: int, tp_size: int, group: Any) -> Tensor:
    bounds = _tp_bounds(num_tokens, tp_size)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: part.shape[0]] = part
    gathered = [torch.empty_like(padded) for _ in range(tp_size)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([g[: b - a] for g, a, b in zip(gathered, bounds, bounds[1:])])


class DispatchStats:
    """Per-layer dispatch counters accumulated between metric reads (host ints: no syncs of their own)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.pairs_sent = 0  # (token, destination) pairs = distinct destination ranks summed over tokens
        self.bytes_sent = 0  # dispatch + combine payload this rank sent, counts and integers included
        self.bound_bytes = 0  # 2 * D * pairs values: the hidden row out and the partial row back
        self.rows_received = 0

    def add(self, x_TD: Tensor, plan: _Plan, received: _Received, num_ranks: int, rows_out: bool = True) -> None:
        value_bytes, d_model = x_TD.element_size(), x_TD.shape[1]
        pairs, slots = sum(plan.send_pairs), sum(plan.send_slots)
        rows_back = sum(received.recv_pairs)
        self.tokens += x_TD.shape[0]
        self.pairs_sent += pairs
        self.rows_received += rows_back
        self.bound_bytes += (2 if rows_out else 1) * d_model * pairs * value_bytes
        self.bytes_sent += ((pairs if rows_out else 0) * d_model + rows_back * d_model + slots) * value_bytes \
            + (pairs + slots) * _INT_BYTES + 2 * num_ranks * 8


def make_parallel_experts(experts: nn.Module, layout: ParallelLayout, rank: int,
                          deepspeed_experts: bool = True) -> nn.Module:
    """Wrap a layer's local expert shard (``ExpertTables`` or MoE experts) for expert parallelism.

    ``deepspeed_experts``: the wrapper is an instance of ``deepspeed.moe.layer.MoE`` (its
    __init__ is NOT called): DeepSpeed treats parameters as expert parameters - reduced
    only over the expert-data-parallel group, partitioned by ZeRO over that group - only
    when the owning module is such an instance. Otherwise (row-sparse tables, which
    DeepSpeed's optimizer never sees) it is a plain module and :func:`create_expert_groups`
    creates the groups. Either way the parameters are marked as expert parameters, so
    DeepSpeed's initial broadcast copies a shard only within its expert-data-parallel
    group. The shard lives at ``deepspeed_moe.experts.deepspeed_experts.0`` (the path
    checkpoints drop, see peer_dist.checkpoint.portable.canonical_name). This relies on
    private DeepSpeed behaviour of the pinned version; tests/test_deepspeed_contract.py
    fails loudly if an upgrade changes it.
    """
    base = moe_layer_class() if deepspeed_experts else nn.Module

    class ParallelExperts(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            nn.Module.__init__(self)  # deliberately not MoE.__init__ (it builds a gate and its own experts)
            self.layout, self.rank = layout, rank
            self.ep_size = layout.ep
            self.expert_group_name = f"ep_size_{layout.ep}"
            self.num_experts = layout.ep  # DeepSpeed "experts" are our shards: one per EP rank
            self.num_local_experts = 1
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            self.deepspeed_moe = nn.Module()
            self.deepspeed_moe.experts = nn.Module()
            self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList([experts])
            for param in experts.parameters():
                mark_expert_parameter(param, self.expert_group_name)
            self.ep_group: Any = None
            self.tp_group: Any = None
            self.stats = DispatchStats()

        @property
        def tables(self) -> nn.Module:
            return self.deepspeed_moe.experts.deepspeed_experts[0]

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Create (once) and check the groups: called by the DeepSpeed engine at initialisation
            for MoE instances, by :func:`create_expert_groups` for the others."""
            if use_data_before_expert_parallel_:
                raise RuntimeError("use_data_before_expert_parallel_ is not supported by peer_dist's layout")
            ensure_expert_groups(self.expert_group_name, self.layout.ep, self.layout.tp)
            check_deepspeed_groups(self.layout, self.rank, self.expert_group_name)
            self.ep_group = expert_parallel_group(self.expert_group_name)
            if self.layout.tp > 1:
                self.tp_group = tensor_parallel_group()

        def forward(self, x_TD: Tensor, ids_TJ: Tensor, gates_TJ: Tensor) -> Tensor:
            """(T, D) tokens, (T, J) global expert ids and gates -> (T, D) expert output."""
            if self.ep_group is None:
                raise RuntimeError("expert-parallel layer used before the DeepSpeed engine set up its groups")
            if self.layout.tp == 1:
                return self._dispatch(x_TD, ids_TJ, gates_TJ)
            tp_rank, tp = self.layout.tp_rank(self.rank), self.layout.tp
            bounds = _tp_bounds(x_TD.shape[0], tp)
            mine = slice(bounds[tp_rank], bounds[tp_rank + 1])
            part = self._dispatch(_SliceForTP.apply(x_TD, tp_rank, tp, self.tp_group), ids_TJ[mine],
                                  _SliceForTP.apply(gates_TJ, tp_rank, tp, self.tp_group))
            return _GatherFromTP.apply(part, x_TD.shape[0], tp_rank, tp, self.tp_group)

        def _dispatch(self, x_TD: Tensor, ids_TJ: Tensor, gates_TJ: Tensor) -> Tensor:
            tables, group = self.tables, self.ep_group
            needs_rows = getattr(tables, "needs_rows", True)  # False: PKM values read no input
            plan = _route(ids_TJ, tables.sharding, self.layout.ep)
            received = _exchange_counts(plan, group)
            _exchange_slots(plan, received, group)
            rows_RD, gates_S = _exchange_payload(x_TD, gates_TJ, plan, received, group, needs_rows)
            partial_RD = _compute(tables, rows_RD, gates_S, received)
            if self.training:  # validation forwards do not count in the training metrics
                self.stats.add(x_TD, plan, received, self.layout.ep, needs_rows)
            return _return_partials(partial_RD, plan, received, x_TD.shape[0], group)

        def extra_repr(self) -> str:
            return f"ep={self.layout.ep}, tp={self.layout.tp}, rank={self.rank}"

    return ParallelExperts()


def _compute(tables: nn.Module, rows_RD: Tensor, gates_S: Tensor, received: _Received) -> Tensor:
    """Expert compute on the owner: one partial output row per received (token, source) pair."""
    num_rows = rows_RD.shape[0]
    if num_rows == 0:
        # Nothing arrived. The output must still depend on the (empty) received tensors and on
        # the tables: otherwise this rank's backward would skip the payload all_to_all that the
        # other ranks enter, and the tables would get no gradient for DeepSpeed to reduce.
        anchor = rows_RD.sum() * 0 + gates_S.sum() * 0 + sum(p.reshape(-1)[:0].sum() for p in tables.parameters())
        width = getattr(tables, "d_out", rows_RD.shape[1])  # PKM values: rows arrive zero-width
        return rows_RD.new_zeros(0, width) + anchor
    routing = ExpertRouting.build_ragged(received.local_row_S, received.row_S, num_rows,
                                         tables.sharding.rows_per_rank)
    return tables.compute(rows_RD, gates_S, routing)


def parallelize_experts(model: nn.Module, layout: ParallelLayout, rank: int, row_sparse_tables: bool) -> int:
    """Give every expert layer of ``model`` the expert-parallel dispatch; returns how many.

    The layers must already hold only this rank's shard (build the model with
    ``ExpertPlacement(layout.ep, layout.ep_rank(rank))``). Call before
    ``deepspeed.initialize``: the engine recognises the DeepSpeed MoE wrappers and creates
    the groups (:func:`create_expert_groups` does it for the others).
    ``row_sparse_tables``: PEER tables and PKM values get row-sparse gradients outside
    DeepSpeed (train.expert_update = "sparse"): their wrappers are no DeepSpeed MoE layers.
    MoE experts always are.
    """
    if layout.ep == 1:
        return 0
    count = 0
    for module in list(model.modules()):
        for attr in ("experts", "memory"):  # PEER / MoE experts, PKM value rows
            tables = getattr(module, attr, None)
            sharding = getattr(tables, "sharding", None)
            if sharding is None:
                continue
            if sharding.ep_size != layout.ep or sharding.ep_rank != layout.ep_rank(rank):
                raise RuntimeError(f"{type(module).__name__} holds shard {sharding.ep_rank}/{sharding.ep_size}, "
                                   f"the layout gives rank {rank} shard {layout.ep_rank(rank)}/{layout.ep}")
            sparse = row_sparse_tables and getattr(tables, "row_indexed", False)  # not MoE experts
            setattr(module, attr, make_parallel_experts(tables, layout, rank, deepspeed_experts=not sparse))
            count += 1
    return count


def create_expert_groups(model: nn.Module) -> None:
    """Create the expert groups for wrappers that are no DeepSpeed MoE layers (call before the engine)."""
    base = moe_layer_class()
    for _, wrapper in dispatch_layers(model):
        if not isinstance(wrapper, base):
            wrapper.set_deepspeed_parallelism()


def dispatch_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """(name, wrapper) of every expert-parallel wrapper in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "stats", None), DispatchStats)]


def dispatch_metrics(model: nn.Module, device: torch.device) -> dict[str, float]:
    """Collective over the default group: per expert-parallel layer, since the last call,

    - ``recv_rows_imbalance``: max over ranks / mean over ranks of the (token, source) rows received;
    - ``bytes_per_token`` and ``bound_bytes_per_token``: all_to_all bytes sent per token (rows out,
      partials back, gates, integers) next to the lower bound 2 * D * (distinct destination ranks)
      values per token; ``destinations_per_token``: that distinct-destination count.

    Counters reset afterwards. One all_reduce pair per call, whatever the number of layers.
    """
    layers = dispatch_layers(model)
    if not layers:
        return {}
    fields = ("tokens", "pairs_sent", "bytes_sent", "bound_bytes", "rows_received")
    local = torch.tensor([[getattr(w.stats, f) for f in fields] for _, w in layers], dtype=torch.float64,
                         device=device)
    total, peak = local.clone(), local[:, -1].clone()
    dist.all_reduce(total)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    out = {}
    for (name, wrapper), row, most in zip(layers, total.tolist(), peak.tolist()):  # NOTE: host sync (metrics)
        tokens, pairs, sent, bound, received = row
        prefix = f"ep/{name.rsplit('.', 1)[0]}"  # the layer: drop .experts / .memory
        out[f"{prefix}/recv_rows_imbalance"] = most / max(received / world, 1e-9)
        out[f"{prefix}/bytes_per_token"] = sent / max(tokens, 1)
        out[f"{prefix}/bound_bytes_per_token"] = bound / max(tokens, 1)
        out[f"{prefix}/destinations_per_token"] = pairs / max(tokens, 1)
        wrapper.stats.reset()
    return out
