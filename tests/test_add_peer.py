"""PEER layers added to a trained model (model.add_peer): the output at step 0 is the original's,
and train.trainable = "added" leaves every loaded weight bit-identical, also under ZeRO and EP."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch

from peer_dist.errors import EXIT_USER_ERROR
from tests.helpers import final_weights, run_cli
from tests.test_train import TINY

ADD = ["model.add_peer_blocks=[0]", "model.peer.num_experts=256", "model.peer.heads=2", "model.peer.topk=4",
       "model.peer.d_key=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("add")
    run_cli(["train", *TINY, "model.ffn=dense", f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=dense"])
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=peer"])
    return tmp


def _models(run: Path, add_peer: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the run's model, the same weights with PEER layers added as the trainer loads them)."""
    from peer_dist.checkpoint.export import load_weights_into
    from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
    from peer_dist.config import from_dict
    from peer_dist.inference.loading import model_from_state
    from peer_dist.model import build_model
    from peer_dist.train.trainer import added_state_names

    ckpt = resolve_checkpoint(run)
    cfg = from_dict(tomllib.loads((ckpt.path / "config.toml").read_text()))
    weights = load_module_state(ckpt)
    original = model_from_state(cfg, weights, ckpt.path).eval()
    torch.manual_seed(1)
    grown = build_model(dataclasses.replace(cfg.model, add_peer=add_peer, add_peer_blocks=[0]), 257)
    added = added_state_names(grown)
    assert added and not added & set(weights) or add_peer == "replace"
    load_weights_into(grown, set(weights), weights.__getitem__, ckpt.path, added)
    return original, grown.eval()


@pytest.mark.parametrize("base", ["dense", "peer"])
def test_residual_peer_leaves_the_output_exactly_unchanged(runs: Path, base: str) -> None:
    original, grown = _models(runs / base, "residual")
    tokens = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grown(tokens), original(tokens))
        grown.blocks[0].added_peer.expert_tables.v.normal_()  # the branch is live: not equal once v moves
        assert not torch.equal(grown(tokens), original(tokens))


def test_replace_equals_the_model_without_that_ffn(runs: Path) -> None:
    """Reference: the original with block 0's FFN output projection zeroed (its FFN computes 0)."""
    original, grown = _models(runs / "dense", "replace")
    with torch.no_grad():
        original.blocks[0].ffn.fc_out.weight.zero_()
        tokens = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(grown(tokens), original(tokens), rtol=0, atol=0)


@pytest.mark.timeout(400)
def test_only_added_layers_train_under_zero1_and_ep2(runs: Path, tiny_data: Path) -> None:
    source = final_weights(runs / "dense")
    run_cli(["train", "--init-from", str(runs / "dense"), f"data.path={tiny_data}", f"run.dir={runs}",
             "run.name=added", "model.add_peer=residual", *ADD, "train.trainable=added", "train.max_steps=3",
             "train.zero_stage=1", "parallel.ep=2", "train.micro_batch_size=4", "train.progress=false",
             "train.eval_batches=1", "train.warmup_steps=1", "train.lr=3e-3"], nproc=2, timeout=300)
    end = final_weights(runs / "added")
    for name, value in source.items():
        assert torch.equal(end[name], value), name  # every loaded tensor, also the dense blocks' buffers
    new = [n for n in end if n not in source]
    assert new and all(n.startswith("blocks.0.added_peer.") for n in new)
    assert end["blocks.0.added_peer.experts.v"].abs().sum() > 0  # the added layer trained from v = 0
    assert "validation loss" in run_cli(["eval", str(runs / "added"), "--batches", "1"]).stdout  # rebuilt with it
    proc = run_cli(["export", str(runs / "added"), "--format", "hf", "-o", str(runs / "hf")], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "model.add_peer" in proc.stderr and "Traceback" not in proc.stderr


def test_add_peer_config_errors(runs: Path, tiny_data: Path) -> None:
    cases = [(["model.add_peer=replace", "model.add_peer_blocks=[1]"], runs / "peer", "replaces dense FFNs"),
             (["train.trainable=added"], runs / "dense", "needs model.add_peer")]
    for extra, source, why in cases:
        proc = run_cli(["train", "--init-from", str(source), f"data.path={tiny_data}", f"run.dir={runs}",
                        "run.name=bad", *extra], check=False)
        assert proc.returncode == EXIT_USER_ERROR and why in proc.stderr and "Traceback" not in proc.stderr
