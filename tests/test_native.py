"""The C kernels of peer_dist.native against independent references: a stable Python sort of
every row, torch.topk, brute-force retrieval; their build cache and the fallback without a compiler."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer_dist import native
from peer_dist.model.product_keys import product_key_topk
from tests.references import all_composite_keys

pytestmark = pytest.mark.skipif(not native.topk_available(torch.zeros(1, 1)), reason="no C compiler here")


def sorted_reference(x_RC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: columns ordered by (value descending, NaN first, column ascending), first k."""
    ids = []
    for row in x_RC.tolist():
        key = [(0 if math.isnan(a) else 1, -a if not math.isnan(a) else 0.0, j) for j, a in enumerate(row)]
        ids.append([j for *_, j in sorted(key)][:k])
    ids_RK = torch.tensor(ids, dtype=torch.int64).reshape(x_RC.shape[0], k)
    return x_RC.gather(1, ids_RK), ids_RK


@pytest.mark.parametrize("rows, cols, k", [(300, 256, 16), (300, 50, 16), (64, 256, 1), (64, 40, 40),
                                           (64, 24, 16), (32, 1024, 64), (32, 300, 65)])
def test_topk_equals_a_stable_sort(rows: int, cols: int, k: int) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols + k))
    values, ids = native.topk(x, k)
    ref_values, ref_ids = sorted_reference(x, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(values, ref_values)
    torch_values, _ = x.topk(k, dim=-1, sorted=True)
    assert torch.equal(values, torch_values)


def test_ties_nan_and_strided_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 6, (200, 256), generator=gen).float()  # many ties at every threshold
    x[5] = 1.0  # a row of one value: the candidate list is the whole row
    x[7, [3, 100, 200]] = float("nan")
    x[9] = float("nan")
    wide = torch.randn(200, 300, generator=gen)
    wide[:, 20:276] = x
    strided = wide[:, 20:276]  # rows 300 values apart
    assert strided.stride() == (300, 1)
    for tensor in (x, strided):
        values, ids = native.topk(tensor, 16)
        ref_values, ref_ids = sorted_reference(tensor, 16)
        assert torch.equal(ids, ref_ids)
        assert torch.equal(values.nan_to_num(7.0), ref_values.nan_to_num(7.0))
    assert ids[9].tolist() == list(range(16))
    assert ids[7, :3].tolist() == [3, 100, 200]


def test_thread_count_does_not_change_results() -> None:
    x = torch.randn(20000, 256, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.topk(x, 16)
        torch.set_num_threads(2)
        two = native.topk(x, 16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("topk, num_sub", [(4, 64), (16, 64), (16, 512)])
def test_float32_retrieval_equals_brute_force_and_the_torch_path(topk: int, num_sub: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(topk + num_sub)
    q = torch.randn(64, 4, 32, generator=gen, requires_grad=True)
    sub_keys = torch.randn(2, num_sub, 16, generator=gen, requires_grad=True)
    scores, ids = product_key_topk(q, sub_keys, topk)
    brute_scores, brute_ids = torch.einsum("thq,nq->thn", q.detach(), all_composite_keys(sub_keys.detach())).topk(topk)
    assert torch.equal(ids.sort(-1).values, brute_ids.sort(-1).values)
    torch.testing.assert_close(scores.detach(), brute_scores, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((scores * torch.arange(topk)).sum(), (q, sub_keys))

    monkeypatch.setenv("PEER_DIST_NATIVE", "0")
    assert not native.topk_available(q)
    torch_scores, torch_ids = product_key_topk(q, sub_keys, topk)
    torch_grads = torch.autograd.grad((torch_scores * torch.arange(topk)).sum(), (q, sub_keys))
    assert torch.equal(ids, torch_ids)
    # n >= 512 computes the sub-key scores in C (their own rounding); below, the same matmul
    exact = num_sub < 512
    torch.testing.assert_close(scores, torch_scores, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    for got, ref in zip(grads, torch_grads):
        torch.testing.assert_close(got, ref, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_concurrent_first_builds_share_one_library(tmp_path: Path) -> None:
    env = {**os.environ, "PEER_DIST_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "peer_dist.native"], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0] * 4
    assert len(paths) == 1
    assert [f.name for f in tmp_path.iterdir()] == [Path(paths.pop()).name]  # no temporary file left
    library = next(tmp_path.iterdir())
    stamp = library.stat().st_mtime_ns
    again = _python("from peer_dist import native; print(native.build())", {"PEER_DIST_CACHE": str(tmp_path)})
    assert again.returncode == 0 and library.stat().st_mtime_ns == stamp  # cached: not rebuilt


def test_without_a_compiler_retrieval_falls_back_to_torch_with_one_warning(tmp_path: Path) -> None:
    code = (
        "import torch, logging; logging.basicConfig()\n"
        "from peer_dist import native\n"
        "from peer_dist.model.product_keys import product_key_topk\n"
        "try:\n"
        "    native.build()\n"
        "except native.NativeBuildError as err:\n"
        "    print('build:', err)\n"
        "q = torch.randn(8, 2, 16); keys = torch.randn(2, 32, 8)\n"
        "for _ in range(3): s, i = product_key_topk(q, keys, 4)\n"
        "ref = torch.einsum('thq,nq->thn', q, torch.cat([keys[0].repeat_interleave(32, 0), keys[1].repeat(32, 1)], 1))\n"
        "print('equal:', torch.equal(i.sort(-1).values, ref.topk(4).indices.sort(-1).values))\n"
    )
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    done = _python(code, {"PEER_DIST_CACHE": str(tmp_path / "cache"), "PATH": str(empty_bin), "CC": ""})
    assert done.returncode == 0, done.stderr
    assert "build: no C compiler found (set CC, or install gcc)" in done.stdout
    assert "equal: True" in done.stdout
    assert done.stderr.count("native CPU kernels unavailable, using torch instead") == 1
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("num_values", [1, 2, 256, 65536, 1 << 20, 1 << 23])
def test_argsort_ids_equals_torch_stable_argsort(num_values: int) -> None:
    gen = torch.Generator().manual_seed(num_values)
    for size in (0, 1, 1000, 50000):
        ids = torch.randint(0, num_values, (size,), generator=gen)
        assert torch.equal(native.argsort_ids(ids, num_values), torch.argsort(ids, stable=True))
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        native.argsort_ids(torch.tensor([3, 256, 1]), 256)


@pytest.mark.parametrize("weight_decay, clip, with_row_lr", [(0.0, 1.0, False), (0.1, 0.37, True)])
def test_adamw_rows_equals_torch_adamw_per_row(weight_decay: float, clip: float, with_row_lr: bool) -> None:
    """Each row against torch.optim.AdamW run on that row alone over the steps it was touched."""
    gen = torch.Generator().manual_seed(7)
    num_rows, width, lr, betas, eps = 12, 40, 3e-2, (0.9, 0.95), 1e-6
    table = torch.randn(num_rows, width, generator=gen)
    row_lr = torch.rand(num_rows, generator=gen) if with_row_lr else None
    refs = [torch.nn.Parameter(table[r].clone()) for r in range(num_rows)]
    ref_opts = [torch.optim.AdamW([p], lr=lr * (1.0 if row_lr is None else float(row_lr[r])), betas=betas, eps=eps,
                                  weight_decay=weight_decay) for r, p in enumerate(refs)]
    exp_avg, exp_avg_sq = torch.zeros_like(table), torch.zeros_like(table)
    row_step = torch.zeros(num_rows, dtype=torch.int64)
    for _ in range(6):
        ids = torch.randperm(num_rows, generator=gen)[:7].sort().values
        grad = torch.randn(7, width, generator=gen)
        native.adamw_rows(table, exp_avg, exp_avg_sq, row_step, ids, grad,
                          None if row_lr is None else row_lr[ids], lr, betas, eps, weight_decay, clip)
        for i, r in enumerate(ids.tolist()):
            refs[r].grad = grad[i] * clip
            ref_opts[r].step()
    for r in range(num_rows):
        torch.testing.assert_close(table[r], refs[r].detach(), rtol=1e-5, atol=1e-6)
        if refs[r] in ref_opts[r].state:
            torch.testing.assert_close(exp_avg_sq[r], ref_opts[r].state[refs[r]]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
            assert row_step[r] == int(ref_opts[r].state[refs[r]]["step"])
        else:
            assert row_step[r] == 0 and torch.equal(exp_avg[r], torch.zeros(width))


@pytest.mark.parametrize("width", [1, 7, 64, 77])
def test_gather_dot_equals_float64_dot_products(width: int) -> None:
    from peer_dist.model.expert_ops import ExpertRouting

    gen = torch.Generator().manual_seed(width)
    ids = torch.randint(0, 300, (50, 12), generator=gen)
    routing = ExpertRouting.build(ids, 300)
    rows, table = torch.randn(50, width, generator=gen), torch.randn(300, width, generator=gen)
    got = native.gather_dot(rows, table, routing.sorted_ids_P, routing.row_P, routing.slot_P)
    want = (table.double()[ids] * rows.double()[:, None, :]).sum(-1).reshape(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys, dim", [(512, 64), (1024, 16), (600, 7)])
def test_fused_scores_topk_equals_matmul_then_topk(keys: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(keys)
    q = torch.randn(500, 2 * dim, generator=gen)[:, dim:]  # strided rows, as the query halves are
    sub_keys = torch.randn(keys, dim, generator=gen)
    values, ids = native.scores_topk(q, sub_keys, 16)
    scores = q.double() @ sub_keys.double().t()
    ref_values, ref_ids = scores.topk(16)
    gap = ref_values[:, :-1] - ref_values[:, 1:]
    clear = (gap > 1e-4).all(1)  # rows without a near-tie, whose order float32 rounding cannot change
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[clear], ref_ids[clear])
    torch.testing.assert_close(values.double(), scores.gather(1, ids), rtol=1e-5, atol=1e-5)


def test_row_grad_lends_its_buffer_once_until_released() -> None:
    from peer_dist.model.expert_ops import RowGrad

    sink = RowGrad()
    first = sink.buffer(10, 4)
    assert first is not None and first.shape == (10, 4)
    assert sink.buffer(10, 4) is None  # still lent: the caller allocates
    sink.release()
    again = sink.buffer(12, 4)  # within the headroom: the same memory
    assert again is not None and again.data_ptr() == first.data_ptr()


def test_training_steps_with_the_c_kernels_equal_the_torch_path() -> None:
    """Three steps of a PEER layer with row-sparse AdamW (gradient buffers reused from step 2)
    against the same steps on the torch ops."""
    import copy

    from peer_dist.model import PEER
    from peer_dist.train.sparse_tables import SparseTableAdamW, TableSpec

    torch.manual_seed(0)
    layer = PEER(d_model=48, num_experts=1024, heads=4, topk=8, d_key=32)
    layers = {"native": layer, "torch": copy.deepcopy(layer)}
    initial_u = layer.expert_u.detach().clone()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(96, 48, generator=gen), torch.randn(96, 48, generator=gen)) for _ in range(3)]
    for name, peer in layers.items():
        tables = SparseTableAdamW([TableSpec(peer.expert_u), TableSpec(peer.expert_v)], lr=1e-2)
        dense = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-2)
        for x, grad_y in batches:
            with native.disabled() if name == "torch" else contextlib.nullcontext():
                dense.zero_grad()
                peer(x).backward(grad_y)
                dense.step()
                tables.reduce()
                tables.step()
    for table in ("expert_u", "expert_v"):
        torch.testing.assert_close(getattr(layers["native"], table), getattr(layers["torch"], table),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(layers["native"].expert_u, initial_u)  # the steps did update the tables
