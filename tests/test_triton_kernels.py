"""The fused Triton kernels (kernel="triton") against float64 references.

Without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is first imported, and here for a run of this file alone), on CPU tensors: that is how CI checks them on every commit.
On a CUDA machine the same tests run the compiled kernels on the GPU. Shapes are small
(the interpreter executes every program in Python) but cross every block boundary: rows
with more slots than BLOCK_J, d_model wider than MAX_BLOCK_D, experts retrieved by more
pairs than BLOCK_P, empty rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="kernel='triton' needs the triton package (the [gpu] extra)")

from peer_dist.errors import ConfigError  # noqa: E402
from peer_dist.model import expert_ops  # noqa: E402
from peer_dist.model import triton_kernels as tk  # noqa: E402
from peer_dist.model.expert_ops import ExpertRouting, RowGrad, expert_mix, resolve_kernel  # noqa: E402
from peer_dist.model.peer import PEER  # noqa: E402
from tests.helpers import ROOT  # noqa: E402
from tests.references import layer_errors, reference_expert_mix, relative_error  # noqa: E402

DEVICE = torch.device("cpu" if tk.interpreted() else "cuda")
# Relative error (2-norm) allowed against float64: fp32 arithmetic lands near 1e-7; bf16
# inputs and outputs carry ~2^-9 rounding each (measured 1.4e-3 to 1.8e-3 here).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _routing(num_rows: int, num_experts: int, gen: torch.Generator, ragged: bool) -> tuple[ExpertRouting, Tensor]:
    """Routing over (T, J = 20) slots, or a ragged one with some empty rows; returns it and row_S."""
    if not ragged:
        ids_TJ = torch.randint(0, num_experts, (num_rows, 20), generator=gen)
        row_S = torch.arange(num_rows).repeat_interleave(20)
        return ExpertRouting.build(ids_TJ.to(DEVICE), num_experts), row_S
    counts_T = torch.randint(0, 23, (num_rows,), generator=gen)
    counts_T[1] = 0
    counts_T[-1] = 0
    row_S = torch.arange(num_rows).repeat_interleave(counts_T)
    ids_S = torch.randint(0, num_experts, (row_S.numel(),), generator=gen)
    return ExpertRouting.build_ragged(ids_S.to(DEVICE), row_S.to(DEVICE), num_rows, num_experts), row_S


def _inputs(num_rows: int, num_experts: int, d_model: int, dtype: torch.dtype, gen: torch.Generator,
            ragged: bool) -> tuple[ExpertRouting, Tensor, list[Tensor]]:
    routing, row_S = _routing(num_rows, num_experts, gen, ragged)
    x = torch.randn(num_rows, d_model, generator=gen)
    gates = torch.rand(routing.num_slots, generator=gen)
    u = torch.randn(num_experts, d_model, generator=gen) * d_model**-0.5
    v = torch.randn(num_experts, d_model, generator=gen)
    return routing, row_S, [t.to(dtype) for t in (x, gates, u, v)]


def _float64_grads(inputs: list[Tensor], routing: ExpertRouting, row_S: Tensor, activation: str,
                   grad_y: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients of (x, gates, u, v) of the materialised float64 reference, on the CPU."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    y = reference_expert_mix(leaves[0], leaves[1], routing.ids_S.cpu(), row_S, leaves[2], leaves[3], activation)
    y.backward(grad_y.cpu().double())
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mix_matches_float64(dtype: torch.dtype, activation: str, ragged: bool) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {activation} {ragged}".encode()))
    # d_model 300: two D blocks (MAX_BLOCK_D = 256) with a ragged tail; 9 experts for ~150
    # slots: every expert's group spans several BLOCK_P blocks.
    routing, row_S, inputs = _inputs(7, 9, 300, dtype, gen, ragged)
    x, gates, u, v = (t.to(DEVICE).requires_grad_() for t in inputs)
    grad_y = torch.randn(x.shape, generator=gen).to(dtype)
    y = expert_mix(x, gates, routing, u, v, activation, kernel="triton")
    y.backward(grad_y.to(DEVICE))
    y_ref, grads_ref = _float64_grads(inputs, routing, row_S, activation, grad_y)
    assert y.dtype == dtype and y.device.type == DEVICE.type
    tol = TOLERANCE[dtype]
    assert relative_error(y, y_ref) < tol
    for name, got, ref in zip(("x", "gates", "u", "v"), (x.grad, gates.grad, u.grad, v.grad), grads_ref):
        assert got.dtype == dtype, name
        assert relative_error(got, ref) < tol, name
    # rows of experts no slot retrieved stay exactly zero
    missed = torch.ones(u.shape[0], dtype=torch.bool)
    missed[routing.ids_S.cpu()] = False
    assert torch.all(u.grad.cpu()[missed] == 0) and torch.all(v.grad.cpu()[missed] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sparse_gradients_go_to_the_sinks(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    routing, row_S, inputs = _inputs(6, 500, 40, dtype, gen, ragged=False)
    x, gates = (t.to(DEVICE).requires_grad_() for t in inputs[:2])
    u, v = (t.to(DEVICE) for t in inputs[2:])  # no requires_grad: the sinks take the gradients
    u.row_grad, v.row_grad = RowGrad(), RowGrad()
    grad_y = torch.randn(x.shape, generator=gen).to(dtype)
    expert_mix(x, gates, routing, u, v, "gelu", kernel="triton").backward(grad_y.to(DEVICE))
    _, grads_ref = _float64_grads(inputs, routing, row_S, "gelu", grad_y)
    assert u.grad is None and v.grad is None
    for table, ref_ND in ((u, grads_ref[2]), (v, grads_ref[3])):
        ids_U, rows_UD = table.row_grad.coalesced()
        assert torch.equal(ids_U.cpu(), torch.unique(routing.ids_S.cpu()))  # the distinct experts, ascending
        assert rows_UD.dtype == torch.float32 and rows_UD.shape == (ids_U.numel(), 40)
        assert relative_error(rows_UD, ref_ND[ids_U.cpu()]) < TOLERANCE[dtype]
    assert relative_error(x.grad, grads_ref[0]) < TOLERANCE[dtype]


def test_row_gradients_are_deterministic_and_match_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(4)
    routing, _, inputs = _inputs(8, 5, 64, torch.float32, gen, ragged=False)
    grad_y = torch.randn(8, 64, generator=gen).to(DEVICE)
    runs = []
    for kernel in ("triton", "triton", "chunked"):
        x, gates, u, v = (t.to(DEVICE).requires_grad_() for t in inputs)
        expert_mix(x, gates, routing, u, v, "gelu", kernel=kernel).backward(grad_y)
        runs.append((u.grad, v.grad))
    # one write per distinct row in a fixed order, no atomics: bitwise equal from run to run
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for got, ref in zip(runs[0], runs[2]):
        assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("query_norm", ["batchnorm", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_with_triton_kernel_matches_algorithm1(dtype: torch.dtype, query_norm: str) -> None:
    torch.manual_seed(6)
    cfg = dict(d_model=16, num_experts=64, heads=2, topk=4, d_key=8, query_norm=query_norm, activation="gelu")
    model = PEER(**cfg, kernel="triton").to(DEVICE, dtype)
    errors = layer_errors(model, cfg, torch.randn(3, 5, 16), same_ids=dtype == torch.bfloat16)
    assert {"y", "x.grad", "experts.u", "experts.v", "sub_keys", "query.weight"} <= set(errors)
    # bf16 end to end (queries, norm, softmax too): 4x the expert compute's own bound
    bound = TOLERANCE[torch.float32] if dtype == torch.float32 else 4 * TOLERANCE[torch.bfloat16]
    assert max(errors.values()) < bound, errors


def test_empty_inputs() -> None:
    routing = ExpertRouting.build(torch.empty(0, 4, dtype=torch.int64, device=DEVICE), 10)
    x = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    u = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    y = expert_mix(x, torch.empty(0, device=DEVICE), routing, u, u.detach().clone(), "gelu", kernel="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and torch.all(u.grad == 0)


# ---- choosing the kernel ----------------------------------------------------------------------


def test_auto_takes_triton_on_cuda_only() -> None:
    assert resolve_kernel("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_kernel("auto", torch.device("cpu")) == "auto"  # the torch path, also under the interpreter
    assert resolve_kernel("chunked", torch.device("cuda", 0)) == "chunked"


def test_triton_without_cuda_or_interpreter_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="kernel='triton' runs on CUDA tensors.*no CUDA device"):
        PEER(16, 64, heads=2, topk=4, d_key=8, kernel="triton")
    routing = ExpertRouting.build(torch.zeros(2, 3, dtype=torch.int64), 4)
    table = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="tensors are on cpu"):
        expert_mix(torch.randn(2, 8), torch.rand(6), routing, table, table, "gelu", kernel="triton")


def test_triton_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expert_ops, "triton_importable", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'peer-dist\[gpu\]'"):
        PEER(16, 64, heads=2, topk=4, d_key=8, kernel="triton")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        PEER(16, 64, heads=2, topk=4, d_key=8, kernel="cuda")


def test_cpu_layer_never_imports_triton() -> None:
    code = ("import sys, torch; from peer_dist.model.peer import PEER; m = PEER(16, 64, heads=2, topk=4, d_key=8); "
            "m(torch.randn(5, 16)).sum().backward(); print('triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
