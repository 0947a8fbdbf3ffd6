"""LoRA on a dense model (train.lora_rank, peft): the output at step 0 is the loaded model's, only the
adapters train (every loaded weight bit-identical), a crashed run resumes to the uninterrupted run's
weights, and the export merges the adapters into W + (alpha / r) B A."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from peer_dist.errors import EXIT_USER_ERROR
from tests.helpers import ROOT, _env, final_weights, run_cli
from tests.test_train import TINY

LORA = ["train.lora_rank=4", "train.lora_alpha=8", "train.max_steps=4", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    run_cli(["train", *TINY, "model.ffn=dense", f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=dense"])
    run_cli(["train", "--init-from", str(tmp / "dense"), *TINY, *LORA, f"data.path={tiny_data}", f"run.dir={tmp}",
             "run.name=lora", "train.ckpt_interval=2"])
    return tmp


def _dense_and_adapted(run: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
    from peer_dist.config import from_dict, load_config
    from peer_dist.inference.loading import model_from_state
    from peer_dist.model.lora import apply_lora

    ckpt = resolve_checkpoint(run)
    cfg = from_dict(tomllib.loads((ckpt.path / "config.toml").read_text()))
    dense = model_from_state(cfg, load_module_state(ckpt), ckpt.path).eval()
    torch.manual_seed(0)
    adapted = apply_lora(copy.deepcopy(dense), load_config(None, ["model.ffn=dense", *LORA]).train)
    return dense, adapted.eval()


def test_adapters_leave_the_output_unchanged_at_step_0_and_add_scaled_BA(runs: Path) -> None:
    dense, adapted = _dense_and_adapted(runs / "dense")
    tokens = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(adapted(tokens), dense(tokens))  # B = 0: exactly the loaded model
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 6 * 2  # A and B for wq, wk, wv, wo, fc_in, fc_out in 2 blocks
    # Reference in float64: the adapted Linear computes x (W + alpha / r * B A)^T.
    layer = adapted.blocks[1].attn.wq
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
        W = dense.blocks[1].attn.wq.weight.double()
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        expected = x.double() @ (W + 8 / 4 * B @ A).T
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_the_base_stays_bit_identical(runs: Path) -> None:
    source, end = final_weights(runs / "dense"), final_weights(runs / "lora")
    for name, value in source.items():
        kept = name.replace(".weight", ".base_layer.weight") if name.rsplit(".", 2)[-2] in (
            "wq", "wk", "wv", "wo", "fc_in", "fc_out") else name
        assert torch.equal(end[kept], value), name
    adapters = [n for n in end if ".lora_" in n]
    assert len(adapters) == 24 and len(end) == len(source) + 24
    assert all(end[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)  # B trained away from 0


def test_crashed_lora_run_resumes_to_the_same_weights(runs: Path, tiny_data: Path) -> None:
    args = ["train", "--init-from", str(runs / "dense"), *TINY, *LORA, f"data.path={tiny_data}",
            f"run.dir={runs}", "run.name=crashed", "train.ckpt_interval=2"]
    proc = run_cli([*args, 'faults.inject=["crash:step=3"]'], check=False)
    assert proc.returncode != 0
    proc = run_cli(args)
    assert "resumed from" in proc.stderr and "step_000002" in proc.stderr
    reference, resumed = final_weights(runs / "lora"), final_weights(runs / "crashed")
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_export_merges_the_adapters(runs: Path) -> None:
    """Reference: the unmerged adapted model (peft's forward) holding the run's final weights."""
    from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
    from peer_dist.inference.loading import load_model

    _, adapted = _dense_and_adapted(runs / "dense")
    adapted.load_state_dict(load_module_state(resolve_checkpoint(runs / "lora")))
    run_cli(["export", str(runs / "lora"), "-o", str(runs / "lora-export")])
    exported = load_model(runs / "lora-export")
    assert exported.config.train.lora_rank == 0 and not any(".lora_" in n for n in exported.model.state_dict())
    tokens = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exported.model(tokens), adapted(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(exported.model(tokens), _dense_and_adapted(runs / "dense")[0](tokens))
    assert "validation loss" in run_cli(["eval", str(runs / "lora"), "--batches", "1"]).stdout


def test_lora_config_errors(runs: Path, tiny_data: Path) -> None:
    base = ["train", "--init-from", str(runs / "dense"), f"data.path={tiny_data}", f"run.dir={runs}", "run.name=bad",
            "train.lora_rank=4"]
    cases = [(["train.lora_targets=[wq, proj]"], "train.lora_targets"),
             (["train.lora_targets=[fc_gate]"], "swiglu"),
             (["train.trainable=experts"], "only the LoRA adapters")]
    for extra, why in cases:
        proc = run_cli([*base, *extra], check=False)
        assert proc.returncode == EXIT_USER_ERROR and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli(["train", *TINY, "train.lora_rank=4", f"data.path={tiny_data}", f"run.dir={runs}",
                    "run.name=bad"], check=False)  # the default model has a PEER layer
    assert proc.returncode == EXIT_USER_ERROR and "adapts a dense model" in proc.stderr
    # peft not importable (None in sys.modules: what `import peft` sees when it is not installed)
    code = ("import sys; sys.modules['peft'] = None; from peer_dist.cli import main; "
            f"sys.exit(main({[*base, 'model.ffn=dense']!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_USER_ERROR and "pip install -e '.[lora]'" in proc.stderr, proc.stderr
