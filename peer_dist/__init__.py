"""peer_dist: distributed training of language models with PEER expert-retrieval layers."""

__version__ = "0.1.0"
