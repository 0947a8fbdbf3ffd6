"""Data: prepare corpora into WebDataset token shards with a manifest, verify them, stream them into batches.

    prepare.py     the prepare steps: plan, tokenizer, chunks in worker processes, manifest; parts and merge
    corpus.py      which files make the corpus (default: Python's standard library source), chunks, samples
    records.py     reading text, JSON Lines (plain, gzip, zstd) and Parquet files as documents
    chunks.py      one chunk -> tokens -> train/validation split by document hash -> its shards (a worker)
    tokenizers.py  byte-level, locally trained byte-level BPE, or a given tokenizer.json
    manifest.py    the manifest, its fingerprint, local and remote (pipe:, http) locations, reads with retries
    verify.py      every shard (or one rank's) checked against the manifest: sizes and sha256, in parallel
    order.py       the sample order: a pure function of (shards, seed, epoch, global index)
    loader.py      verified shard reads, the training stream, validation batches

The loader is imported lazily (it needs torch and webdataset): preparing and verifying
data need neither, so the prepare workers start faster and smaller without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from peer_dist.data.manifest import Manifest, ShardInfo
from peer_dist.data.order import SampleOrder, micro_batch_sample_ids, step_sample_ids
from peer_dist.data.prepare import merge_parts, prepare
from peer_dist.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer
from peer_dist.data.verify import verify_data

_LAZY = ("BAD_SHARD_POLICIES", "TrainStream", "val_batches")  # from loader.py

__all__ = [
    "BAD_SHARD_POLICIES", "BPETokenizer", "ByteTokenizer", "Manifest", "SampleOrder", "ShardInfo", "TrainStream",
    "load_tokenizer", "merge_parts", "micro_batch_sample_ids", "prepare", "step_sample_ids", "val_batches",
    "verify_data",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.loader"), name)
