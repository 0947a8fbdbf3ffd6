from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under Triton's CPU interpreter. The switch must be set
# before anything imports triton (DeepSpeed does on import, and other test modules import
# DeepSpeed at collection), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared byte-level data set cut from the standard library source (the default corpus)."""
    from peer_dist.data import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib-tiny"
    prepare([], out, tokenizer="byte", seq_len=32, samples_per_shard=64, val_fraction=0.1, seed=0,
            max_bytes=200_000)
    return out


@pytest.fixture(scope="session")
def tuned_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set of ``tiny_data`` with a tuning split (--tune-fraction 0.1) beside validation."""
    from peer_dist.data import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib-tiny-tune"
    prepare([], out, tokenizer="byte", seq_len=32, samples_per_shard=64, val_fraction=0.1, seed=0,
            max_bytes=200_000, tune_fraction=0.1)
    return out
