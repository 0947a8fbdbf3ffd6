"""End-to-end training through DeepSpeed: data parallel == one process on the same global batch.

Every run goes through the real CLI: one plain process, or torchrun --standalone on gloo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import assert_same_run, read_metrics, run_cli

# train.eps=1e-4: Adam divides by sqrt(v) + eps, so a gradient element that is ~0 up to fp32
# round-off (the summation order differs between 1 and several ranks) moves its weight by up to
# lr * noise / eps. With the default 1e-8 a single such element reached 1e-5 after 4 steps, which
# would hide real errors of that size; with 1e-4 the runs agree to ~1e-7 (see helpers.assert_same_run).
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
    "model.peer.num_experts=256", "model.peer.heads=2", "model.peer.topk=4", "model.peer.d_key=16",
    "train.max_steps=4", "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0",
    "train.eval_batches=2", "train.progress=false", "train.lr=3e-3", "train.eps=1e-4", "train.micro_batch_size=8",
]


def _train(tmp: Path, data: Path, name: str, *extra: str, nproc: int = 1) -> Path:
    run_cli(["train", *TINY, f"data.path={data}", f"run.dir={tmp}", f"run.name={name}", *extra], nproc=nproc)
    return tmp / name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """One process, micro-batch 8: the global batch of the 2-rank runs below."""
    return _train(tmp_path_factory.mktemp("ref"), tiny_data, "ref", "train.micro_batch_size=8",
                  "train.peak_flops=1e12")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_data_parallel_equals_single_process(tmp_path: Path, tiny_data: Path, reference: Path,
                                             zero_stage: int) -> None:
    run = _train(tmp_path, tiny_data, f"dp-z{zero_stage}", "train.micro_batch_size=4",
                 f"train.zero_stage={zero_stage}", nproc=2)
    assert_same_run(run, reference)
    if zero_stage == 0:  # eval on 2 ranks reproduces the 2-rank run's own final validation
        final = [r for r in read_metrics(run) if "val/loss" in r][-1]
        assert _eval_loss(run, batches=2, batch_size=4, nproc=2) == pytest.approx(final["val/loss"], rel=1e-5)


@pytest.mark.timeout(300)
def test_grad_accum_equals_bigger_micro_batch(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    # LayerNorm queries: BatchNorm statistics depend on the micro-batch by design.
    ref = _train(tmp_path, tiny_data, "ref-ln", "train.micro_batch_size=8", "model.peer.query_norm=layernorm")
    run = _train(tmp_path, tiny_data, "accum", "train.micro_batch_size=2", "train.grad_accum=2",
                 "model.peer.query_norm=layernorm", nproc=2)
    assert_same_run(run, ref)


@pytest.mark.timeout(300)
def test_table_lr_scale_scales_only_the_expert_tables(tmp_path: Path, tiny_data: Path) -> None:
    # One step from the same init (ZeRO-1): Adam's first update is lr * g / (|g| + eps), linear in
    # the lr, so the tables move 3x as far at scale 3 as at scale 1, not at all at scale 0, and
    # every other weight takes the same step in all three runs.
    from tests.helpers import final_weights

    runs = {scale: final_weights(_train(tmp_path, tiny_data, f"s{scale}", "train.max_steps=1", "train.eps=1e-12",
                                        "train.zero_stage=1", f"train.table_lr_scale={scale}"))
            for scale in (0, 1, 3)}
    tables = {k for k in runs[0] if k.endswith(("experts.u", "experts.v"))}
    assert len(tables) == 2
    for key, init in runs[0].items():
        if key in tables:
            step1, step3 = runs[1][key] - init, runs[3][key] - init
            assert step1.abs().max() > 1e-4
            torch.testing.assert_close(step3, 3 * step1, rtol=1e-4, atol=1e-7)
        else:
            torch.testing.assert_close(runs[1][key], runs[0][key], rtol=0, atol=0)
            torch.testing.assert_close(runs[3][key], runs[0][key], rtol=0, atol=0)


@pytest.mark.timeout(300)
def test_outputs_and_eval_reproduces_final_validation(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    # The run folder holds the resolved config, TensorBoard events, metrics and a checkpoint.
    assert (reference / "config.toml").is_file()
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(reference)
    final = [r for r in rows if "val/loss" in r][-1]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(rows[0])
    # Model FLOPs: the hand-checked count of peer_dist/model/flops.py times the measured tokens/s.
    from peer_dist.config import load_config
    from peer_dist.model.flops import model_flops_per_token

    cfg = load_config(reference / "config.toml")
    per_token = model_flops_per_token(cfg.model, 257, 32)
    assert rows[0]["train/model_flops_per_s"] == pytest.approx(rows[0]["train/tokens_per_s"] * per_token)
    assert rows[0]["train/mfu"] == pytest.approx(rows[0]["train/model_flops_per_s"] / 1e12)
    assert "experts/blocks.1.ffn/expert_usage" in final and "experts/blocks.1.ffn/unevenness_kl" in final
    assert 0 < final["experts/blocks.1.ffn/expert_usage"] <= 1
    # `peer-dist eval` rebuilds the model without DeepSpeed and must agree.
    assert _eval_loss(reference, batches=2, batch_size=8, nproc=1) == pytest.approx(final["val/loss"], rel=1e-5)


def test_eval_with_batch_statistics_equals_a_training_mode_forward(reference: Path, tiny_data: Path) -> None:
    """`eval --batch-stats`: query BatchNorm normalises each batch by its own statistics, as a
    training-mode forward does (the tiny model has no dropout), and leaves the running ones alone."""
    import math

    import torch.nn.functional as F

    from peer_dist.data import val_batches
    from peer_dist.inference.loading import load_model

    out = run_cli(["eval", str(reference), "--batches", "2", "--batch-size", "8", "--batch-stats"]).stdout
    ours = float(out.split("validation loss ")[1].split()[0])
    assert "(query BatchNorm with batch statistics)" in out
    model = load_model(reference, torch.device("cpu")).model.train()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in val_batches(tiny_data, rank=0, world=1, batch_size=8, max_batches=2):
            logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            tokens += batch[:, 1:].numel()
    assert ours == pytest.approx(total / tokens, rel=1e-5)
    running = _eval_loss(reference, batches=2, batch_size=8, nproc=1)
    assert not math.isclose(ours, running, rel_tol=1e-4)  # the flag changes what is measured


def _eval_loss(run: Path, batches: int, batch_size: int, nproc: int) -> float:
    out = run_cli(["eval", str(run), "--batches", str(batches), "--batch-size", str(batch_size)], nproc=nproc).stdout
    return float(out.split("validation loss ")[1].split()[0])


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli(["train", *TINY, f"data.path={tmp_path / 'nothing'}", f"run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bad_override_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli(["train", "model.d_modle=3"], check=False)
    assert proc.returncode == 2 and "unknown config key model.d_modle" in proc.stderr


@pytest.mark.timeout(300)
def test_resume_refuses_a_different_run(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    import shutil

    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", "run.name=ref",
                    "train.micro_batch_size=8", "train.lr=0.1"], check=False)
    assert proc.returncode == 2 and "config_hash" in proc.stderr, proc.stderr[-2000:]
    # the message names the key that differs (the batch split is resume-safe, lr is not)
    assert "keys that differ: train.lr: " in proc.stderr and "-> 0.1" in proc.stderr, proc.stderr[-2000:]
    assert "micro_batch_size:" not in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.timeout(300)
def test_resume_refuses_another_sample_order(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    import shutil

    run = tmp_path / "ref"
    shutil.copytree(reference, run)  # trained with the default data.shuffle_shards = 16
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", "run.name=ref",
                    "train.max_steps=6", "data.shuffle_shards=1"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "trained with data.shuffle_shards=16, this run has data.shuffle_shards=1" in proc.stderr
    assert "continue it with data.shuffle_shards=16" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_output_to_a_log_file_is_lines_and_a_summary(tmp_path: Path, tiny_data: Path) -> None:
    """Not a terminal (as under Slurm or nohup): no progress-bar frames, no DeepSpeed accelerator
    guess, and the summary names the tokens trained, the wall time and the final checkpoint."""
    import json

    proc = run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", "run.name=log",
                    "train.progress=true"])
    assert "step/s" not in proc.stderr and "|" not in proc.stderr  # tqdm's frame: "log: 50%|#####| 2/4 ..."
    assert "Setting accelerator to CPU" not in proc.stderr + proc.stdout
    summary = json.loads(proc.stdout.split("summary: ")[1].splitlines()[0])
    # 4 steps x global batch 8 x 32 tokens (TINY on tiny_data: micro-batch 8, one process)
    assert summary["tokens"] == 4 * 8 * 32 and summary["wall_s"] > 0
    assert Path(summary["checkpoint"]).name == "step_000004" and Path(summary["checkpoint"]).is_dir()
    assert f"trained {4 * 8 * 32:,} tokens to step 4" in proc.stdout
