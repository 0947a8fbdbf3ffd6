"""Row-sparse gradients, reduction, clipping and AdamW for the expert tables (train.expert_update = "sparse").

Shape suffixes: L rows this rank holds (N / EP), D row width, U rows with a gradient.

A PEER table has N rows (up to 1024^2 per layer) and a step retrieves U << N of them.
Dense gradients make every step O(N * D): an (N, D) gradient is allocated, zeroed,
scanned for the norm, all-reduced over data-parallel replicas and stepped by AdamW
with two (N, D) moments. Here every one of those is O(U * D):

1. backward: the expert ops add (distinct ids, rows) blocks to the table's
   :class:`~peer_dist.model.expert_ops.RowGrad` (the table has ``requires_grad=False``,
   so autograd, DeepSpeed and ZeRO never see an (N, D) gradient);
2. :meth:`SparseTableAdamW.reduce`: the replicas of a shard exchange only their touched
   rows (all_gather of ids and rows), or all-reduce a dense (L, D + 1) buffer when that
   moves fewer bytes (decided from the gathered row counts, the same on every rank);
3. the squared gradient norm of the touched rows joins the dense weights' norm, so
   clipping uses one global norm (:meth:`sq_norm`);
4. :meth:`step`: AdamW on the touched rows only.

Update semantics (documented in docs/sparse_tables.md): each row keeps its own Adam
step count, and a row's update is exactly torch's AdamW applied to the sequence of
gradients that row received, the steps where nobody retrieved it left out (moments are
not decayed and the row does not move on those steps). A row retrieved in every step
is updated exactly as dense AdamW would. Dense AdamW differs for a row that is skipped:
its momentum keeps moving it and its moments decay.

Gradient bookkeeping (mean loss over the global batch, as for dense weights): each
rank's row gradients are those of its loss already divided by grad_accum (DeepSpeed
scales the loss in ``engine.backward``); they are SUMMED over the ranks holding the
same rows and divided by the data-parallel size W / TP. Without expert parallelism the
replicas are the data-parallel group (TP lanes compute identical tables, counted
once); with EP the expert-data-parallel group, whose ranks received disjoint tokens
through the dispatch.

bf16: the model's tables are bf16; the optimizer keeps an fp32 master copy of each
table (like DeepSpeed's bf16 optimizer does for dense weights), updates its rows and
writes them back rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peer_dist import native
from peer_dist.model.expert_ops import RowGrad, coalesce_rows

# Table values per update block (rows x D): 256k fp32 values = 1 MiB per gathered array.
UPDATE_BLOCK_VALUES = 1 << 18

# Moment keys, as torch's AdamW names them (checkpoints store them under these names).
STATE_KEYS = ("exp_avg", "exp_avg_sq", "row_step")


@dataclass
class TableSpec:
    """One table parameter and the groups its gradient is reduced over."""

    param: nn.Parameter
    replica_group: Any = None  # ranks holding the same rows: gradients summed here (None: alone)
    shard_group: Any = None  # ranks holding the other shards: squared norms summed here (None: unsharded)
    # (L,) learning-rate factor per local row (None: 1 everywhere). A row with factor 0 is
    # frozen: its gradient is dropped before the update, its value and moments never change.
    row_scale: Tensor | None = None


@dataclass
class _Grad:
    ids_U: Tensor  # (U,) local rows with a gradient, ascending, distinct
    rows_UD: Tensor  # (U, D) fp32 (or wider) gradient rows, reduced and averaged


class SparseTableAdamW:
    """AdamW over row-sparse gradients of table parameters; see the module docstring.

    ``lr`` is the tables' peak learning rate; ``lr_factor(step)`` the schedule factor
    for the 0-based step count (the trainer's warmup + cosine). ``grad_divisor``: the
    data-parallel size the summed gradients are divided by.
    """

    def __init__(self, tables: list[TableSpec], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, grad_divisor: int = 1,
                 lr_factor: Callable[[int], float] | None = None) -> None:
        self.tables = tables
        self.base_lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.grad_divisor = grad_divisor
        self.lr_factor = lr_factor or (lambda step: 1.0)
        self.lr = lr * self.lr_factor(0)
        self.state: dict[int, dict[str, Tensor]] = {}
        self._grads: list[_Grad | None] = [None] * len(tables)
        # Squared norm of the reduced gradients (set by sq_norm); DeepSpeed's norm adds it.
        self.pending_sq_norm = torch.zeros((), dtype=torch.float64)
        self._buffers: dict[str, Any] = {}  # update workspace, see _update_rows
        # Since the last metrics read: rows updated, rows held (both summed over tables and
        # steps) and replica reductions that exchanged touched rows vs a dense buffer.
        self.counts = {"rows_updated": 0, "rows_held": 0, "sparse_exchanges": 0, "dense_exchanges": 0}
        for spec in tables:
            spec.param.requires_grad_(False)  # autograd, DeepSpeed and ZeRO never see a dense gradient
            spec.param.row_grad = RowGrad()  # type: ignore[attr-defined]

    @property
    def params(self) -> list[nn.Parameter]:
        return [spec.param for spec in self.tables]

    # ---- gradients --------------------------------------------------------------------------

    def reduce(self) -> None:
        """Collective: sum every table's row gradients over its replicas and average (see module doc).

        Every rank of every group calls it once per step in the same table order, also
        with no rows. Clears the per-micro-step blocks.
        """
        for i, spec in enumerate(self.tables):
            p = spec.param
            local = p.row_grad.coalesced()
            p.row_grad.clear()
            if local is None:
                local = (torch.zeros(0, dtype=torch.int64, device=p.device),
                         torch.zeros(0, p.shape[1], dtype=torch.promote_types(p.dtype, torch.float32), device=p.device))
            ids_U, rows_UD = local
            if spec.replica_group is not None and dist.get_world_size(spec.replica_group) > 1:
                ids_U, rows_UD, dense = _sum_over_replicas(ids_U, rows_UD, p.shape[0], spec.replica_group)
                self.counts["dense_exchanges" if dense else "sparse_exchanges"] += 1
            if self.grad_divisor != 1:
                rows_UD = rows_UD / self.grad_divisor
            self._grads[i] = _without_frozen_rows(_Grad(ids_U, rows_UD), spec.row_scale)

    def sq_norm(self) -> Tensor:
        """Collective: squared L2 norm (float64) of all reduced table gradients, over every shard."""
        total = torch.zeros((), dtype=torch.float64, device=self._device())
        for grad, spec in zip(self._grads, self.tables):
            if grad is None:
                raise RuntimeError("sq_norm() before reduce()")
            part = torch.linalg.vector_norm(grad.rows_UD).double().square()
            if spec.shard_group is not None and dist.get_world_size(spec.shard_group) > 1:
                dist.all_reduce(part, group=spec.shard_group)
            total = total + part
        self.pending_sq_norm = total
        return total

    def zero_grad(self) -> None:
        """Drop this step's gradients (a bad step, or before a rollback)."""
        for spec in self.tables:
            spec.param.row_grad.clear()
            spec.param.row_grad.release()
        self._grads = [None] * len(self.tables)

    def touched_rows(self) -> list[Tensor]:
        """The reduced gradient's row ids of every table (for tests and metrics)."""
        return [g.ids_U if g is not None else torch.zeros(0, dtype=torch.int64) for g in self._grads]

    # ---- the update -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, clip_scale: float | Tensor = 1.0) -> None:
        """AdamW on the touched rows; gradients are multiplied by ``clip_scale`` first."""
        for grad, spec in zip(self._grads, self.tables):
            self.counts["rows_held"] += spec.param.shape[0]
            if grad is None:
                continue
            ids_U = grad.ids_U
            scale_U = None if spec.row_scale is None else spec.row_scale.index_select(0, ids_U)
            self.counts["rows_updated"] += ids_U.numel()
            if ids_U.numel():
                rows_UD = grad.rows_UD.float()
                if self._update_rows_native(spec.param, ids_U, rows_UD, scale_U, float(clip_scale)):
                    continue
                if float(clip_scale) != 1.0:
                    rows_UD = rows_UD * clip_scale
                # Blocks of rows small enough for the CPU caches: each block's gathered moments,
                # values and temporaries stay in cache between gather, update and scatter, so
                # every table byte crosses the memory bus about once each way.
                block = self._workspace(rows_UD.shape[1], rows_UD.device)[0].shape[0]
                for start in range(0, ids_U.numel(), block):
                    end = start + block
                    self._update_rows(spec.param, ids_U[start:end], rows_UD[start:end],
                                      None if scale_U is None else scale_U[start:end])
        self._grads = [None] * len(self.tables)
        for spec in self.tables:
            spec.param.row_grad.release()  # the backward may reuse its gradient buffer

    def set_step(self, step: int) -> None:
        """Learning rate for the 0-based optimizer step ``step`` (the trainer's schedule)."""
        self.lr = self.base_lr * self.lr_factor(step)

    def _update_rows_native(self, p: nn.Parameter, ids_U: Tensor, g_UD: Tensor, scale_U: Tensor | None,
                            clip_scale: float) -> bool:
        """The whole update of an fp32 CPU table in one fused pass per row (peer_dist.native);
        False where that does not apply (bf16 master copy, GPU, no compiler): use _update_rows."""
        state = self.state_for(p)
        tensors = (p, state["exp_avg"], state["exp_avg_sq"], state["row_step"], ids_U, g_UD)
        if "master" in state or p.dtype != torch.float32 or not native.adamw_rows_available(*tensors):
            return False
        native.adamw_rows(*tensors, scale_U, self.lr, self.betas, self.eps, self.weight_decay, clip_scale)
        return True

    def _update_rows(self, p: nn.Parameter, ids_U: Tensor, g_UD: Tensor, scale_U: Tensor | None = None) -> None:
        """AdamW on rows ``ids_U`` (one cache-sized block): gather, update in place, scatter back.

        ``scale_U``: each row's learning-rate factor (TableSpec.row_scale), None for 1.

        Every (U, D) temporary lives in a workspace reused across blocks and steps: fresh
        large allocations cost a page fault per 4 KiB on first touch, more than the update.
        """
        state = self.state_for(p)
        beta1, beta2 = self.betas
        master = state.get("master", p)
        num = ids_U.numel()
        m_UD, v_UD, rows_UD = (buf[:num] for buf in self._workspace(g_UD.shape[1], g_UD.device))
        step_U = state["row_step"].index_select(0, ids_U).add_(1)
        state["row_step"].index_copy_(0, ids_U, step_U)
        torch.index_select(state["exp_avg"], 0, ids_U, out=m_UD).lerp_(g_UD, 1 - beta1)
        torch.index_select(state["exp_avg_sq"], 0, ids_U, out=v_UD).mul_(beta2).addcmul_(g_UD, g_UD, value=1 - beta2)
        state["exp_avg"].index_copy_(0, ids_U, m_UD)
        state["exp_avg_sq"].index_copy_(0, ids_U, v_UD)
        # torch AdamW's arithmetic, with a bias correction per row (its own step count):
        # p = p * (1 - lr * wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        step_U1 = step_U.to(torch.float32).unsqueeze(1)
        bias1_U1 = 1 - torch.pow(beta1, step_U1)
        lr_U1 = self.lr if scale_U is None else self.lr * scale_U.unsqueeze(1)
        bias2_sqrt_U1 = (1 - torch.pow(beta2, step_U1)).sqrt_()
        denom_UD = v_UD.sqrt_().div_(bias2_sqrt_U1).add_(self.eps)  # v is stored already: reuse its buffer
        if master.dtype == torch.float32:
            torch.index_select(master, 0, ids_U, out=rows_UD)
        else:
            rows_UD.copy_(master.index_select(0, ids_U))
        if self.weight_decay:
            rows_UD.mul_(1 - lr_U1 * self.weight_decay)
        rows_UD.addcdiv_(m_UD.mul_(lr_U1 / bias1_U1), denom_UD, value=-1.0)  # m is stored already
        master.index_copy_(0, ids_U, rows_UD)
        if master is not p:
            p.index_copy_(0, ids_U, rows_UD.to(p.dtype))

    def _workspace(self, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        block = max(64, UPDATE_BLOCK_VALUES // max(width, 1))
        key = (width, str(device))
        if self._buffers.get("key") != key:
            self._buffers = {"key": key, "bufs": tuple(torch.empty(block, width, device=device) for _ in range(3))}
        return self._buffers["bufs"]

    def state_for(self, p: nn.Parameter) -> dict[str, Tensor]:
        """The table's optimizer state, created on first use (moments zero, row steps 0)."""
        state = self.state.get(id(p))
        if state is None:
            state = {"exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                     "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                     "row_step": torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)}
            if p.dtype != torch.float32:
                state["master"] = p.detach().to(torch.float32).clone()
            self.state[id(p)] = state
        return state

    def owns(self, p: Tensor) -> bool:
        return any(spec.param is p for spec in self.tables)

    def _device(self) -> torch.device:
        return self.tables[0].param.device if self.tables else torch.device("cpu")


def _without_frozen_rows(grad: _Grad, row_scale: Tensor | None) -> _Grad:
    """``grad`` without the rows whose learning-rate factor is 0: they are not updated and
    their gradient does not count in the norm that clipping uses."""
    if row_scale is None:
        return grad
    keep = row_scale.index_select(0, grad.ids_U).ne(0).nonzero().squeeze(1)  # NOTE: host sync (nonzero)
    return _Grad(grad.ids_U[keep], grad.rows_UD[keep])


def _sum_over_replicas(ids_U: Tensor, rows_UD: Tensor, num_rows: int, group: Any) -> tuple[Tensor, Tensor, bool]:
    """Sum row-sparse gradients over ``group``: exchange touched rows, or a dense buffer when cheaper.

    Returns (ids, rows, whether the dense buffer was used).

    Sparse: every rank receives size * max_r U_r rows of D + 1 values (all_gather, padded
    to the largest U_r). Dense: a ring all-reduce moves about 2 * L rows per rank.
    """
    size, width = dist.get_world_size(group), rows_UD.shape[1]
    count = torch.tensor([ids_U.numel()], dtype=torch.int64, device=ids_U.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    counts_r = [int(c) for c in torch.cat(counts).tolist()]  # NOTE: host sync: sizes of the exchange
    if size * max(counts_r) >= 2 * num_rows:
        return (*_sum_dense(ids_U, rows_UD, num_rows, group), True)
    longest = max(counts_r)
    padded_ids = ids_U.new_zeros(longest)
    padded_ids[: ids_U.numel()] = ids_U
    padded_rows = rows_UD.new_zeros(longest, width)
    padded_rows[: ids_U.numel()] = rows_UD
    all_ids = [torch.empty_like(padded_ids) for _ in range(size)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(size)]
    dist.all_gather(all_ids, padded_ids, group=group)
    dist.all_gather(all_rows, padded_rows, group=group)
    ids_M = torch.cat([ids[:c] for ids, c in zip(all_ids, counts_r)])
    rows_MD = torch.cat([rows[:c] for rows, c in zip(all_rows, counts_r)])
    return (*coalesce_rows(ids_M, rows_MD), False)


def _sum_dense(ids_U: Tensor, rows_UD: Tensor, num_rows: int, group: Any) -> tuple[Tensor, Tensor]:
    """All-reduce an (L, D + 1) buffer; the last column counts the replicas that touched the row."""
    width = rows_UD.shape[1]
    buffer_LW = rows_UD.new_zeros(num_rows, width + 1)
    buffer_LW[ids_U, :width] = rows_UD
    buffer_LW[ids_U, width] = 1.0
    dist.all_reduce(buffer_LW, group=group)
    ids = buffer_LW[:, width].nonzero().squeeze(1)  # NOTE: host sync (nonzero): the touched rows
    return ids, buffer_LW.index_select(0, ids)[:, :width]


def table_metrics(tables: SparseTableAdamW | None) -> dict[str, float]:
    """Since the last call (this rank): fraction of held table rows updated per step, and the
    fraction of replica reductions that used the dense buffer. Counters reset afterwards."""
    if tables is None:
        return {}
    c = tables.counts
    exchanges = c["sparse_exchanges"] + c["dense_exchanges"]
    out = {"tables/rows_updated_fraction": c["rows_updated"] / max(c["rows_held"], 1)}
    if exchanges:
        out["tables/dense_exchange_fraction"] = c["dense_exchanges"] / exchanges
    tables.counts = dict.fromkeys(c, 0)
    return out


def clip_scale(norm: float | Tensor | None, max_norm: float) -> float:
    """The factor every gradient is multiplied by: max_norm / (norm + 1e-6), at most 1 (as DeepSpeed)."""
    if max_norm <= 0 or norm is None or not math.isfinite(float(norm)):
        return 1.0
    norm = float(norm)
    return min(1.0, max_norm / (norm + 1e-6))
