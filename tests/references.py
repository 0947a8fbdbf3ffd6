"""Independent float64 references shared by the PEER and PKM tests: everything materialised, brute force."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from torch import Tensor, nn


def all_composite_keys(sub_keys: Tensor) -> Tensor:
    """(2, n, d_key/2) -> (N, d_key): row a*n + b is [C[a]; C'[b]]."""
    n = sub_keys.shape[1]
    return torch.cat([sub_keys[0].repeat_interleave(n, dim=0), sub_keys[1].repeat(n, 1)], dim=1)


def reference_retrieval(x: Tensor, p: dict[str, Tensor], cfg: dict,
                        ids_THK: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, query norm (training-mode statistics over all tokens), scores against all N keys,
    brute-force top-k. Returns x as (T, D), softmax weights (T, H, K) and ids (T, H, K).

    With ``ids_THK`` given, those keys are taken instead of the top-k (for a model in low
    precision, whose top-k may differ from float64's on near ties): the scores are then
    the float64 scores of those keys."""
    heads, topk, d_key = cfg["heads"], cfg["topk"], cfg["d_key"]
    x_TD = x.reshape(-1, x.shape[-1])
    q = x_TD @ p["query.weight"].t()
    if cfg["query_norm"] == "batchnorm":
        q = F.batch_norm(q, None, None, p["query_norm.weight"], p["query_norm.bias"], training=True, eps=1e-5)
    q = q.view(-1, heads, d_key)
    if cfg["query_norm"] == "layernorm":
        q = F.layer_norm(q, (d_key,), p["query_norm.weight"], p["query_norm.bias"], eps=1e-5)
    scores_THN = torch.einsum("thq,nq->thn", q, all_composite_keys(p["sub_keys"]))
    if ids_THK is None:
        scores_THK, ids_THK = scores_THN.topk(topk, dim=-1)
    else:
        scores_THK = scores_THN.gather(-1, ids_THK)
    return x_TD, scores_THK.softmax(dim=-1), ids_THK


def reference_peer(x: Tensor, p: dict[str, Tensor], cfg: dict, ids_THK: Tensor | None = None) -> Tensor:
    """Paper Algorithm 1, brute force over all N keys, gathered (T, H, K, D) tables, einsum."""
    x_TD, gates, ids = reference_retrieval(x, p, cfg, ids_THK)
    u = p["experts.u"][ids]
    v = p["experts.v"][ids]
    z = torch.einsum("td,thkd->thk", x_TD, u)
    act = F.gelu(z) if cfg["activation"] == "gelu" else F.relu(z)
    return torch.einsum("thk,thkd->td", gates * act, v).view(x.shape)


def reference_expert_mix(x_TD: Tensor, gates_S: Tensor, ids_S: Tensor, row_S: Tensor, u_ND: Tensor, v_ND: Tensor,
                         activation: str) -> Tensor:
    """y[t] = sum over slots s of row t of g[s] * sigma(u_{id[s]} . x[t]) * v_{id[s]}, gathered (S, D) rows."""
    z_S = (x_TD[row_S] * u_ND[ids_S]).sum(-1)
    act_S = F.gelu(z_S) if activation == "gelu" else F.relu(z_S)
    contrib_SD = (gates_S * act_S)[:, None] * v_ND[ids_S]
    return torch.zeros_like(x_TD).index_add(0, row_S, contrib_SD)


def relative_error(got: Tensor, ref: Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (0 for two zero tensors)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300)) if ref.numel() else 0.0


def plant_slot(model: torch.nn.Module, a_star: int, b_star: int) -> tuple[Tensor, Tensor]:
    """Make slot a*n + b the best key for one token: returns that token (1, D) and its query.

    The query weight maps the token to q_target; the sub-keys C[a*] and C'[b*] equal the
    two halves of q_target (all others are tiny), so q . k is largest for the planted slot.
    """
    d_key = model.d_key
    x = torch.zeros(1, model.d_model)
    x[0, 0] = 1.0
    q_target = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 1.5, 1.0, -2.0])[:d_key]
    with torch.no_grad():
        model.query.weight.zero_()
        model.query.weight[:, 0] = q_target  # q = q_target for this x
        model.sub_keys.normal_(std=0.01)
        model.sub_keys[0, a_star] = q_target[: d_key // 2]  # aligned with q1
        model.sub_keys[1, b_star] = q_target[d_key // 2:]  # aligned with q2
    return x, q_target


def compare_with_reference(model: nn.Module, reference: Callable[..., Tensor], cfg: dict, x: Tensor,
                           rtol: float, atol: float) -> set[str]:
    """Output, input gradient and every parameter gradient of ``model`` vs ``reference`` in float64
    on the same parameters; returns the parameter names compared."""
    ref_params = {n: p.detach().to(torch.float64).clone().requires_grad_() for n, p in model.named_parameters()}
    x_ref = x.detach().to(torch.float64).clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)

    y = model(x)
    y.backward(grad_out.to(y.dtype))
    y_ref = reference(x_ref, ref_params, cfg)
    y_ref.backward(grad_out)

    torch.testing.assert_close(y.to(torch.float64), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.to(torch.float64), x_ref.grad, rtol=rtol, atol=atol)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad.to(torch.float64), ref_params[name].grad, rtol=rtol, atol=atol, msg=name)
    return set(ref_params)


class LargestTensor(TorchDispatchMode):
    """Records the largest op output (elements) seen while active, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def layer_errors(model: nn.Module, cfg: dict, x: Tensor, same_ids: bool = False) -> dict[str, float]:
    """Relative errors of a PEER layer (any device, any dtype) against :func:`reference_peer` in
    float64 on the CPU on the same parameters: output, input gradient, every parameter gradient.

    ``same_ids``: the reference takes the experts the model retrieved instead of its own
    float64 top-k (for bf16, whose scores can reorder near ties).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ref_params = {n: p.detach().cpu().double().requires_grad_() for n, p in model.named_parameters()}
    x_ref = x.detach().cpu().double().requires_grad_()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    x_dev = x.detach().to(device, dtype).requires_grad_()
    ids = None
    if same_ids:
        with torch.no_grad():
            ids = model.retrieve(x_dev.reshape(-1, x.shape[-1]))[1].cpu()
    y = model(x_dev)
    y.backward(grad_out.to(device, dtype))
    y_ref = reference_peer(x_ref, ref_params, cfg, ids)
    y_ref.backward(grad_out)
    errors = {"y": relative_error(y, y_ref), "x.grad": relative_error(x_dev.grad, x_ref.grad)}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        errors[name] = relative_error(param.grad, ref_params[name].grad)
    return errors
