"""`peer-dist sweep`: planning from FLOP budgets, real training runs, resume without retraining, results.

The end-to-end sweep trains tiny dense, MoE, PKM and PEER models through the real CLI; its
numbers are checked against a plain `peer-dist train` of the same resolved config and against
the checkpoints' own token counts.
"""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, _env, read_metrics, run_cli

SHARED = """
[overrides]
model.d_model = 32
model.n_layers = 2
model.n_heads = 2
model.d_ff = 64
train.micro_batch_size = 4
train.lr = 3e-3
train.eps = 1e-4
train.eval_interval = 0
train.eval_batches = 2
train.log_interval = 1
train.progress = false
train.ckpt_interval = 4
"""

SPEC = """
[sweep]
budgets = [{budget}]
min_steps = 4
warmup_fraction = 0.1
description = "test sweep"
""" + SHARED + """
[methods.dense]
overrides = {{ model.ffn = "dense" }}
sizes = [ {{ name = "f64", model.d_ff = 64 }}, {{ name = "f128", model.d_ff = 128 }} ]

[methods.moe]
overrides = {{ model.ffn = "moe", model.moe = {{ topk = 1, d_expert = 32 }} }}
sizes = [ {{ name = "e4", model.moe.num_experts = 4 }} ]

[methods.pkm]
overrides = {{ model.ffn = "pkm", model.pkm = {{ heads = 2, topk = 4, d_key = 16 }} }}
sizes = [ {{ name = "n16", model.pkm.num_values = 256 }} ]

[methods.peer]
overrides = {{ model.ffn = "peer", model.peer = {{ heads = 2, topk = 4, d_key = 16 }} }}
sizes = [ {{ name = "n16", model.peer.num_experts = 256 }}, {{ name = "n32", model.peer.num_experts = 1024 }} ]
"""

BUDGET = 1.2e9  # 7-13 steps of 4 x 32 tokens for these models: seconds each


def _write_spec(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.toml"
    path.write_text(text)
    return path


def _sweep(spec: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(["sweep", str(spec), "-o", str(out), *args], timeout=900, check=check)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def _trainer_state(run_dir: Path) -> dict:
    from peer_dist.checkpoint.store import list_checkpoints

    return list_checkpoints(run_dir / "checkpoints")[0].trainer_state()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    spec = _write_spec(root / "spec", SPEC.format(budget=BUDGET))
    out = root / "out"
    proc = _sweep(spec, out, f"data.path={tiny_data}", "--jobs", "2")  # the tests below check each run alone
    assert "2 at a time" in proc.stdout
    return out


def _attempt_spans(out: Path) -> dict[str, tuple[float, float]]:
    """Each run's (start, end) wall-clock seconds from its last attempt in logs/<run>.json."""
    import json

    spans = {}
    for path in (out / "logs").glob("*.json"):
        last = json.loads(path.read_text())["attempts"][-1]
        end = time.mktime(time.strptime(last["finished"], "%Y-%m-%dT%H:%M:%S"))
        spans[path.stem] = (end - last["wall_s"], end)
    return spans


def test_jobs_train_runs_side_by_side_and_never_more(sweep: Path) -> None:
    spans = sorted(_attempt_spans(sweep).values())
    assert len(spans) == 6
    # 'finished' has whole seconds: a run counts as running from 1 s after its start to its end
    events = sorted([(start + 1, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most, now = 0, 0
    for _, change in events:
        now += change
        most = max(most, now)
    assert most == 2  # two at once (each run takes several seconds), never three


def test_every_run_spends_its_budget_and_nothing_more(sweep: Path, tiny_data: Path) -> None:
    from peer_dist.config import load_config
    from peer_dist.data import Manifest
    from peer_dist.model.flops import model_flops_per_token

    rows = _rows(sweep)
    vocab = Manifest.load(tiny_data).vocab_size
    assert [(r["method"], r["size"]) for r in rows] == [
        ("dense", "f64"), ("dense", "f128"), ("moe", "e4"), ("pkm", "n16"), ("peer", "n16"), ("peer", "n32")]
    for row in rows:
        assert row["status"] == "done"
        run_dir = sweep / "runs" / row["run_name"]
        cfg = load_config(sweep / "configs" / f"{row['run_name']}.toml")
        assert cfg.model.ffn == row["ffn"]
        # what the trainer actually consumed, from its final checkpoint
        state = _trainer_state(run_dir)
        steps = int(row["steps"])
        assert state["step"] == steps == cfg.train.max_steps
        assert state["consumed_tokens"] == steps * 4 * 32
        step_flops = model_flops_per_token(cfg.model, vocab, 32) * 4 * 32
        assert float(row["flops_per_token"]) * 4 * 32 == pytest.approx(step_flops, rel=1e-12)
        assert steps * step_flops <= BUDGET < (steps + 1) * step_flops
        assert cfg.train.warmup_steps == round(0.1 * steps)
        # the table's perplexity is the run's own final validation
        val = [m for m in read_metrics(run_dir) if "val/loss" in m][-1]
        assert val["step"] == steps
        assert float(row["val_loss"]) == pytest.approx(val["val/loss"], rel=1e-12)
        assert float(row["val_perplexity"]) == pytest.approx(math.exp(val["val/loss"]), rel=1e-9)
    # bigger models cost more per token, so they get fewer steps of the same budget
    steps = {(r["method"], r["size"]): int(r["steps"]) for r in rows}
    assert steps[("dense", "f128")] < steps[("dense", "f64")]


def test_results_name_the_data_used_and_a_stated_train_loss_window(sweep: Path, tiny_data: Path) -> None:
    from peer_dist.data import Manifest

    manifest = Manifest.load(tiny_data)
    md = (sweep / "results.md").read_text()
    # data.path came from the command line: the spec's description ("test sweep") may name other
    # data, so the title is the spec's name and the data line comes from the manifest used
    assert md.startswith("# isoFLOP sweep: spec\n") and "test sweep" not in md
    data_line = next(line for line in md.splitlines() if line.startswith("Data: "))
    assert f"{tiny_data.name}: Python" in data_line and "standard library" in data_line
    assert f"seq {manifest.seq_len}" in data_line and manifest.fingerprint[:12] in data_line
    for row in _rows(sweep):  # log_interval = 1: the window's mean is a plain mean of its steps' losses
        steps = int(row["steps"])
        losses = {m["step"]: m["train/loss"] for m in read_metrics(sweep / "runs" / row["run_name"])
                  if "train/loss" in m}
        window = [losses[s] for s in range(steps - math.ceil(0.1 * steps) + 1, steps + 1)]
        assert int(row["train_loss_steps"]) == len(window)
        assert float(row["train_loss_last10pct"]) == pytest.approx(sum(window) / len(window), rel=1e-12)


def test_train_loss_tail_weights_whole_intervals() -> None:
    from peer_dist.sweep.results import train_loss_tail

    # intervals (0,50], (50,100], (100,150], (150,200] and a last short one (200,204]
    rows = [{"step": 50, "train/loss": 3.0}, {"step": 100, "train/loss": 2.0}, {"step": 150, "train/loss": 1.5},
            {"step": 200, "train/loss": 1.4}, {"step": 204, "train/loss": 1.66}, {"step": 204, "val/loss": 1.7}]
    # last 10 % of 204 steps: steps 184..204 -> the intervals ending at 200 (50 steps) and 204 (4 steps)
    loss, steps = train_loss_tail(rows, 204)
    assert steps == 54 and loss == pytest.approx((50 * 1.4 + 4 * 1.66) / 54)
    # a fraction reaching into the previous interval takes it whole
    loss, steps = train_loss_tail(rows, 204, fraction=0.3)  # from step 142 on
    assert steps == 104 and loss == pytest.approx((50 * 1.5 + 50 * 1.4 + 4 * 1.66) / 104)
    # a rollback's repeated step counts with its last row
    loss, steps = train_loss_tail(rows + [{"step": 204, "train/loss": 1.0}], 204)
    assert loss == pytest.approx((50 * 1.4 + 4 * 1.0) / 54)
    assert train_loss_tail([{"step": 3, "val/loss": 2.0}], 3) == (None, None)


def test_sweep_run_equals_a_plain_train_of_its_config(sweep: Path, tmp_path: Path) -> None:
    name = "b1.2e9-peer-n32"
    run_cli(["train", "--config", str(sweep / "configs" / f"{name}.toml"), f"run.dir={tmp_path}"])
    ours = [m["val/loss"] for m in read_metrics(sweep / "runs" / name) if "val/loss" in m]
    plain = [m["val/loss"] for m in read_metrics(tmp_path / name) if "val/loss" in m]
    assert ours == pytest.approx(plain, rel=1e-6)


def test_tables_and_plot(sweep: Path) -> None:
    rows = _rows(sweep)
    md = (sweep / "results.md").read_text()
    # Table 1: per method, the size with the lowest perplexity
    for method in ("dense", "moe", "pkm", "peer"):
        mine = [r for r in rows if r["method"] == method]
        best = min(mine, key=lambda r: float(r["val_perplexity"]))
        line = next(line for line in md.split("paper Table 1")[1].splitlines() if f"| {method} |" in line)
        assert f"| {best['size']} |" in line and f"{float(best['val_perplexity']):.3f}" in line
    # Table 2: usage and unevenness of the PEER and PKM layers, from the final validation
    usage = md.split("paper Table 2")[1]
    for row in rows:
        if row["ffn"] in ("peer", "pkm"):
            metrics = [m for m in read_metrics(sweep / "runs" / row["run_name"]) if "val/loss" in m][-1]
            layer_usage = [v for k, v in metrics.items() if k.startswith("experts/") and k.endswith("/expert_usage")]
            assert layer_usage and float(row["expert_usage"]) == pytest.approx(sum(layer_usage) / len(layer_usage))
            assert f"{100 * layer_usage[0]:.1f}%" in usage
            subkeys = [v for k, v in metrics.items() if k.startswith("experts/") and k.endswith("/subkey_usage")]
            assert subkeys and float(row["subkey_usage"]) == pytest.approx(sum(subkeys) / len(subkeys))
            assert layer_usage[0] <= subkeys[0] ** 2 + 1e-12  # the pairs lie in (used rows) x (used columns)
    from matplotlib.image import imread

    image = imread(sweep / "isoflop.png")
    assert image.shape[0] == round(4.2 * 120) and image.shape[1] == round(5.0 * 120)


def test_rerun_trains_nothing_again(sweep: Path, tiny_data: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/metrics.jsonl")}
    proc = _sweep(sweep / "spec.toml", sweep, f"data.path={tiny_data}")
    assert proc.stdout.count("done, not retrained") == 6
    after = {p.name: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/metrics.jsonl")}
    assert before == after
    assert all(r["status"] == "done" for r in _rows(sweep))


def test_changed_eval_batches_validates_again_without_training(sweep: Path, tiny_data: Path, tmp_path: Path) -> None:
    """train.eval_batches is resume-safe: a finished run is validated again with the new value
    (a new final row, the checkpoint and training rows untouched) and results use that row."""
    import shutil

    import torch

    from peer_dist.train.evaluation import run_eval
    from tests.helpers import final_weights

    out = tmp_path / "copy"
    shutil.copytree(sweep, out)
    name = "b1.2e9-dense-f64"
    before = read_metrics(out / "runs" / name)
    weights = final_weights(out / "runs" / name)
    proc = _sweep(out / "spec.toml", out, f"data.path={tiny_data}", "train.eval_batches=3", "--only", "dense/f64")
    assert "validating again with train.eval_batches = 3" in proc.stdout and "trained" not in proc.stdout.replace(
        "trained; validating", "")
    after = read_metrics(out / "runs" / name)
    assert after[: len(before)] == before
    new = [r for r in after[len(before):] if "val/loss" in r]
    assert len(new) == 1 and new[0]["val/eval_batches"] == 3 and before[-1].get("val/eval_batches", 2) == 2
    assert new[0]["val/tokens"] != [r for r in before if "val/loss" in r][-1]["val/tokens"]
    assert new[0]["val/loss"] == pytest.approx(run_eval(out / "runs" / name, max_batches=3)["val/loss"], rel=1e-6)
    after_weights = final_weights(out / "runs" / name)  # the final checkpoint, written again, same weights
    assert weights.keys() == after_weights.keys() and all(torch.equal(weights[k], after_weights[k]) for k in weights)
    row = next(r for r in _rows(out) if r["run_name"] == name)
    assert float(row["val_loss"]) == pytest.approx(new[0]["val/loss"], rel=1e-12)
    again = _sweep(out / "spec.toml", out, f"data.path={tiny_data}", "train.eval_batches=3", "--only", "dense/f64")
    assert "done, not retrained" in again.stdout and "validating again" not in again.stdout


def test_changed_spec_on_old_folder_is_refused(sweep: Path, tiny_data: Path) -> None:
    csv_before = (sweep / "results.csv").read_text()
    proc = _sweep(sweep / "spec.toml", sweep, f"data.path={tiny_data}", "train.lr=1e-3", check=False)
    assert proc.returncode == 2
    assert "holds a checkpoint" in proc.stderr and "config_hash" in proc.stderr and "Traceback" not in proc.stderr
    assert (sweep / "results.csv").read_text() == csv_before


def test_only_runs_the_named_methods_and_rejects_unknown(tmp_path: Path, tiny_data: Path) -> None:
    spec = _write_spec(tmp_path, SPEC.format(budget=BUDGET))
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", "--only", "lstm", check=False)
    assert proc.returncode == 2 and "no method 'lstm'" in proc.stderr and "dense, moe, pkm, peer" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", "--only", "dense", "--dry-run")
    assert "b1.2e9-dense-f64" in proc.stdout and "peer" not in proc.stdout.split("\n", 1)[1]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", "--only", "dense/f128", "peer", "--dry-run")
    planned = [w for w in proc.stdout.split() if w.startswith("b1.2e9-")]
    assert planned == ["b1.2e9-dense-f128", "b1.2e9-peer-n16", "b1.2e9-peer-n32"]
    # key=value words after --only are overrides, not methods
    proc = _sweep(spec, tmp_path / "out", "--only", "dense/f64", f"data.path={tiny_data}", "--dry-run")
    assert [w for w in proc.stdout.split() if w.startswith("b1.2e9-")] == ["b1.2e9-dense-f64"]
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", "--only", "dense/f32", check=False)
    assert proc.returncode == 2 and "method dense has no size 'f32'; it has: f64, f128" in proc.stderr


# ---------------------------------------------------------------------------- planning


def test_steps_for_budget_is_exact() -> None:
    from peer_dist.sweep import steps_for_budget

    # 6e18 FLOPs at 1e9 FLOPs/token and 128 x 2048 tokens/step: 22888.18... steps
    assert steps_for_budget(6e18, 1e9, 128 * 2048) == 22888
    # exact ratio of the written decimals: binary floats would give 2.99999... here
    assert steps_for_budget(0.3, 0.1, 1) == 3
    assert steps_for_budget(10.0, 3.0, 1) == 3


def test_budget_too_small_names_every_short_run(tmp_path: Path, tiny_data: Path) -> None:
    spec = _write_spec(tmp_path, SPEC.format(budget=3e7))
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "6 configuration(s) get fewer than sweep.min_steps = 4" in proc.stderr
    assert "dense/f128" in proc.stderr and "needs a budget >=" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    (("budgets = [{budget}]", "budgets = []"), "sweep.budgets must be a non-empty list"),
    (("budgets = [{budget}]", "budgets = [-1.0]"), "every budget must be a positive number"),
    (("min_steps = 4", "min_steps = 4\nbudget = 3"), "unknown key 'budget' in [sweep]"),
    (("train.ckpt_interval = 4", "train.max_steps = 4"), "sets train.max_steps"),
    (("train.ckpt_interval = 4", "train.warmup_steps = 4"), "sets train.warmup_steps"),
    (('name = "f128"', 'name = "f64"'), "the name 'f64' is used twice"),
    (('name = "f128"', 'name = "f 128"'), "use letters, digits"),
    (("model.d_ff = 64\n", "model.d_fff = 64\n"), "unknown config key model.d_fff"),
    (("topk = 1, d_expert", "topk = 9, d_expert"), "sweep point moe/e4"),
])
def test_bad_spec_is_a_clear_error(tmp_path: Path, tiny_data: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    text = SPEC.replace(old, new, 1)
    assert text != SPEC
    spec = _write_spec(tmp_path, text.format(budget=BUDGET))
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_command_line_is_a_clear_error(tmp_path: Path) -> None:
    proc = _sweep(tmp_path / "missing.toml", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "missing.toml does not exist" in proc.stderr
    spec = _write_spec(tmp_path, SPEC.format(budget=BUDGET))
    proc = run_cli(["sweep", str(spec), "data.path", "-o", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and "'data.path' is not key=value" in proc.stderr
    proc = _sweep(spec, tmp_path / "out", "data.path", check=False)  # after -o: argparse's own message
    assert proc.returncode == 2 and "unrecognized arguments: data.path" in proc.stderr
    proc = _sweep(spec, tmp_path / "out", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "needs --launcher torchrun" in proc.stderr
    proc = _sweep(spec, tmp_path / "out", "--jobs", "0", check=False)
    assert proc.returncode == 2 and "--jobs must be at least 1, got 0" in proc.stderr
    proc = _sweep(spec, tmp_path / "out", "data.path=/nowhere", check=False)
    assert proc.returncode == 2 and "/nowhere" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("preset", sorted((ROOT / "configs" / "sweeps").glob("*.toml")), ids=lambda p: p.stem)
def test_presets_plan(preset: Path, tuned_data: Path, tmp_path: Path) -> None:
    # Every shipped preset plans (configs validate, budgets buy enough steps) on the default
    # corpus with a tuning split (isoflop.toml's grid needs one); --dry-run writes nothing.
    proc = _sweep(preset, tmp_path / "out", f"data.path={tuned_data}", "--dry-run")
    assert re.search(r"\d+ runs( \(\d+ tuning\))?,", proc.stdout) and "conflict" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- interruption and launchers


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stopped_sweep_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, tiny_data: Path) -> None:
    one = SPEC.split("[methods.dense]")[0].format(budget=3 * BUDGET) + """
[methods.peer]
overrides = { model.ffn = "peer", model.peer = { heads = 2, topk = 4, d_key = 16, num_experts = 256 } }
sizes = [ { name = "n16" }, { name = "h4", model.peer.heads = 4 } ]
"""
    spec = _write_spec(tmp_path / "spec", one)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "peer_dist.cli", "sweep", str(spec), "-o", str(out), f"data.path={tiny_data}",
           "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = [out / "runs" / f"b3.6e9-peer-{size}" / "metrics.jsonl" for size in ("n16", "h4")]

    def logged(path: Path) -> int:
        return sum('"train/loss"' in line for line in path.read_text().splitlines()) if path.is_file() else 0

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if min(logged(path) for path in metrics) >= 3:  # both jobs are training
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, text
    assert "stopped on a signal" in text
    # both jobs got the signal and checkpointed part-way
    assert [r["status"][:17] for r in _rows(out)] == ["stopped (exit 75,"] * 2
    resumed = _sweep(spec, out, f"data.path={tiny_data}", "--jobs", "2")
    assert resumed.stdout.count("resuming from step") == 2
    assert [r["status"] for r in _rows(out)] == ["done", "done"]
    row = _rows(out)[0]
    # the uninterrupted reference: the same resolved config trained in one go
    run_cli(["train", "--config", str(out / "configs" / "b3.6e9-peer-n16.toml"), f"run.dir={tmp_path / 'ref'}"])
    ref = read_metrics(tmp_path / "ref" / "b3.6e9-peer-n16")
    ours = read_metrics(out / "runs" / "b3.6e9-peer-n16")
    losses = lambda rows: {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}  # noqa: E731
    assert losses(ours) == pytest.approx(losses(ref), rel=1e-6)
    assert float(row["val_loss"]) == pytest.approx([m for m in ref if "val/loss" in m][-1]["val/loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_launcher_doubles_the_global_batch(tmp_path: Path, tiny_data: Path) -> None:
    one = SPEC.split("[methods.dense]")[0].format(budget=BUDGET) + """
[methods.dense]
overrides = { model.ffn = "dense" }
sizes = [ { name = "f64" } ]
"""
    spec = _write_spec(tmp_path / "spec", one)
    single = _sweep(spec, tmp_path / "one", f"data.path={tiny_data}", "train.micro_batch_size=8")
    double = _sweep(spec, tmp_path / "two", f"data.path={tiny_data}", "--launcher", "torchrun", "--nproc", "2")
    assert "launcher torchrun x 2 processes" in double.stdout and "launcher none x 1 process" in single.stdout
    one_row, two_row = _rows(tmp_path / "one")[0], _rows(tmp_path / "two")[0]
    # 2 ranks x micro-batch 4 is the global batch of 1 process x 8: same steps, same run up to fp32 noise
    assert two_row["global_batch"] == one_row["global_batch"] == "8"
    assert two_row["steps"] == one_row["steps"] and int(two_row["steps"]) >= 4
    assert float(two_row["val_loss"]) == pytest.approx(float(one_row["val_loss"]), rel=1e-5)
    assert _trainer_state(tmp_path / "two" / "runs" / "b1.2e9-dense-f64")["consumed_tokens"] == \
        int(two_row["steps"]) * 8 * 32


# ---------------------------------------------------------------------------- seeds, bracketing, noise, tuning


def _result(method: str, size: str, params: int, ppl: float | None, seed: int = 0, budget: float = 1e12,
            ffn: str = "dense", settings: dict | None = None, stage: str = "main"):
    """A real PlannedRun + RunResult with the numbers a finished (ppl given) or pending run would have."""
    from peer_dist.config import Config
    from peer_dist.sweep.plan import PlannedRun
    from peer_dist.sweep.results import RunResult

    run = PlannedRun(budget, method, size, Config(), ffn, 257, 32, 4, 1e6, params, params, 10, "f", seed=seed,
                     stage=stage, settings=dict(settings or {}))
    if ppl is None:
        return RunResult(run, "pending")
    return RunResult(run, "done", val_loss=math.log(ppl), val_perplexity=ppl)


def test_seed_statistics_bracketing_and_noise_against_hand_numbers() -> None:
    from peer_dist.sweep.stats import aggregate, bracketing, compare

    rows = [  # dense: minimum at the middle size; peer: at its smallest; moe: 2 sizes
        ("dense", "s", 100, [6.0, 6.2]), ("dense", "m", 200, [5.0, 5.4]), ("dense", "l", 400, [5.9, 6.1]),
        ("peer", "s", 150, [4.0, 4.2]), ("peer", "m", 300, [4.5, 4.7]), ("peer", "l", 600, [4.9, 5.3]),
        ("moe", "s", 120, [4.3, 4.1]), ("moe", "m", 240, [4.4, None]),
    ]
    results = [_result(m, s, p, v, seed=i) for m, s, p, vals in rows for i, v in enumerate(vals)]
    points = {(p.method, p.size): p for p in aggregate(results)}
    dense_m = points[("dense", "m")].ppl
    assert (dense_m.mean, dense_m.n) == (pytest.approx(5.2), 2)
    assert dense_m.std == pytest.approx(math.sqrt(((5.0 - 5.2) ** 2 + (5.4 - 5.2) ** 2) / 1))  # n - 1
    assert points[("moe", "m")].ppl.n == 1 and points[("moe", "m")].ppl.std is None
    brackets = {b.method: b for b in bracketing(list(points.values()))}
    assert brackets["dense"].bracketed and brackets["dense"].best.size == "m"
    assert "interior minimum at m (between s and l)" in brackets["dense"].text
    assert not brackets["peer"].bracketed and "smallest size s: not bracketed (add a smaller size)" in \
        brackets["peer"].text
    assert not brackets["moe"].bracketed and "cannot bracket" in brackets["moe"].text
    diffs = {d.method: d for d in compare(list(brackets.values()))}
    # leader: peer s (4.1 +- 0.1414, n 2); moe s: 4.2 +- 0.1414 -> diff 0.1, se = sqrt(0.02/2 + 0.02/2) = 0.1414
    assert diffs["moe"].leader == "peer"
    assert diffs["moe"].diff == pytest.approx(0.1) and diffs["moe"].se == pytest.approx(math.sqrt(0.02))
    assert diffs["moe"].verdict.startswith("within noise")
    # dense m: 5.2 +- 0.2828 -> diff 1.1, se = sqrt(0.08/2 + 0.02/2) = 0.2236: 4.9 se
    assert diffs["dense"].se == pytest.approx(math.sqrt(0.05)) and diffs["dense"].verdict.startswith("beyond noise")


def test_markdown_states_spread_bracketing_and_noise() -> None:
    from peer_dist.sweep.results import format_markdown

    curve = (("s", 100, [6.0, 6.2]), ("m", 200, [5.0, 5.4]), ("l", 400, [5.9, 6.1]))
    results = [_result("dense", s, p, v, seed=i) for s, p, vals in curve for i, v in enumerate(vals)]
    results += [_result("peer", "s", 150, v, seed=i, ffn="peer") for i, v in enumerate([5.1, 5.5])]
    md = format_markdown(results, "t")
    assert "| dense | m | 200 | 200 | 10 | 5.200 ± 0.283 (n=2) | yes |" in md
    assert "- 1e12, dense: interior minimum at m (between s and l)" in md
    assert "- 1e12, peer: minimum at s; 1 size(s) cannot bracket it" in md
    # peer - dense = 0.1, se = sqrt(0.08/2 + 0.08/2) = 0.283: within 2 se with 2 seeds -> a third seed is due
    assert "peer − dense (best baseline) = +0.100 ± 0.283: within 2 se. Add a third seed" in md


def test_close_points_are_the_leader_and_every_method_within_two_se() -> None:
    from peer_dist.sweep.stats import close_points

    rows = [  # budget 1e12: peer leads (s: 4.1 +- 0.141); moe s 4.2 +- 0.141 is within noise (0.71 se),
        # dense m 5.2 +- 0.283 is not (4.9 se). budget 3e12: every difference beyond noise.
        (1e12, "dense", "s", 100, [6.0, 6.2]), (1e12, "dense", "m", 200, [5.0, 5.4]),
        (1e12, "peer", "s", 150, [4.0, 4.2]), (1e12, "peer", "m", 300, [4.5, 4.7]),
        (1e12, "moe", "s", 120, [4.3, 4.1]),
        (3e12, "dense", "s", 100, [5.0, 5.01]), (3e12, "peer", "s", 150, [4.0, 4.01]),
    ]
    results = [_result(m, s, p, v, seed=i, budget=b) for b, m, s, p, vals in rows for i, v in enumerate(vals)]
    assert close_points(results) == [(1e12, "peer", "s"), (1e12, "moe", "s")]
    # a budget with an unfinished point decides nothing yet
    pending = results[:-1] + [_result("peer", "s", 150, None, seed=1, budget=3e12)]
    pending[4] = _result("peer", "s", 150, None, seed=0)
    assert close_points(pending) == []


def test_choice_is_the_lowest_mean_tuning_loss_once_the_grid_is_done() -> None:
    from peer_dist.sweep.stats import choose

    grid = [({"train.lr": 1e-3, "train.table_lr_scale": 1.0}, [5.0, 5.2]),
            ({"train.lr": 1e-3, "train.table_lr_scale": 3.0}, [4.6, 4.9]),
            ({"train.lr": 2e-3, "train.table_lr_scale": 1.0}, [4.8, 4.6]),  # mean 4.7: lowest
            ({"train.lr": 2e-3, "train.table_lr_scale": 3.0}, [4.75, 4.75])]
    tune = [_result("peer", "d64", 100, math.exp(loss), seed=i, ffn="peer", settings=s, stage="tune")
            for s, losses in grid for i, loss in enumerate(losses)]
    choice = choose(tune)["peer"]
    assert choice.chosen == {"train.lr": 2e-3, "train.table_lr_scale": 1.0}
    assert choice.runs == 8 and choice.flops == pytest.approx(sum(r.run.flops for r in tune))
    # both chosen values sit at an end of their two-value lists
    assert any("train.lr = 0.002 is the grid's highest value" in e for e in choice.edges)
    assert any("train.table_lr_scale = 1 is the grid's lowest value" in e for e in choice.edges)
    pending = tune[:-1] + [_result("peer", "d64", 100, None, seed=1, ffn="peer", settings=grid[3][0], stage="tune")]
    assert choose(pending)["peer"].chosen is None  # one grid run unfinished: no choice yet


TUNED_SPEC = """
[sweep]
budgets = [{budget}]
seeds = [0, 1]
min_steps = 4
warmup_fraction = 0.1
description = "tuned test sweep"

[tune]
budget = {tune_budget}
size = "f64"
lr = [2e-3, 6e-3]
table_lr_scale = [1, 4]
""" + SHARED.replace("train.lr = 3e-3\n", "") + """
[methods.dense]
overrides = {{ model.ffn = "dense" }}
sizes = [
  {{ name = "f32", model.d_ff = 32 }}, {{ name = "f64", model.d_ff = 64 }}, {{ name = "f128", model.d_ff = 128 }},
]

[methods.peer]
overrides = {{ model.ffn = "peer", model.peer = {{ heads = 2, topk = 4, d_key = 16, num_experts = 256 }} }}
sizes = [ {{ name = "f64", model.d_ff = 64 }} ]
"""


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory: pytest.TempPathFactory, tuned_data: Path) -> Path:
    root = tmp_path_factory.mktemp("tuned")
    spec = _write_spec(root / "spec", TUNED_SPEC.format(budget=BUDGET, tune_budget=BUDGET / 2))
    out = root / "out"
    _sweep(spec, out, f"data.path={tuned_data}")
    return out


def _tune_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "tuning.csv") as fh:
        return list(csv.DictReader(fh))


def test_tuning_chooses_on_the_tuning_split_and_main_runs_use_it(tuned_sweep: Path) -> None:
    from peer_dist.config import load_config
    from peer_dist.train.evaluation import run_eval

    tune = _tune_rows(tuned_sweep)
    # dense has no tables: only its lr is searched; peer searches lr x table_lr_scale
    assert sorted((r["method"], r["lr"], r["table_lr_scale"]) for r in tune) == sorted(
        [("dense", "0.002", "1.0"), ("dense", "0.006", "1.0")]
        + [("peer", lr, t) for lr in ("0.002", "0.006") for t in ("1.0", "4.0")])
    assert {r["seed"] for r in tune} == {"0"} and {r["size"] for r in tune} == {"f64"}
    chosen = {}
    for method in ("dense", "peer"):
        losses = {}
        for row in (r for r in tune if r["method"] == method):
            run_dir = tuned_sweep / "runs" / row["run_name"]
            cfg = load_config(tuned_sweep / "configs" / f"{row['run_name']}.toml")
            assert cfg.data.eval_split == "tune"
            final = [m for m in read_metrics(run_dir) if "val/loss" in m][-1]
            # the tuning loss is the checkpoint's loss on the tuning split, evaluated again independently
            on_tune = run_eval(run_dir, split="tune", max_batches=2)["val/loss"]
            on_val = run_eval(run_dir, split="val", max_batches=2)["val/loss"]
            assert final["val/loss"] == pytest.approx(on_tune, rel=1e-5)
            assert on_tune != pytest.approx(on_val, rel=1e-6)
            assert float(row["tune_loss"]) == pytest.approx(final["val/loss"], rel=1e-12)
            losses[(cfg.train.lr, cfg.train.table_lr_scale)] = final["val/loss"]
        chosen[method] = min(losses, key=losses.get)
        assert [r["chosen"] for r in tune if r["method"] == method].count("yes") == 1
    for row in _rows(tuned_sweep):  # every reported run trains with its method's choice, scored on val
        cfg = load_config(tuned_sweep / "configs" / f"{row['run_name']}.toml")
        assert (cfg.train.lr, cfg.train.table_lr_scale) == chosen[row["method"]]
        assert cfg.data.eval_split == "val" and cfg.train.seed == int(row["seed"])
        assert row["run_name"].endswith(f"-s{row['seed']}") and row["status"] == "done"
    md = (tuned_sweep / "results.md").read_text()
    assert "Learning rates, chosen on the tuning split" in md
    for method, (lr, scale) in chosen.items():
        text = f"train.lr = {lr:g}" + (f", train.table_lr_scale = {scale:g}" if method == "peer" else "")
        assert f"| {method} | {text} |" in md


def test_tuned_sweep_reports_seed_spread_and_bracketing(tuned_sweep: Path) -> None:
    import statistics

    rows = _rows(tuned_sweep)
    assert len(rows) == 8 and sorted({r["seed"] for r in rows}) == ["0", "1"]
    md = (tuned_sweep / "results.md").read_text()
    for method, size in (("dense", "f32"), ("dense", "f64"), ("dense", "f128"), ("peer", "f64")):
        ppl = [float(r["val_perplexity"]) for r in rows if (r["method"], r["size"]) == (method, size)]
        text = f"{statistics.fmean(ppl):.3f} ± {statistics.stdev(ppl):.3f} (n=2)"
        assert f"| {method} | {size} |" in md and text in md
    assert re.search(r"- 1\.2e9, dense: (interior minimum|minimum at the (smallest|largest) size)", md)
    assert "- 1.2e9, peer: minimum at f64; 1 size(s) cannot bracket it" in md
    assert "## Differences against noise" in md and re.search(r"peer − dense \(best baseline\) = [+-]", md)
    from matplotlib.image import imread

    assert imread(tuned_sweep / "isoflop.png").shape[1] == round(5.0 * 120)


def test_tuned_sweep_rerun_trains_nothing_again(tuned_sweep: Path, tuned_data: Path) -> None:
    before = {p.parent.name: p.stat().st_mtime_ns for p in (tuned_sweep / "runs").glob("*/metrics.jsonl")}
    assert len(before) == 14  # 6 tuning runs + 4 points x 2 seeds
    proc = _sweep(tuned_sweep / "spec.toml", tuned_sweep, f"data.path={tuned_data}")
    assert proc.stdout.count("done, not retrained") == 14
    after = {p.parent.name: p.stat().st_mtime_ns for p in (tuned_sweep / "runs").glob("*/metrics.jsonl")}
    assert before == after


CLOSE_SPEC = """
[sweep]
budgets = [{budget}]
seeds = [0, 1]
close_seeds = [2]
min_steps = 4
description = "twins"
""" + SHARED + """
[methods.dense]
overrides = {{ model.ffn = "dense" }}
sizes = [ {{ name = "f32", model.d_ff = 32 }}, {{ name = "f64", model.d_ff = 64 }} ]

[methods.twin]
overrides = {{ model.ffn = "dense" }}
sizes = [ {{ name = "f32", model.d_ff = 32 }}, {{ name = "f64", model.d_ff = 64 }} ]
"""


def test_close_seeds_train_the_points_within_noise_once(tmp_path: Path, tiny_data: Path) -> None:
    """Two methods with the same configuration and seeds tie exactly (difference 0, spread > 0):
    both best points get seed 2, nothing else does, and a rerun trains nothing."""
    spec = _write_spec(tmp_path / "spec", CLOSE_SPEC.format(budget=BUDGET))
    out = tmp_path / "out"
    proc = _sweep(spec, out, f"data.path={tiny_data}")
    rows = _rows(out)
    ppl = {(r["method"], r["size"], r["seed"]): float(r["val_perplexity"]) for r in rows}
    assert all(r["status"] == "done" for r in rows)
    base = {k: v for k, v in ppl.items() if k[2] in ("0", "1")}
    assert len(base) == 8 and all(base[("dense", sz, sd)] == base[("twin", sz, sd)] for _, sz, sd in base)
    best = min(("f32", "f64"), key=lambda sz: ppl[("dense", sz, "0")] + ppl[("dense", sz, "1")])
    assert sorted(k for k in ppl if k[2] == "2") == [("dense", best, "2"), ("twin", best, "2")]
    assert ppl[("dense", best, "2")] == ppl[("twin", best, "2")]  # seed 2 trained like the others
    assert ppl[("dense", best, "2")] not in (ppl[("dense", best, "0")], ppl[("dense", best, "1")])
    assert f"within noise: seeds 2 added to 1.2e9 dense/{best}; 1.2e9 twin/{best}" in proc.stdout
    md = (out / "results.md").read_text()
    mean3 = sum(ppl[("dense", best, sd)] for sd in "012") / 3
    assert f"{mean3:.3f} ± " in md and "(n=3)" in md
    again = _sweep(out / "spec.toml", out, f"data.path={tiny_data}")
    assert again.stdout.count("done, not retrained") == 10 and "starting" not in again.stdout


@pytest.mark.parametrize("edit,message", [
    (("seeds = [0, 1]", "seeds = [0]"), "sweep.close_seeds needs sweep.seeds with at least 2 seeds"),
    (("close_seeds = [2]", "close_seeds = [1, 2]"), "sweep.close_seeds [1, 2] repeats seed(s) [1] of sweep.seeds"),
    (("close_seeds = [2]", "close_seeds = 2"), "sweep.close_seeds must be a non-empty list of integers >= 0"),
])
def test_bad_close_seeds_are_a_clear_error(tmp_path: Path, tiny_data: Path, edit: tuple[str, str],
                                           message: str) -> None:
    spec = _write_spec(tmp_path / "spec", CLOSE_SPEC.format(budget=BUDGET).replace(*edit))
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", "--dry-run", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    (("size = \"f64\"", "size = \"f16\""),
     "tune.size = 'f16', but method dense has no such size; it has: f32, f64, f128"),
    (("budget = {tune_budget}", "budget = -1"), "tune.budget must be a positive number"),
    (("lr = [2e-3, 6e-3]", "lr = 2e-3"), "tune lr must be a non-empty list of numbers > 0"),
    (("lr = [2e-3, 6e-3]", "lr = [2e-3, 2e-3]"), "tune lr = [0.002, 0.002] has duplicates"),
    (("lr = [2e-3, 6e-3]", "lrs = [2e-3]"), "unknown key 'lrs' in [tune]"),
    (("seeds = [0, 1]", "seeds = [0, -1]"), "sweep.seeds must be a non-empty list of integers >= 0"),
    (("train.log_interval = 1", "train.log_interval = 1\ntrain.lr = 1e-3"),
     "sets train.lr, which is chosen by the [tune] grid"),
    (("train.log_interval = 1", "train.log_interval = 1\ntrain.seed = 3"),
     "sets train.seed, which is set from sweep.seeds"),
    (('overrides = {{ model.ffn = "dense" }}',
      'overrides = {{ model.ffn = "dense" }}\ntune = {{ table_lr_scale = [1, 2] }}'),
     "methods.dense.tune gives table_lr_scale, but the method's model.ffn is 'dense'"),
])
def test_bad_tuning_spec_is_a_clear_error(tmp_path: Path, tuned_data: Path, edit: tuple[str, str],
                                          message: str) -> None:
    old, new = edit
    assert old in TUNED_SPEC
    spec = _write_spec(tmp_path, TUNED_SPEC.replace(old, new, 1).format(budget=BUDGET, tune_budget=BUDGET / 2))
    proc = _sweep(spec, tmp_path / "out", f"data.path={tuned_data}", "--dry-run", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_tuning_needs_data_with_a_tuning_split(tmp_path: Path, tiny_data: Path) -> None:
    spec = _write_spec(tmp_path, TUNED_SPEC.format(budget=BUDGET, tune_budget=BUDGET / 2))
    proc = _sweep(spec, tmp_path / "out", f"data.path={tiny_data}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the [tune] grid evaluates on the tuning split" in proc.stderr and "--tune-fraction" in proc.stderr
    assert not (tmp_path / "out").exists()
