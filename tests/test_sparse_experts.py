"""Sparse expert finetuning (train.sparse_experts): the TF-IDF ranking against a brute-force one, usage
statistics that add up, and training that changes only the selected experts' rows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import final_weights, run_cli
from tests.test_train import TINY

LAYER = "blocks.1.ffn"
TABLES = (f"{LAYER}.experts.u", f"{LAYER}.experts.v")


def _brute_force_top(counts: list[float], doc_freq: list[float], docs: int, t: int) -> list[int]:
    total = sum(counts)
    scored = [((c / total) * math.log((docs + 1) / (d + 1)), i) for i, (c, d) in enumerate(zip(counts, doc_freq))
              if c > 0]
    return sorted(i for _, i in sorted(scored, key=lambda s: (-s[0], s[1]))[:t])


def test_top_experts_matches_a_brute_force_tfidf() -> None:
    from peer_dist.train.sparse_experts import top_experts

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 64
        counts = torch.randint(0, 5, (n,), generator=gen).double() * (torch.rand(n, generator=gen) < 0.5)
        doc_freq = torch.randint(0, 11, (n,), generator=gen).double()
        t = 1 + trial % 12
        expected = _brute_force_top(counts.tolist(), doc_freq.tolist(), 10, t)
        assert top_experts(counts, doc_freq, 10, t).tolist() == expected
    # an expert the background never used outranks an equally used common one
    assert top_experts(torch.tensor([3.0, 3.0]), torch.tensor([10.0, 0.0]), 10, 1).tolist() == [1]


@pytest.fixture(scope="module")
def usage(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("sparse")
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=run"])
    run_cli(["usage", str(tmp / "run"), "-o", str(tmp / "background.pt"), "--batches", "5"])
    run_cli(["usage", str(tmp / "run"), "-o", str(tmp / "target.pt"), "--batches", "2", "--batch-size", "3"])
    return tmp


def test_usage_statistics_add_up(usage: Path) -> None:
    bg = torch.load(usage / "background.pt", weights_only=False)
    layer = bg["layers"][LAYER]
    assert bg["batches"] == 5 and bg["tokens"] == 5 * 8 * 32  # micro_batch_size 8, seq_len 32
    assert layer["counts"].sum() == bg["tokens"] * 2 * 4  # every token retrieves heads x topk experts
    assert layer["doc_freq"].max() <= 5 and torch.equal(layer["doc_freq"].gt(0), layer["counts"].gt(0))
    proc = run_cli(["usage", str(usage / "run"), "-o", str(usage / "background.pt")], check=False)
    assert proc.returncode == 2 and "nothing is overwritten" in proc.stderr


def test_usage_line_and_batch_statistics(usage: Path) -> None:
    """The printed line matches the file's counts; --batch-stats retrieves like a training-mode
    query BatchNorm (checked against the model's own retrieval) and leaves the running statistics."""
    from peer_dist.data import val_batches
    from peer_dist.inference.loading import load_model
    from peer_dist.model.retrieval import QueryBatchNorm, independent_halves_usage

    proc = run_cli(["usage", str(usage / "run"), "-o", str(usage / "batch.pt"), "--batches", "3", "--batch-stats"])
    counts = torch.load(usage / "batch.pt", weights_only=False)["layers"][LAYER]["counts"]
    line = next(li for li in proc.stdout.splitlines() if li.startswith(f"{LAYER}: "))
    assert f"expert usage {float(counts.gt(0).double().mean()):.2%}" in line and "batch statistics" in line
    assert f"independent sub-key choices {independent_halves_usage(counts):.2%}" in line
    loaded = load_model(usage / "run", torch.device("cpu"))
    peer = loaded.model.get_submodule(LAYER)
    norm = next(m for m in peer.modules() if isinstance(m, QueryBatchNorm))
    running = norm.running_mean.clone()
    expected = torch.zeros_like(counts)
    hidden = {}
    handle = peer.register_forward_pre_hook(lambda _m, args: hidden.__setitem__("x", args[0]))
    loaded.model.eval()
    norm.train()
    norm.momentum = 0.0
    with torch.no_grad():
        for batch in val_batches(loaded.config.data.path, rank=0, world=1, batch_size=8, max_batches=3):
            loaded.model(batch[:, :-1])
            _, ids = peer.retrieve(hidden["x"])
            expected += torch.bincount(ids.flatten(), minlength=counts.numel()).double()
    handle.remove()
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
    assert torch.equal(norm.running_mean, running)


def test_independent_halves_usage_against_sampling_and_hand_numbers() -> None:
    from peer_dist.model.retrieval import independent_halves_usage

    # 2 x 2 sub-keys, one retrieval per expert: R = 4, p = p' = (1/2, 1/2): 1 - exp(-1) per cell
    assert independent_halves_usage(torch.ones(4)) == pytest.approx(1 - math.exp(-1), abs=1e-15)
    gen = torch.Generator().manual_seed(0)
    n, draws = 32, 3000
    first = torch.softmax(torch.randn(n, generator=gen), 0)
    second = torch.softmax(2 * torch.randn(n, generator=gen), 0)
    for _ in range(20):  # independent draws: the formula is their expected coverage
        a = torch.multinomial(first, draws, replacement=True, generator=gen)
        b = torch.multinomial(second, draws, replacement=True, generator=gen)
        counts = torch.bincount(a * n + b, minlength=n * n).double()
        assert independent_halves_usage(counts) == pytest.approx(float(counts.gt(0).double().mean()), abs=0.02)  # coverage near 0.2
    # perfectly correlated choices (b = a): usage 1/n, far below what independent choices reach
    diagonal = torch.zeros(n, n)
    diagonal.diagonal().fill_(draws / n)
    assert float(diagonal.gt(0).double().mean()) == 1 / n and independent_halves_usage(diagonal.flatten()) > 0.9
    with pytest.raises(ValueError, match="n \\* n entries"):
        independent_halves_usage(torch.ones(5))


def _changed_rows(before: dict, after: dict) -> set[int]:
    return {i for name in TABLES for i in (before[name] != after[name]).any(1).nonzero().squeeze(1).tolist()}


@pytest.mark.timeout(400)
def test_phase_selection_updates_only_the_chosen_rows_at_ep2(usage: Path, tiny_data: Path) -> None:
    bg = torch.load(usage / "background.pt", weights_only=False)
    target = torch.load(usage / "target.pt", weights_only=False)
    chosen = set(_brute_force_top(target["layers"][LAYER]["counts"].tolist(),
                                  bg["layers"][LAYER]["doc_freq"].tolist(), bg["batches"], 6))
    run_cli(["train", "--init-from", str(usage / "run"), f"data.path={tiny_data}", f"run.dir={usage}",
             "run.name=phase", "train.sparse_experts=6", f"train.sparse_experts_background={usage / 'background.pt'}",
             "train.sparse_experts_select=phase", f"train.sparse_experts_target={usage / 'target.pt'}",
             "train.trainable=experts", "train.max_steps=3", "parallel.ep=2",
             "train.micro_batch_size=4", "train.progress=false", "train.eval_batches=1", "train.lr=1e-2"],
            nproc=2, timeout=300)
    before, after = final_weights(usage / "run"), final_weights(usage / "phase")
    changed = _changed_rows(before, after)
    assert changed and changed <= chosen
    for name, value in before.items():
        if name not in TABLES and "query_norm" not in name:  # BatchNorm running statistics are buffers
            assert torch.equal(after[name], value), name


def test_step_selection_with_the_rest_trainable(usage: Path, tiny_data: Path) -> None:
    """One step, t = 4 per step, every dense weight trainable: at most 4 expert rows move."""
    run_cli(["train", "--init-from", str(usage / "run"), f"data.path={tiny_data}", f"run.dir={usage}",
             "run.name=step", "train.sparse_experts=4", f"train.sparse_experts_background={usage / 'background.pt'}",
             "train.max_steps=1", "train.progress=false", "train.eval_batches=1", "train.warmup_steps=0"])
    before, after = final_weights(usage / "run"), final_weights(usage / "step")
    assert 0 < len(_changed_rows(before, after)) <= 4
    assert not torch.equal(before["blocks.0.ffn.fc_in.weight"], after["blocks.0.ffn.fc_in.weight"])
