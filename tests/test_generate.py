"""Generation: the KV cache against full recomputation, padding, sampling filters, streaming, and
`peer-dist generate` from a checkpoint and an export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer_dist.errors import EXIT_USER_ERROR
from peer_dist.inference.generate import Sampling, TextStream, generate, next_token
from peer_dist.model.transformer import KVCache
from tests.helpers import run_cli, small_lm
from tests.test_train import TINY

KINDS = ["dense", "moe", "pkm", "peer"]


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_equals_full_recompute(kind: str) -> None:
    """Prefill 5 tokens, then 3 tokens at once, then one at a time: every position's logits
    equal those of one forward over the whole sequence without a cache."""
    model = small_lm(kind)
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(model, 2, 12)
        parts = [model(tokens[:, :5], cache), model(tokens[:, 5:8], cache)]
        parts += [model(tokens[:, t:t + 1], cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("kind", ["dense", "peer"])
def test_left_padded_batch_equals_each_prompt_alone(kind: str) -> None:
    model = small_lm(kind)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 257, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    sampling = Sampling(max_new_tokens=6, temperature=0)
    batched = generate(model, prompts, sampling, eot_id=-1)
    alone = [generate(model, [p], sampling, eot_id=-1)[0] for p in prompts]
    assert batched == alone
    # and the padded prefill's logits at the real positions equal the unpadded ones
    with torch.no_grad():
        pad = torch.tensor([6, 0, 3])
        tokens = torch.zeros(3, 9, dtype=torch.int64)
        for b, p in enumerate(prompts):
            tokens[b, pad[b]:] = torch.tensor(p)
        padded = model(tokens, KVCache.for_model(model, 3, 9, pad))
        for b, p in enumerate(prompts):
            torch.testing.assert_close(padded[b, pad[b]:], model(torch.tensor([p]))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_argmax_of_full_recompute(kind: str) -> None:
    model = small_lm(kind)
    prompt = [256, 10, 20, 30, 40]
    got = generate(model, [prompt], Sampling(max_new_tokens=10, temperature=0), eot_id=-1)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_generation_stops_at_end_of_text() -> None:
    model = small_lm("dense")
    free = generate(model, [[256, 1, 2]], Sampling(max_new_tokens=8, temperature=0), eot_id=-1)[0]
    # pretend the last id that is new in this greedy output is end-of-text: it stops there
    i = max(i for i in range(len(free)) if free[i] not in free[:i])
    assert generate(model, [[256, 1, 2]], Sampling(max_new_tokens=8, temperature=0), eot_id=free[i])[0] == free[:i]


def test_sampling_filters_and_seed() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)

    def draws(**kw: float) -> torch.Tensor:
        s = Sampling(temperature=1.0, **kw)
        return torch.stack([next_token(logits, s, gen) for _ in range(4000)]).flatten()

    # top-k 2: only the two most likely, in ratio 0.5 : 0.3
    d = draws(top_k=2)
    assert set(d.tolist()) == {0, 1}
    assert (d == 0).float().mean() == pytest.approx(0.5 / 0.8, abs=0.03)
    # top-p 0.6: the mass before id 1 is 0.5 < 0.6 (kept), before id 2 it is 0.8 (dropped)
    assert set(draws(top_p=0.6).tolist()) == {0, 1}
    assert set(draws(top_p=0.4).tolist()) == {0}
    # no filter: frequencies follow the softmax
    freq = torch.bincount(draws(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    # the same seed gives the same text
    model = small_lm("peer")
    runs = [generate(model, [[256, 5, 6]], Sampling(max_new_tokens=8, temperature=1.0, seed=s), -1) for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_stream_holds_back_an_incomplete_character() -> None:
    shown: list[str] = []
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), shown.append)
    for b in "aé€".encode():
        stream.add(b)
    stream.close()
    assert "".join(shown) == "aé€" and "\ufffd" not in "".join(shown)


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=run", "parallel.ep=2",
             "train.micro_batch_size=4"], nproc=2)
    run_cli(["export", str(tmp / "run"), "-o", str(tmp / "export")])
    return tmp


def test_generate_from_an_expert_parallel_checkpoint_and_its_export(trained: Path) -> None:
    """The checkpoint's expert shards (EP 2) are merged; the export gives the same greedy text,
    which is the model's own argmax continuation."""
    from peer_dist.inference.loading import load_model

    args = ["--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    from_run = run_cli(["generate", str(trained / "run"), *args]).stdout
    from_export = run_cli(["generate", str(trained / "export"), *args]).stdout
    assert from_run == from_export and from_run.startswith("def ")
    loaded = load_model(trained / "export")
    ids = generate(loaded.model, [[256, *b"def "]], Sampling(12, temperature=0), 256)[0]
    assert from_run == "def " + loaded.tokenizer.decode(ids) + "\n"


def test_batched_prompts_print_each(trained: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "p.txt"
    prompt.write_text("import os\n")
    out = run_cli(["generate", str(trained / "export"), "--prompt", "class ", "--prompt-file", str(prompt),
                   "--max-new-tokens", "5", "--top-k", "5", "--top-p", "0.9", "--seed", "1"]).stdout
    assert "--- 1 of 2 ---\nclass " in out and "--- 2 of 2 ---\nimport os\n" in out


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x" * 40], "the prompt has 41 tokens (with the leading end-of-text) and --max-new-tokens is 5"),
    (["--prompt", "x", "--device", "tpu"], "--device 'tpu' is not known; allowed: auto, cpu, cuda, cuda:N"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    ([], "give at least one --prompt"),
    (["--prompt-file", "/nonexistent/p.txt"], "--prompt-file /nonexistent/p.txt does not exist"),
])
def test_user_errors_are_one_line(trained: Path, args: list[str], message: str) -> None:
    proc = run_cli(["generate", str(trained / "export"), "--max-new-tokens", "5", *args], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_a_missing_model_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(["generate", str(tmp_path / "none"), "--prompt", "x"], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_generate_reports_both_modes(trained: Path, tmp_path: Path, tiny_data: Path) -> None:
    """Speed rows, and prompt selection whose pool is every expert (256) and every neuron (1.0):
    the continuation perplexity must equal full retrieval's, a smaller pool's must not."""
    import json

    out = run_cli(["bench", "generate", str(trained / "export"), "--prompt-len", "16", "--new-tokens", "16",
                   "--repeats", "1", "--batch", "2", "--json", str(tmp_path / "b.json"), "--prompt-experts", "8,256",
                   "--prompt-neurons", "1.0", "--data", str(tiny_data), "--eval-sequences", "20"]).stdout
    results = json.loads((tmp_path / "b.json").read_text())
    speed = results["speed"]
    ratio = speed["recompute"]["decode_tokens_per_s"] / speed["kv cache"]["decode_tokens_per_s"]
    assert any(line.startswith("recompute") and f"{ratio:.2f}x" in line for line in out.splitlines())
    assert all(row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in speed.values())
    modes = results["selection"]["modes"]
    full = modes["full retrieval"]["continuation_perplexity"]
    assert modes["experts 256"]["continuation_perplexity"] == pytest.approx(full, rel=1e-5)
    assert modes["neurons 1"]["continuation_perplexity"] == pytest.approx(full, rel=1e-5)
    assert modes["experts 8"]["continuation_perplexity"] != pytest.approx(full, rel=1e-3)
    # a sequence holds its pool of 8 rows or the table of 256 (u and v of width 32, fp32); decoding 20
    # sequences in chunks of 16 and 4 reads at most 8 x 16 and 8 x 4 pool rows (mean 80)
    assert modes["experts 8"]["expert_rows_held_per_sequence"] == 8
    assert modes["full retrieval"]["expert_rows_held_per_sequence"] == 256
    assert modes["experts 8"]["expert_mb_held_per_sequence"] == 8 * 2 * 32 * 4 / 2**20
    assert modes["experts 8"]["expert_rows_read_per_chunk"] <= 80 < modes["full retrieval"]["expert_rows_read_per_chunk"]


def test_generate_with_prompt_selection(trained: Path) -> None:
    """A pool of all 256 experts and all neurons is exact: the same greedy text as without."""
    args = ["generate", str(trained / "export"), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    plain = run_cli(args).stdout
    assert run_cli([*args, "--prompt-experts", "256", "--prompt-neurons", "1"]).stdout == plain
    run_cli([*args, "--prompt-experts", "16", "--prompt-neurons", "0.5"])
    proc = run_cli([*args, "--prompt-experts", "3"], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "--prompt-experts 3 is below the layer's top-k 4" in proc.stderr
