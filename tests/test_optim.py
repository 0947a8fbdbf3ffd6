"""GuardedAdamW (dense weights) against torch's AdamW, and the expert_update choices."""

from __future__ import annotations

import pytest
import torch

from peer_dist.config import load_config
from peer_dist.errors import ConfigError
from peer_dist.train.optim import GuardedAdamW


def test_guarded_adamw_is_adamw_and_skips_a_marked_step() -> None:
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    ours, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = GuardedAdamW([ours], lr=0.05, betas=(0.9, 0.95), weight_decay=0.1)
    adamw = torch.optim.AdamW([ref], lr=0.05, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(4):
        g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        ours.grad = g.clone()
        opt.skip_next_step = step == 2  # a bad step: nothing changes, not even the step count
        opt.step()
        if step != 2:
            ref.grad = g.clone()
            adamw.step()
        torch.testing.assert_close(ours, ref, rtol=0, atol=0, msg=f"step {step}")
    assert float(opt.state[ours]["step"]) == 3


def test_expert_update_choices() -> None:
    assert load_config(None, []).train.expert_update == "sparse"
    assert load_config(None, ["train.expert_update=dense", "train.zero_stage=2"]).train.expert_update == "dense"
    with pytest.raises(ConfigError, match="expert_update"):
        load_config(None, ["train.expert_update=lazy"])
