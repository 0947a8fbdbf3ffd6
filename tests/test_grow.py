"""`peer-dist grow`: old experts keep their rows and optimizer state under their new ids, the
function barely changes, the grown run trains (old experts frozen, or only PEER layers) and
resumes under another expert-parallel layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from peer_dist.errors import EXIT_USER_ERROR
from tests.helpers import final_weights, run_cli
from tests.test_train import TINY

OLD, NEW = 16, 24  # sub-keys per half: 256 -> 576 experts (TINY has model.peer.num_experts=256)
LAYER = "blocks.1.ffn"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("grow")
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=run"])
    return tmp


def _state(run: Path) -> tuple[dict, dict]:
    """(dense.pt, {param: {key: full table by global id}}) of a run's newest checkpoint."""
    from peer_dist.checkpoint.grow import read_full_tables
    from peer_dist.checkpoint.store import resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    dense = torch.load(ckpt.path / "state" / "dense.pt", weights_only=False)
    return dense, read_full_tables(ckpt.path / "state", dense["step_count"])[f"{LAYER}.experts"]


def test_grow_keeps_every_old_expert_under_its_new_id(trained: Path) -> None:
    proc = run_cli(["grow", str(trained / "run"), "--num-experts", str(NEW * NEW), "-o", str(trained / "g")])
    before, after = map(float, re.search(r"before (\S+)  after (\S+)", proc.stdout).groups())
    old_dense, old_tables = _state(trained / "run")
    new_dense, new_tables = _state(trained / "g")
    assert old_tables["u"]["row_step"].max() > 0  # the old run updated rows: there is state to keep
    moved = torch.zeros(NEW * NEW, dtype=torch.bool)
    for a in range(OLD):  # brute force over the sub-key pairs: (a, b) is id a*n+b before, a*m+b after
        for b in range(OLD):
            moved[a * NEW + b] = True
            for param in ("u", "v"):
                for key in ("param", "exp_avg", "exp_avg_sq", "row_step"):
                    assert torch.equal(new_tables[param][key][a * NEW + b], old_tables[param][key][a * OLD + b])
    fresh = ~moved
    assert int(fresh.sum()) == NEW * NEW - OLD * OLD
    for param in ("u", "v"):
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert not new_tables[param][key][fresh].any()  # new rows start with fresh optimizer state
    assert not new_tables["v"]["param"][fresh].any()  # new experts add nothing until trained
    u_new = new_tables["u"]["param"][fresh]
    assert abs(u_new.std().item() - 32**-0.5) < 0.01  # a fresh layer's u: N(0, 1/d_model)
    keys_old, keys_new = old_dense["params"][f"{LAYER}.sub_keys"], new_dense["params"][f"{LAYER}.sub_keys"]
    assert keys_new["param"].shape == (2, NEW, 8)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(keys_new[key][:, :OLD], keys_old[key][:, :OLD])
    assert not keys_new["exp_avg"][:, OLD:].any() and keys_new["param"][:, OLD:].std() > 0
    for name, values in old_dense["params"].items():  # every other weight and its moments unchanged
        if name != f"{LAYER}.sub_keys":
            assert all(torch.equal(values[k], new_dense["params"][name][k]) for k in values), name
    assert new_dense["step_count"] == old_dense["step_count"]
    # The function change at growth: new v rows are 0, so the output moves only by the gate mass
    # new experts take. Measured on this model at the default --key-scale 0.5: |change| ~ 1e-4.
    assert abs(after - before) < 0.01 * before


def test_grow_refuses_bad_sizes_and_existing_output(trained: Path) -> None:
    for n, why in ((200, "perfect square"), (256, "larger than")):
        proc = run_cli(["grow", str(trained / "run"), "--num-experts", str(n), "-o", str(trained / "x")], check=False)
        assert proc.returncode == EXIT_USER_ERROR and why in proc.stderr and "Traceback" not in proc.stderr
    (trained / "taken").mkdir()
    proc = run_cli(["grow", str(trained / "run"), "--num-experts", "576", "-o", str(trained / "taken")], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "overwrites nothing" in proc.stderr


@pytest.mark.timeout(400)
def test_grown_run_with_old_experts_frozen_trains_and_resumes_at_ep2(trained: Path) -> None:
    """Old experts frozen (lr factor 0) and only PEER layers trainable, trained at EP 2 from the
    single-shard grown checkpoint, then resumed at EP 1: the old rows and every non-PEER weight
    stay bit-identical, new rows and the PEER query move."""
    grown = trained / "frozen"
    run_cli(["grow", str(trained / "run"), "--num-experts", str(NEW * NEW), "-o", str(grown),
             "train.old_expert_lr_scale=0", "train.trainable=peer", "train.max_steps=6"])
    start = final_weights(grown)
    run_cli(["train", "-c", str(grown / "config.toml"), "parallel.ep=2", "train.micro_batch_size=4"], nproc=2,
            timeout=300)
    proc = run_cli(["train", "-c", str(grown / "config.toml"), "train.max_steps=8", "parallel.ep=1",
                    "train.micro_batch_size=8"])
    assert "resumed from" in proc.stderr and "step_000006" in proc.stderr
    end = final_weights(grown)
    old = torch.zeros(NEW * NEW, dtype=torch.bool)
    old.view(NEW, NEW)[:OLD, :OLD] = True
    for param in ("u", "v"):
        table = f"{LAYER}.experts.{param}"
        assert torch.equal(end[table][old], start[table][old])
    assert not torch.equal(end[f"{LAYER}.experts.v"][~old], start[f"{LAYER}.experts.v"][~old])
    assert not torch.equal(end[f"{LAYER}.query.weight"], start[f"{LAYER}.query.weight"])
    for name, value in start.items():
        if not name.startswith(LAYER) and value.is_floating_point() and "running" not in name:
            assert torch.equal(end[name], value), name


def test_row_scale_is_a_per_row_learning_rate_and_zero_freezes() -> None:
    """Rows at factor 0.5 follow torch AdamW at half the learning rate; factor 0 rows never change."""
    from torch import nn

    from peer_dist.train.sparse_tables import SparseTableAdamW, TableSpec

    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(3, 4))
    scale = torch.tensor([0.0, 0.5, 1.0])
    opt = SparseTableAdamW([TableSpec(table, row_scale=scale)], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    refs = [nn.Parameter(table.detach()[i].clone()) for i in range(3)]
    ref_opts = [torch.optim.AdamW([refs[i]], lr=1e-2 * float(scale[i]), betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0) for i in (1, 2)]
    start = table.detach().clone()
    for _ in range(3):
        grad = torch.randn(3, 4)
        table.row_grad.add(torch.arange(3), grad)
        for i, ref in zip((1, 2), ref_opts):
            refs[i].grad = grad[i].clone()
            ref.step()
        opt.reduce()
        opt.step()
    assert torch.equal(table[0], start[0]) and not opt.state_for(table)["exp_avg"][0].any()
    for i in (1, 2):
        torch.testing.assert_close(table.detach()[i], refs[i].detach(), rtol=1e-6, atol=1e-7)


def test_grow_onto_new_data_starts_a_new_phase(trained: Path, tmp_path: Path) -> None:
    """data.path set to other data: the grown checkpoint is step 0 on that data (its fingerprint,
    a fresh schedule), and training it runs from step 0 with the moments kept."""
    from peer_dist.checkpoint.store import resolve_checkpoint
    from peer_dist.data import Manifest, prepare

    other = tmp_path / "other"
    prepare([], other, tokenizer="byte", seq_len=32, samples_per_shard=64, val_fraction=0.1, seed=1,
            max_bytes=100_000)
    grown = tmp_path / "phase"
    proc = run_cli(["grow", str(trained / "run"), "--num-experts", str(NEW * NEW), "-o", str(grown),
                    f"data.path={other}", "train.max_steps=2"])
    before, after = map(float, re.search(r"before (\S+)  after (\S+)", proc.stdout).groups())
    assert abs(after - before) < 0.01 * before  # both measured on the source run's data
    state = resolve_checkpoint(grown).trainer_state()
    assert resolve_checkpoint(grown).step == 0 and state["step"] == 0 and state["consumed_samples"] == 0
    assert state["data_fingerprint"] == Manifest.load(other).fingerprint
    _, tables = _state(grown)
    assert tables["u"]["row_step"].max() > 0  # old rows' optimizer state carried into the new phase
    proc = run_cli(["train", "-c", str(grown / "config.toml")])
    assert "resumed from" in proc.stderr and resolve_checkpoint(grown).step == 2
