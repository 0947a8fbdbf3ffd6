"""`peer-dist export --format hf`: transformers loads the folder with trust_remote_code; its logits
equal our model's on the same tokens (dense, MoE, PKM, PEER), model.generate() with its own
cache equals our generate, the tokenizer gives our ids, and the shipped code never imports peer_dist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer_dist.inference.generate import Sampling, generate
from tests.helpers import run_cli, small_lm
from tests.test_train import TINY

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

CONTEXT = 48


def _native_export(model: torch.nn.Module, folder: Path, tokenizer: dict | None = None) -> Path:
    """What `peer-dist export` writes, for a model built here."""
    from safetensors.torch import save_file

    from peer_dist.config import Config, dump_toml

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"step": "7"})
    cfg = Config()
    cfg.model = model.cfg
    cfg.model.vocab_size = model.vocab_size
    (folder / "config.toml").write_text(dump_toml(cfg))
    info = {"step": 7, "vocab_size": model.vocab_size, "context_length": CONTEXT,
            "tokenizer": tokenizer or {"name": "byte", "vocab_size": 257, "eot_id": 256}}
    (folder / "export.json").write_text(json.dumps(info))
    return folder


def _hf(model: torch.nn.Module, tmp: Path) -> Path:
    from peer_dist.checkpoint.export import open_export
    from peer_dist.inference.hf_export import write_hf

    return write_hf(open_export(_native_export(model, tmp / "native")), tmp / "hf")


def _load(folder: Path) -> tuple:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return model, tok


CASES = {"dense": {}, "dense-swiglu": {"mlp": "swiglu"}, "moe": {}, "pkm": {}, "peer": {},
         "peer-layernorm-relu": {"peer": {"num_experts": 256, "heads": 2, "topk": 4, "d_key": 16,
                                          "query_norm": "layernorm", "activation": "relu"}},
         "peer-untied": {"tie_embeddings": False}}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_generation_equal_ours(case: str, tmp_path: Path) -> None:
    ours = small_lm(case.split("-")[0], **CASES[case])
    theirs, tok = _load(_hf(ours, tmp_path))
    tokens = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    # a left-padded batch through transformers' generate (its own cache) against ours
    prompts = ["def f(x):", "import os"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = theirs.generate(**enc, max_new_tokens=8, do_sample=False)
    expected = generate(ours, [[256, *p.encode()] for p in prompts], Sampling(8, temperature=0), eot_id=256)
    for row, want in zip(out[:, enc["input_ids"].shape[1]:].tolist(), expected):
        assert row[:len(want)] == want


def test_tokenizers_give_our_ids(tmp_path: Path) -> None:
    from peer_dist.data.tokenizers import BPETokenizer

    texts = ["héllo wörld €", "def generate(self):\n    return 1\n", ""]
    _, byte_tok = _load(_hf(small_lm("dense"), tmp_path / "byte"))
    for text in texts:
        assert byte_tok(text)["input_ids"] == [256, *text.encode()]
        assert byte_tok.decode(byte_tok(text)["input_ids"], skip_special_tokens=True) == text
    bpe = BPETokenizer.train(["def generate(self, prompt):\n    return prompt\n" * 50, "héllo wörld"] * 20, 300)
    (tmp_path / "bpe").mkdir()
    bpe.save(tmp_path / "bpe" / "tokenizer.json")
    model = small_lm("peer", vocab=bpe.vocab_size)
    native = _native_export(model, tmp_path / "bpe" / "native", {"name": "bpe", "vocab_size": bpe.vocab_size,
                                                                  "eot_id": bpe.eot_id, "file": "tokenizer.json"})
    bpe.save(native / "tokenizer.json")
    from peer_dist.checkpoint.export import open_export
    from peer_dist.inference.hf_export import write_hf

    _, hf_tok = _load(write_hf(open_export(native), tmp_path / "bpe" / "hf"))
    for text in texts:
        assert hf_tok(text)["input_ids"] == [bpe.eot_id, *bpe.encode(text)]
        assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text


def test_the_shipped_code_runs_without_peer_dist(tmp_path: Path) -> None:
    """In a fresh interpreter where any import of peer_dist fails, the folder loads and runs."""
    folder = _hf(small_lm("peer"), tmp_path)
    script = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peer_dist":
            raise ImportError("peer_dist must not be imported")
sys.meta_path.insert(0, Refuse())
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
print(m.generate(torch.tensor([[256, 100, 101]]), max_new_tokens=3, do_sample=False).shape)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 6])" in proc.stdout
    for name in ("modeling_peer_dist.py", "configuration_peer_dist.py"):
        assert "import peer_dist" not in (folder / name).read_text()


def test_export_command_from_a_run(tmp_path: Path, tiny_data: Path) -> None:
    """train -> export --format hf -> transformers' greedy text equals `peer-dist generate`'s."""
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", "run.name=run"])
    run_cli(["export", str(tmp_path / "run"), "--format", "hf", "-o", str(tmp_path / "hf")])
    ours = run_cli(["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "10",
                    "--temperature", "0"]).stdout
    model, tok = _load(tmp_path / "hf")
    enc = tok("def ", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text == ours[:-1]  # the command ends its output with a newline
    assert json.loads((tmp_path / "hf" / "peer_dist_export.json").read_text())["step"] == 4
    proc = run_cli(["export", str(tmp_path / "run"), "--format", "hf", "-o", str(tmp_path / "hf")], check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
