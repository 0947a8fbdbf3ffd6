"""The modules every `peer-dist export --format hf` folder ships (they import transformers, not peer_dist)."""
