"""LazyRowAdamW against torch's own optimizers: SparseAdam for the lazy rows, AdamW for the rest."""

from __future__ import annotations

import pytest
import torch

from peer_dist.config import load_config
from peer_dist.errors import ConfigError
from peer_dist.train.optim import LazyRowAdamW


def test_lazy_rows_equal_sparse_adam_and_dense_groups_equal_adamw() -> None:
    gen = torch.Generator().manual_seed(0)
    table0 = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    dense0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    table, ref_table = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(table0.clone())
    dense, ref_dense = torch.nn.Parameter(dense0.clone()), torch.nn.Parameter(dense0.clone())
    # SparseAdam adds eps to sqrt(v) before bias correction, AdamW (and we) after it: with a
    # negligible eps the two formulas are the same number.
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-14)
    ours = LazyRowAdamW([{"params": [table], "weight_decay": 0.0, "lazy_rows": True},
                         {"params": [dense], "weight_decay": 0.1}], **kw)
    sparse = torch.optim.SparseAdam([ref_table], **kw)
    adamw = torch.optim.AdamW([ref_dense], weight_decay=0.1, **kw)
    for step, rows in enumerate([[0, 3, 4], [3], [], [1, 3, 9]]):
        g = torch.zeros(10, 4, dtype=torch.float64)
        if rows:
            g[rows] = torch.randn(len(rows), 4, generator=gen, dtype=torch.float64)
        gd = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        table.grad, dense.grad = g.clone(), gd.clone()
        ref_table.grad = g.to_sparse(1)  # row-sparse gradient: only the touched rows
        ref_dense.grad = gd.clone()
        ours.step(), sparse.step(), adamw.step()
        torch.testing.assert_close(table, ref_table, rtol=1e-12, atol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(dense, ref_dense, rtol=1e-12, atol=1e-12, msg=f"step {step}")
    untouched = [2, 5, 6, 7, 8]
    assert torch.equal(table.detach()[untouched], table0[untouched])  # never retrieved, never moved
    assert torch.all(ours.state[table]["exp_avg"][untouched] == 0)


def test_lazy_needs_zero0_fp32() -> None:
    for bad in (["train.zero_stage=1"], ["train.precision=bf16"]):
        with pytest.raises(ConfigError, match="expert_update='lazy' needs train.zero_stage=0"):
            load_config(None, ["train.expert_update=lazy", *bad])
    assert load_config(None, ["train.expert_update=lazy"]).train.expert_update == "lazy"
