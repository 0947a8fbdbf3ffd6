"""Model code: the PEER layer and the transformer LM. Never imports distributed code."""

from peer_dist.model.peer import PEER, usage_metrics
from peer_dist.model.transformer import ExpertPlacement, TransformerLM, build_model, lm_loss

__all__ = ["ExpertPlacement", "PEER", "TransformerLM", "build_model", "lm_loss", "usage_metrics"]
