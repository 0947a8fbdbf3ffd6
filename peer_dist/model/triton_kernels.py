"""Fused Triton kernels for the expert compute of a PEER layer (kernel="triton").

Shape suffixes as in expert_ops.py: T rows, D d_model, S (row, expert) slots grouped
by row, P the slots in expert-sorted order, U distinct experts, N table rows.

Per slot s of row t (paper Algorithm 1, with a = g * sigma(z)):

    z[s] = u_{id[s]} . x[t]          y[t] = sum over slots s of row t of a[s] * v_{id[s]}

Three launches per layer call, every one accumulating in fp32 whatever the input
dtype (fp32 or bf16):

- forward, one program per row: gather the row's u rows, dot with x, activation,
  gate, weighted sum of its v rows. Writes y and z (z is kept for the backward).
- backward over rows, one program per row: ga[s] = gy[t] . v_{id[s]}, then
  grad_g[s] = ga * sigma(z), gz[s] = ga * g * sigma'(z), a[s] = g * sigma(z), and
  grad_x[t] = sum_s gz[s] * u_{id[s]}.
- backward over experts (the grouped form), one program per (distinct expert,
  D block): grad_u[e] = sum over the slots with id e of gz[s] * x[t],
  grad_v[e] = the same with a[s] * gy[t]. Each gradient row is written once, in a
  fixed order, without atomics: row gradients are deterministic. They are the
  rows of the distinct experts only (row-sparse, O(U * D)), handed to the table's
  RowGrad sink or scattered into a dense (N, D) gradient like expert_ops does.

Row traffic: forward and the row backward each read the u and v rows of every
(row, slot) pair once; the expert backward reads the x and gy rows of every pair
once and writes U gradient rows per table. Nothing of size (S, D) is ever held.

Importing this module imports triton: expert_ops imports it only when the kernel
is chosen. On a machine without CUDA the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is first imported), which is how CI checks
them on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from peer_dist.model.expert_ops import ExpertRouting, RowGrad, scatter_rows

# Slots per block of a row program, pairs per block of an expert program, and the widest
# D block. A block is a (BLOCK_J, BLOCK_D) tile of gathered table rows held in registers:
# 16 x 256 fp32 values = 32 per thread at 4 warps. The row programs loop over D in blocks,
# so any d_model works; these sizes are starting points, not tuned on a GPU yet.
BLOCK_J = 16
BLOCK_P = 16
MAX_BLOCK_D = 256
NUM_WARPS = 4
_ACTIVATIONS = {"gelu": 0, "relu": 1}


def interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device`` here."""
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # exact GELU, as F.gelu: z * Phi(z)
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:  # Phi(z) + z * phi(z)
        return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        return tl.where(z > 0.0, 1.0, 0.0)


@triton.jit
def _gather_dot_block(rows_ptr, ids, mask_j, vec_ptr, D, stride_rows, BLOCK_J: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """out[j] = table[ids[j]] . vec over all of D, fp32, for one block of slots."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        vec = tl.load(vec_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        tile = tl.load(rows_ptr + ids[:, None] * stride_rows + d[None, :],
                       mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * vec[None, :], axis=1)
    return acc


@triton.jit
def _bag_add_block(rows_ptr, ids, mask_j, weights, out_ptr, D, stride_rows, BLOCK_D: tl.constexpr):
    """out[:] += sum_j weights[j] * table[ids[j]] over all of D (out is this program's fp32 row)."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        tile = tl.load(rows_ptr + ids[:, None] * stride_rows + d[None, :],
                       mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        # Each element of the row is read and written by the same thread in every block
        # (same layout), so no barrier is needed between blocks.
        acc = tl.load(out_ptr + d, mask=mask_d, other=0.0)
        tl.store(out_ptr + d, acc + tl.sum(weights[:, None] * tile, axis=0), mask=mask_d)


@triton.jit
def _slot_block(ids_ptr, s0, end, BLOCK_J: tl.constexpr):
    """Slots [s0, s0 + BLOCK_J) of a row whose slots end at ``end``: (slots, mask, expert ids)."""
    slots = s0 + tl.arange(0, BLOCK_J)
    mask_j = slots < end
    return slots, mask_j, tl.load(ids_ptr + slots, mask=mask_j, other=0)


@triton.jit
def _mix_fwd_kernel(x_ptr, g_ptr, ids_ptr, start_ptr, end_ptr, u_ptr, v_ptr, y_ptr, z_ptr, D,
                    stride_x, stride_u, stride_v, stride_y,
                    ACT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + t)
    end = tl.load(end_ptr + t)
    for s0 in range(start, end, BLOCK_J):
        slots, mask_j, ids = _slot_block(ids_ptr, s0, end, BLOCK_J)
        z = _gather_dot_block(u_ptr, ids, mask_j, x_ptr + t * stride_x, D, stride_u, BLOCK_J, BLOCK_D)
        tl.store(z_ptr + slots, z, mask=mask_j)
        gate = tl.load(g_ptr + slots, mask=mask_j, other=0.0).to(tl.float32)
        a = gate * _act(z, ACT)  # 0 on masked slots
        _bag_add_block(v_ptr, ids, mask_j, a, y_ptr + t * stride_y, D, stride_v, BLOCK_D)


@triton.jit
def _mix_bwd_rows_kernel(gy_ptr, g_ptr, ids_ptr, start_ptr, end_ptr, u_ptr, v_ptr, z_ptr,
                         gx_ptr, gg_ptr, gz_ptr, a_ptr, D, stride_gy, stride_u, stride_v, stride_gx,
                         ACT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + t)
    end = tl.load(end_ptr + t)
    for s0 in range(start, end, BLOCK_J):
        slots, mask_j, ids = _slot_block(ids_ptr, s0, end, BLOCK_J)
        ga = _gather_dot_block(v_ptr, ids, mask_j, gy_ptr + t * stride_gy, D, stride_v, BLOCK_J, BLOCK_D)
        z = tl.load(z_ptr + slots, mask=mask_j, other=0.0)
        gate = tl.load(g_ptr + slots, mask=mask_j, other=0.0).to(tl.float32)
        act = _act(z, ACT)
        gz = ga * gate * _act_grad(z, ACT)  # 0 on masked slots
        tl.store(gg_ptr + slots, ga * act, mask=mask_j)
        tl.store(gz_ptr + slots, gz, mask=mask_j)
        tl.store(a_ptr + slots, gate * act, mask=mask_j)
        _bag_add_block(u_ptr, ids, mask_j, gz, gx_ptr + t * stride_gx, D, stride_u, BLOCK_D)


@triton.jit
def _mix_bwd_experts_kernel(x_ptr, gy_ptr, gz_ptr, a_ptr, slot_ptr, row_ptr, gstart_ptr, gend_ptr,
                            gu_ptr, gv_ptr, D, stride_x, stride_gy, stride_gu, stride_gv,
                            BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d < D
    p_start = tl.load(gstart_ptr + e)
    p_end = tl.load(gend_ptr + e)
    offs_p = tl.arange(0, BLOCK_P)
    acc_u = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        pos = p0 + offs_p
        mask_p = pos < p_end
        slots = tl.load(slot_ptr + pos, mask=mask_p, other=0)
        rows = tl.load(row_ptr + pos, mask=mask_p, other=0)
        w_u = tl.load(gz_ptr + slots, mask=mask_p, other=0.0)
        w_v = tl.load(a_ptr + slots, mask=mask_p, other=0.0)
        mask = mask_p[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_u += tl.sum(w_u[:, None] * x, axis=0)
        gy = tl.load(gy_ptr + rows[:, None] * stride_gy + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_v += tl.sum(w_v[:, None] * gy, axis=0)
    tl.store(gu_ptr + e * stride_gu + d, acc_u, mask=mask_d)
    tl.store(gv_ptr + e * stride_gv + d, acc_v, mask=mask_d)


def _block_d(d_model: int) -> int:
    return min(triton.next_power_of_2(d_model), MAX_BLOCK_D)


def _row_bounds(routing: ExpertRouting) -> tuple[Tensor, Tensor]:
    """(T,) first and (T,) one-past-last slot of every row."""
    starts_T = routing.offsets_T.contiguous()
    ends_T = torch.cat([starts_T[1:], starts_T.new_full((1,), routing.num_slots)]) if starts_T.numel() else starts_T
    return starts_T, ends_T


def _group_bounds(routing: ExpertRouting) -> tuple[Tensor, Tensor]:
    """(U,) first and (U,) one-past-last sorted position of every distinct expert."""
    starts_U = routing.group_start_U.contiguous()
    num_pairs = routing.sorted_ids_P.shape[0]
    ends_U = torch.cat([starts_U[1:], starts_U.new_full((1,), num_pairs)]) if starts_U.numel() else starts_U
    return starts_U, ends_U


def mix_forward(x_TD: Tensor, gates_S: Tensor, routing: ExpertRouting, u_ND: Tensor, v_ND: Tensor,
                activation: str) -> tuple[Tensor, Tensor]:
    """y (T, D) in x's dtype and z (S,) fp32 of the expert mix; inputs contiguous."""
    num_rows, d_model = x_TD.shape
    y_TD = torch.zeros(num_rows, d_model, dtype=torch.float32, device=x_TD.device)
    z_S = torch.empty(routing.num_slots, dtype=torch.float32, device=x_TD.device)
    if num_rows and routing.num_slots:
        starts_T, ends_T = _row_bounds(routing)
        _mix_fwd_kernel[(num_rows,)](
            x_TD, gates_S, routing.ids_S, starts_T, ends_T, u_ND, v_ND, y_TD, z_S, d_model,
            x_TD.stride(0), u_ND.stride(0), v_ND.stride(0), y_TD.stride(0),
            ACT=_ACTIVATIONS[activation], BLOCK_J=BLOCK_J, BLOCK_D=_block_d(d_model), num_warps=NUM_WARPS)
    return y_TD.to(x_TD.dtype), z_S


def mix_backward_rows(grad_y_TD: Tensor, gates_S: Tensor, routing: ExpertRouting, u_ND: Tensor, v_ND: Tensor, z_S: Tensor,
                      activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_x (T, D) fp32, grad_gates (S,) fp32, gz (S,) fp32 (= dL/dz) and a (S,) fp32 (= g * sigma(z))."""
    num_rows, d_model = grad_y_TD.shape
    device = grad_y_TD.device
    grad_x_TD = torch.zeros(num_rows, d_model, dtype=torch.float32, device=device)
    grad_g_S, gz_S, a_S = (torch.empty(routing.num_slots, dtype=torch.float32, device=device) for _ in range(3))
    if num_rows and routing.num_slots:
        starts_T, ends_T = _row_bounds(routing)
        _mix_bwd_rows_kernel[(num_rows,)](
            grad_y_TD, gates_S, routing.ids_S, starts_T, ends_T, u_ND, v_ND, z_S, grad_x_TD, grad_g_S, gz_S, a_S,
            d_model, grad_y_TD.stride(0), u_ND.stride(0), v_ND.stride(0), grad_x_TD.stride(0),
            ACT=_ACTIVATIONS[activation], BLOCK_J=BLOCK_J, BLOCK_D=_block_d(d_model), num_warps=NUM_WARPS)
    return grad_x_TD, grad_g_S, gz_S, a_S


def mix_backward_experts(x_TD: Tensor, grad_y_TD: Tensor, gz_S: Tensor, a_S: Tensor,
                         routing: ExpertRouting) -> tuple[Tensor, Tensor]:
    """Gradient rows (U, D) fp32 of u and v for the distinct experts ``routing.experts_U``."""
    num_distinct = routing.experts_U.shape[0]
    d_model = x_TD.shape[1]
    grad_u_UD = torch.empty(num_distinct, d_model, dtype=torch.float32, device=x_TD.device)
    grad_v_UD = torch.empty_like(grad_u_UD)
    if num_distinct:
        starts_U, ends_U = _group_bounds(routing)
        block_d = _block_d(d_model)
        grid = (num_distinct, triton.cdiv(d_model, block_d))
        _mix_bwd_experts_kernel[grid](
            x_TD, grad_y_TD, gz_S, a_S, routing.slot_P, routing.row_P, starts_U, ends_U, grad_u_UD, grad_v_UD,
            d_model, x_TD.stride(0), grad_y_TD.stride(0), grad_u_UD.stride(0), grad_v_UD.stride(0),
            BLOCK_P=BLOCK_P, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return grad_u_UD, grad_v_UD


class TritonExpertMix(torch.autograd.Function):
    """y[t] = sum over slots s of row t of gates[s] * sigma(u_{id[s]} . x[t]) * v_{id[s]}, three fused launches.

    ``sink_u`` / ``sink_v``: the tables' :class:`RowGrad`; a table with one gets its
    gradient there as rows of the distinct experts, otherwise (if it requires grad)
    as a dense (N, D) gradient.
    """

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, gates_S: Tensor, u_ND: Tensor, v_ND: Tensor, routing: ExpertRouting,
                activation: str, sink_u: RowGrad | None, sink_v: RowGrad | None) -> Tensor:
        x_TD, gates_S, u_ND, v_ND = (t.contiguous() for t in (x_TD, gates_S, u_ND, v_ND))
        y_TD, z_S = mix_forward(x_TD, gates_S, routing, u_ND, v_ND, activation)
        ctx.save_for_backward(x_TD, gates_S, u_ND, v_ND, z_S)
        ctx.routing, ctx.activation, ctx.sinks = routing, activation, (sink_u, sink_v)
        return y_TD

    @staticmethod
    def backward(ctx: Any, grad_y_TD: Tensor) -> tuple[Tensor | None, ...]:
        x_TD, gates_S, u_ND, v_ND, z_S = ctx.saved_tensors
        routing: ExpertRouting = ctx.routing
        grad_y_TD = grad_y_TD.contiguous()
        grad_x_TD, grad_g_S, gz_S, a_S = mix_backward_rows(grad_y_TD, gates_S, routing, u_ND, v_ND, z_S,
                                                          ctx.activation)
        table_grads: list[Tensor | None] = [None, None]
        wanted = [ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        if any(wanted) or any(s is not None for s in ctx.sinks):
            grouped = mix_backward_experts(x_TD, grad_y_TD, gz_S, a_S, routing)
            for i, (rows_UD, sink, table) in enumerate(zip(grouped, ctx.sinks, (u_ND, v_ND))):
                if sink is not None:
                    sink.add(routing.experts_U, rows_UD)
                if wanted[i]:
                    table_grads[i] = scatter_rows(rows_UD, routing, table.dtype)
        grad_x = grad_x_TD.to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        grad_g = grad_g_S.to(gates_S.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_g, table_grads[0], table_grads[1], None, None, None, None
