"""Data: prepare text into WebDataset token shards with a manifest, and stream them into batches.

    prepare.py     text -> tokens -> fixed-length samples -> tar shards + manifest.json
    corpus.py      which files make the corpus (default: Python's standard library source)
    tokenizers.py  byte-level and locally trained byte-level BPE
    manifest.py    the manifest, its fingerprint, local and remote (pipe:, http) locations, reads with retries
    order.py       the sample order: a pure function of (shards, seed, epoch, global index)
    loader.py      verified shard reads, the training stream, validation batches
"""

from peer_dist.data.loader import BAD_SHARD_POLICIES, TrainStream, val_batches
from peer_dist.data.manifest import Manifest, ShardInfo
from peer_dist.data.order import SampleOrder, micro_batch_sample_ids, step_sample_ids
from peer_dist.data.prepare import prepare
from peer_dist.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "BAD_SHARD_POLICIES", "BPETokenizer", "ByteTokenizer", "Manifest", "SampleOrder", "ShardInfo", "TrainStream",
    "load_tokenizer", "micro_batch_sample_ids", "prepare", "step_sample_ids", "val_batches",
]
