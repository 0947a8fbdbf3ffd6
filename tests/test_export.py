"""Self-contained exports (weights, config with the real vocabulary, tokenizer, provenance) and
fine-tuning from one with `train --init-from` under other parallel layouts."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from peer_dist.errors import EXIT_USER_ERROR
from tests.helpers import final_weights, run_cli, train_losses
from tests.test_train import TINY


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=run"])
    run_cli(["export", str(tmp / "run"), "-o", str(tmp / "export")])
    return tmp


def test_export_holds_config_tokenizer_and_provenance(exported: Path, tiny_data: Path) -> None:
    from peer_dist.checkpoint.export import open_export
    from peer_dist.data import Manifest
    from peer_dist.data.tokenizers import ByteTokenizer

    export = open_export(exported / "export")
    info = json.loads((exported / "export" / "export.json").read_text())
    manifest = Manifest.load(tiny_data)
    assert info["step"] == 4 and info["data_fingerprint"] == manifest.fingerprint
    assert info["vocab_size"] == 257 and info["context_length"] == 32
    assert info["tokenizer"] == {"name": "byte", "vocab_size": 257, "eot_id": 256}
    assert tomllib.loads((exported / "export" / "config.toml").read_text())["model"]["vocab_size"] == 257
    assert isinstance(export.tokenizer(), ByteTokenizer) and export.step == 4
    weights = export.state_dict()
    for name, value in final_weights(exported / "run").items():
        assert torch.equal(weights[name], value), name


def test_bpe_export_carries_its_tokenizer_file(tmp_path: Path, tiny_data: Path) -> None:
    from peer_dist.checkpoint.export import open_export
    from peer_dist.data import prepare

    data = tmp_path / "bpe"
    prepare([], data, tokenizer="bpe", vocab_size=300, seq_len=32, samples_per_shard=64, val_fraction=0.1, seed=0,
            max_bytes=100_000)
    run_cli(["train", *TINY, "train.max_steps=1", f"data.path={data}", f"run.dir={tmp_path}", "run.name=bpe"])
    run_cli(["export", str(tmp_path / "bpe"), "-o", str(tmp_path / "export")])
    (data / "tokenizer.json").unlink()  # the export must not need the data any more
    tok = open_export(tmp_path / "export").tokenizer()
    text = "def generate(self, prompt):\n    return 42\n"
    assert tok.vocab_size == 300 and tok.eot_id == 299
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text.encode())
    # fine-tuning this BPE model on byte-tokenized data is refused, naming the way out
    proc = run_cli(["train", "--init-from", str(tmp_path / "export"), f"data.path={tiny_data}",
                    f"run.dir={tmp_path}", "run.name=x"], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "prepare the data with the export's tokenizer" in proc.stderr


@pytest.mark.timeout(400)
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.ep=2"]), (2, ["parallel.tp=2"])],
                         ids=["1rank", "2ranks-ep2", "2ranks-tp2"])
def test_init_from_starts_from_the_export_at_any_layout(exported: Path, tiny_data: Path, nproc: int,
                                                        layout: list[str]) -> None:
    """lr 0: one step must leave the weights exactly as the export holds them (every expert row
    taken by global id into its shard, every AutoTP slice from the full matrix). The model
    section comes from the export: no model key is given here."""
    from safetensors.torch import load_file

    name = f"ft-{nproc}-{'-'.join(layout) or 'plain'}"
    proc = run_cli(["train", "--init-from", str(exported / "export"), f"data.path={tiny_data}",
                    f"run.dir={exported}", f"run.name={name}", "train.max_steps=1", "train.lr=0",
                    "train.warmup_steps=0", "train.eval_batches=1", "train.progress=false",
                    f"train.micro_batch_size={8 // nproc}", *layout], nproc=nproc, timeout=300)
    assert "initialised from export" in proc.stderr
    saved = load_file(exported / "export" / "model.safetensors")
    tuned = final_weights(exported / name)
    assert saved.keys() == tuned.keys()
    for key, value in saved.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # a forward updates them
            assert torch.equal(tuned[key], value), key
    if nproc == 1:  # the same first batch as the exported run's first step: far lower loss now
        assert train_losses(exported / name)[0] < train_losses(exported / "run")[0] - 0.1


@pytest.mark.parametrize("args,message", [
    (["model.d_model=64"], "the model comes from the export, but this run sets model.d_model: 32 -> 64"),
    (["model.peer.activation=relu"], "model.peer.activation: 'gelu' -> 'relu'"),
])
def test_init_from_refuses_another_model(exported: Path, tiny_data: Path, args: list[str], message: str) -> None:
    proc = run_cli(["train", "--init-from", str(exported / "export"), f"data.path={tiny_data}",
                    f"run.dir={exported}", "run.name=refused", *args], check=False)
    assert proc.returncode == EXIT_USER_ERROR and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (exported / "refused" / "checkpoints").exists()


def test_init_from_nothing_is_one_line(exported: Path, tiny_data: Path) -> None:
    """(A run folder is a valid source since model.add_peer: tests/test_add_peer.py starts from runs.)"""
    proc = run_cli(["train", "--init-from", str(exported / "none"), f"data.path={tiny_data}", f"run.dir={exported}",
                    "run.name=refused"], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "no export there" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_export_without_the_runs_data_needs_data(exported: Path, tmp_path: Path) -> None:
    proc = run_cli(["export", str(exported / "run"), "-o", str(tmp_path / "e"), "--data", str(tmp_path / "gone")],
                   check=False)
    assert proc.returncode == EXIT_USER_ERROR and "pass --data FOLDER" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "e").exists()
