"""`peer-dist lifelong` end to end on tiny models: phase-B steps at equal training FLOPs, parameter counts
against the checkpoints' tensors and hand counts, and a rerun that trains nothing again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import final_weights, run_cli

MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.peer.num_experts=256",
         "model.peer.heads=2", "model.peer.topk=4", "model.peer.d_key=16", "train.micro_batch_size=8",
         "train.warmup_steps=1", "train.eval_batches=1"]
VARIANTS = ["a-dense-ft", "b-peer-ft", "c-grown-frozen", "d-grown-all", "e-dense-added-peer", "f-sparse-16",
            "g-dense-lora-2"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, str, list[str]]:
    from peer_dist.data import prepare

    tmp = tmp_path_factory.mktemp("lifelong")
    prose = tmp / "docs-byte"  # phase B: this repository's documentation (English prose), same byte tokenizer
    prepare([str(Path(__file__).resolve().parents[1] / "docs" / "*.md")], prose, tokenizer="byte", seq_len=32,
            samples_per_shard=64, val_fraction=0.1, seed=0, max_bytes=200_000)
    args = ["lifelong", "-o", str(tmp / "out"), "--data-a", str(tiny_data), "--data-b", str(prose), "--a-steps", "4",
            "--b-steps", "3", "--warmup", "1", "--sparse-t", "16", "--lora-rank", "2", "--eval-batches", "1",
            "--ckpt-interval", "2", *MODEL]
    first = run_cli(args, timeout=900).stdout
    return tmp / "out", first, args


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lifelong_equal_flops_params_and_rerun(experiment: tuple[Path, str, list[str]]) -> None:
    out, first, args = experiment
    plan = json.loads((out / "plan.json").read_text())
    assert list(plan) == VARIANTS and plan["a-dense-ft"]["steps"] == 3
    tokens = 8 * 32
    budget = 3 * plan["a-dense-ft"]["flops_per_token"] * tokens
    for name, row in plan.items():  # floor(budget / FLOPs per step): within one step of the budget
        step = row["flops_per_token"] * tokens
        assert row["steps"] == math.floor(budget / step + 1e-9) and budget - step < row["flops"] <= budget, name
        assert final_weights(out / name) and (out / f"{name}.eval-A.txt").stat().st_size
    for cheaper in ("e-dense-added-peer", "f-sparse-16", "g-dense-lora-2"):  # train less: more steps
        assert plan[cheaper]["steps"] > 3

    rows = {line.split("\t")[0]: line.split("\t") for line in (out / "results.tsv").read_text().splitlines()[1:]}
    assert list(rows) == VARIANTS and (out / "forgetting.png").stat().st_size > 0
    assert sorted(p.name for p in out.glob("a-dense-ft.step_*.eval-A.txt")) == [  # dense's curve: every step here
        f"a-dense-ft.step_00000{s}.eval-A.txt" for s in (1, 2, 3)]
    total = sum(v.numel() for v in final_weights(out / "a-dense-ft").values())
    assert rows["a-dense-ft"][-2:] == [str(total), str(total)]
    lora = sum(v.numel() for k, v in final_weights(out / "g-dense-lora-2").items() if ".lora_" in k)
    assert lora == 2 * 2 * (4 * (32 + 32) + (32 + 64) + (64 + 32))  # r (d_in + d_out) per adapted Linear, 2 blocks
    assert rows["g-dense-lora-2"][-2:] == [str(lora), str(total + lora)]
    added = {k: v for k, v in final_weights(out / "e-dense-added-peer").items() if ".added_peer." in k}
    assert int(rows["e-dense-added-peer"][-2]) == sum(v.numel() for k, v in added.items()
                                                      if v.is_floating_point() and "running" not in k)
    grown = final_weights(out / "c-grown-frozen")
    u = next(v for k, v in grown.items() if k.endswith("experts.u"))
    assert u.shape[0] == 4 * 256 and int(rows["c-grown-frozen"][-2]) == int(rows["d-grown-all"][-2]) - 256 * 2 * 32
    assert int(rows["f-sparse-16"][-2]) == 16 * 2 * 32  # 16 experts' u and v rows, one PEER layer

    (out / "b-peer-ft.eval-B.txt").unlink()
    again = run_cli(args, timeout=600).stdout
    assert "lifelong: train" not in again and "lifelong: grow" not in again and "lifelong: usage" not in again
    assert [line for line in again.splitlines() if line.startswith("lifelong: ")] == ["lifelong: eval-b-peer-ft-B"]
    assert (out / "results.tsv").read_text().splitlines()[1:] == ["\t".join(r) for r in rows.values()]


def test_dense_forgetting_at_a_perplexity_interpolates_its_curve() -> None:
    from peer_dist.sweep.lifelong_results import dense_forgetting_at

    curve = [(10.0, 0.4), (14.0, 0.2), (28.0, 0.0)]  # (B perplexity, forgetting), by perplexity
    assert dense_forgetting_at(curve, 12.0) == pytest.approx(0.3)
    assert dense_forgetting_at(curve, 21.0) == pytest.approx(0.1)
    assert dense_forgetting_at(curve, 14.0) == pytest.approx(0.2)
    assert dense_forgetting_at(curve, 9.0) is None and dense_forgetting_at(curve, 30.0) is None
