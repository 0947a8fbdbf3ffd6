"""Row-sparse table gradients and their AdamW, against dense autograd, torch's AdamW and brute-force sums."""

from __future__ import annotations

import pytest
import torch

from peer_dist.model.expert_ops import RowGrad, coalesce_rows
from peer_dist.model.peer import PEER
from peer_dist.model.pkm import PKM
from peer_dist.parallel.spawn import run_ranks
from peer_dist.train.sparse_tables import SparseTableAdamW, TableSpec, clip_scale


def _table_grads_dense_and_sparse(layer: torch.nn.Module, tables: list[torch.nn.Parameter], x: torch.Tensor,
                                  grad_y: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """Dense autograd grads of ``tables``, then the same backward with row-grad sinks instead."""
    layer.zero_grad()
    layer(x).backward(grad_y)
    dense = [p.grad.clone() for p in tables]
    for p in tables:
        p.grad = None
        p.requires_grad_(False)
        p.row_grad = RowGrad()
    layer(x).backward(grad_y)
    layer(x).backward(grad_y)  # two calls (two micro-steps): blocks are summed by coalesced()
    sparse = [p.row_grad.coalesced() for p in tables]
    return dense, sparse


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_row_grads_equal_dense_autograd_float64(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "peer":
        layer = PEER(12, 64, heads=3, topk=4, d_key=8, query_norm="layernorm").double()
        tables = [layer.expert_u, layer.expert_v]
    else:
        layer = PKM(12, 64, heads=3, topk=4, d_key=8, query_norm="layernorm").double()
        tables = [layer.value_table.weight]
    x = torch.randn(5, 7, 12, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(5, 7, 12, dtype=torch.float64)
    retrieved = torch.unique(layer.retrieve(x)[1])
    assert 0 < retrieved.numel() < 64  # some rows untouched: sparsity is visible
    dense, sparse = _table_grads_dense_and_sparse(layer, tables, x, grad_y)
    for d, (ids, rows) in zip(dense, sparse):
        assert torch.equal(ids, retrieved)  # exactly the retrieved rows, ascending, distinct
        torch.testing.assert_close(rows, 2 * d[ids], rtol=1e-12, atol=1e-12)
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[ids] = False
        assert torch.all(d[untouched] == 0)


def test_coalesce_sums_equal_ids() -> None:
    ids = torch.tensor([5, 1, 5, 3, 1])
    rows = torch.arange(10.0).reshape(5, 2)
    got_ids, got_rows = coalesce_rows(ids, rows)
    assert got_ids.tolist() == [1, 3, 5]
    want = torch.zeros(6, 2).index_add_(0, ids, rows)[[1, 3, 5]]
    torch.testing.assert_close(got_rows, want)


def _optimizer(table: torch.nn.Parameter, **kw: float) -> SparseTableAdamW:
    return SparseTableAdamW([TableSpec(table)], lr=kw.pop("lr", 0.05), betas=(0.9, 0.95), eps=1e-8, **kw)


def _step(opt: SparseTableAdamW, ids: list[int], rows: torch.Tensor, scale: float = 1.0) -> None:
    opt.tables[0].param.row_grad.add(torch.tensor(ids, dtype=torch.int64), rows)
    opt.reduce()
    opt.step(scale)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rows_touched_every_step_equal_torch_adamw(weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(6, 3, generator=gen)
    ours, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = _optimizer(ours, weight_decay=weight_decay)
    adamw = torch.optim.AdamW([ref], lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    for _ in range(5):
        g = torch.randn(6, 3, generator=gen)
        _step(opt, list(range(6)), g.clone())
        ref.grad = g.clone()
        adamw.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(opt.state_for(ours)["exp_avg_sq"], adamw.state[ref]["exp_avg_sq"])


def test_each_row_follows_adamw_on_its_own_gradient_sequence() -> None:
    """A row skipped by a step keeps its value and moments; its next update is AdamW's next step."""
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(5, 4, generator=gen)
    table = torch.nn.Parameter(init.clone())
    opt = _optimizer(table, weight_decay=0.1)
    schedule = [[0, 3], [3], [], [1, 3, 4], [0]]
    received: dict[int, list[torch.Tensor]] = {r: [] for r in range(5)}
    for ids in schedule:
        g = torch.randn(len(ids), 4, generator=gen)
        _step(opt, ids, g)
        for r, row in zip(ids, g):
            received[r].append(row)
    for r in range(5):
        ref = torch.nn.Parameter(init[r:r + 1].clone())
        adamw = torch.optim.AdamW([ref], lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for g in received[r]:
            ref.grad = g[None].clone()
            adamw.step()
        torch.testing.assert_close(table.detach()[r:r + 1], ref.detach(), rtol=2e-6, atol=2e-7, msg=f"row {r}")
        assert int(opt.state_for(table)["row_step"][r]) == len(received[r])
    assert torch.equal(table.detach()[2], init[2])  # never retrieved, never moved
    assert torch.all(opt.state_for(table)["exp_avg"][2] == 0)


def test_clip_scale_and_lr_schedule() -> None:
    assert clip_scale(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert clip_scale(0.5, 1.0) == 1.0 and clip_scale(4.0, 0.0) == 1.0 and clip_scale(float("nan"), 1.0) == 1.0
    # A clipped gradient scaled by c gives Adam's first step unchanged (|c g| / sqrt((c g)^2)): use
    # the second-moment state to see the scale, and the lr factor on the step size.
    table = torch.nn.Parameter(torch.zeros(2, 2))
    opt = SparseTableAdamW([TableSpec(table)], lr=1.0, betas=(0.0, 0.0), eps=0.0, lr_factor=lambda s: 0.5 ** s)
    opt.set_step(1)
    _step(opt, [0], torch.full((1, 2), 4.0), scale=0.25)
    torch.testing.assert_close(opt.state_for(table)["exp_avg_sq"][0], torch.ones(2))  # (0.25 * 4)^2
    torch.testing.assert_close(table.detach()[0], torch.full((2,), -0.5))  # lr 1 * 0.5^1 * sign


def test_bf16_table_keeps_an_fp32_master() -> None:
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(4, 8, generator=gen)
    fp32, bf16 = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.bfloat16())
    opt32, opt16 = _optimizer(fp32, lr=1e-3), _optimizer(bf16, lr=1e-3)
    for _ in range(3):
        g = torch.randn(2, 8, generator=gen)
        _step(opt32, [1, 2], g.clone())
        _step(opt16, [1, 2], g.clone())
    master = opt16.state_for(bf16)["master"]
    # Updates of 1e-3 are below bf16's resolution near 1: only the fp32 master keeps them.
    torch.testing.assert_close(master, init.bfloat16().float() + (fp32.detach() - init), rtol=0, atol=1e-6)
    assert torch.equal(bf16.detach(), master.bfloat16())


def _reduce_worker(rank: int, world: int, num_rows: int) -> dict[str, list]:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(10 + rank)
    table = torch.nn.Parameter(torch.zeros(num_rows, 3))
    opt = SparseTableAdamW([TableSpec(table, replica_group=dist.group.WORLD)], lr=0.1, grad_divisor=world)
    ids = torch.randperm(num_rows, generator=gen)[: 2 + 3 * rank].sort().values
    rows = torch.randn(len(ids), 3, generator=gen, dtype=torch.float32)
    table.row_grad.add(ids, rows)
    opt.reduce()
    sq = opt.sq_norm()
    (got_ids,), grad = opt.touched_rows(), opt._grads[0]
    opt.step()
    from peer_dist.train.sparse_tables import table_metrics

    return {"ids": ids.tolist(), "rows": rows.tolist(), "got_ids": got_ids.tolist(), "got_rows": grad.rows_UD.tolist(),
            "sq": float(sq), "metrics": table_metrics(opt)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_rows", [40, 6])  # 40: touched rows are exchanged; 6: the dense all-reduce is cheaper
def test_replicas_sum_touched_rows_like_brute_force(num_rows: int) -> None:
    world = 3
    results = run_ranks(_reduce_worker, world, num_rows, timeout=90)
    dense = torch.zeros(num_rows, 3, dtype=torch.float64)
    touched = torch.zeros(num_rows, dtype=torch.bool)
    for r in results:
        dense.index_add_(0, torch.tensor(r["ids"]), torch.tensor(r["rows"], dtype=torch.float64))
        touched[r["ids"]] = True
    want_ids = touched.nonzero().squeeze(1)
    want_rows = dense[want_ids] / world
    for r in results:
        assert r["got_ids"] == want_ids.tolist()
        torch.testing.assert_close(torch.tensor(r["got_rows"], dtype=torch.float64), want_rows, rtol=1e-6, atol=1e-7)
        assert r["sq"] == pytest.approx(float(want_rows.square().sum()), rel=1e-5)
        assert r["metrics"] == {"tables/rows_updated_fraction": len(want_ids) / num_rows,
                                "tables/dense_exchange_fraction": 1.0 if num_rows == 6 else 0.0}


# ---------------------------------------------------------------------------- through the trainer

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
        "model.peer.num_experts=1024", "model.peer.heads=2", "model.peer.topk=4", "model.peer.d_key=16",
        "train.max_steps=1", "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0",
        "train.eval_batches=1", "train.progress=false", "train.lr=3e-3", "train.eps=1e-6", "train.grad_clip=0.05"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_first_step_equals_dense_adamw_with_the_same_clipped_global_norm(tmp_path, tiny_data, zero: int,
                                                                         precision: str) -> None:
    """One step from the same init: every row Adam sees has row step 1 in both, so sparse == dense.

    The clip (0.05, far below the norm) makes the global norm, tables included, decide every
    weight's step: a norm without the tables' rows would scale everything else differently.
    """
    from tests.helpers import final_weights, read_metrics, run_cli

    runs = {}
    for update in ("sparse", "dense"):
        name = f"{update}-z{zero}-{precision}"
        run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", f"run.name={name}",
                 f"train.zero_stage={zero}", f"train.precision={precision}", f"train.expert_update={update}"])
        row = next(r for r in read_metrics(tmp_path / name) if "train/grad_norm" in r)
        runs[update] = (row["train/grad_norm"], final_weights(tmp_path / name))
        assert ("tables/rows_updated_fraction" in row) == (update == "sparse")
    (norm_s, w_s), (norm_d, w_d) = runs["sparse"], runs["dense"]
    assert norm_d > 10 * 0.05  # clipping active (by a factor > 10)
    assert norm_s == pytest.approx(norm_d, rel=1e-5 if precision == "fp32" else 2e-2)
    tol = 1e-6 if precision == "fp32" else 1e-2  # bf16: dense table grads are rounded to bf16 first
    for key, dense in w_d.items():
        torch.testing.assert_close(w_s[key], dense, rtol=0, atol=tol, msg=key)
