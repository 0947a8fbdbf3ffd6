"""LoRA adapters on a dense model (Hu et al. 2021), through the peft library (the [lora] extra).

Each Linear named in ``train.lora_targets`` (e.g. ``wq``, ``fc_out``; every block) becomes
``peft.tuners.lora.Linear``: y = W x + (alpha / r) B A x with A (r, d_in) drawn by peft and
B (d_out, r) = 0, so the adapted model computes exactly what the loaded one did at step 0.
Only A and B train; W keeps ``requires_grad = False`` and stays bit-identical.

State-dict names change with the adapters (``blocks.0.attn.wq.base_layer.weight``,
``...wq.lora_A.default.weight``): a LoRA run's checkpoints hold them, and resume builds
the model, applies the adapters, then loads. :func:`merge_lora` folds the adapters into
W (W + (alpha / r) B A) and puts the plain Linear back: what eval, generate and export use.
"""

from __future__ import annotations

import torch
from torch import nn

from peer_dist.config import TrainConfig
from peer_dist.errors import ConfigError

__all__ = ["apply_lora", "lora_state_names", "merge_lora"]


def _peft() -> object:
    try:
        import peft
    except ImportError:
        raise ConfigError("train.lora_rank > 0 needs the peft library, which is not installed: "
                          "pip install -e '.[lora]' (launch/setup.sh installs it)") from None
    return peft


def apply_lora(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Wrap ``model``'s target Linears in LoRA adapters (in place) and freeze everything else.

    No-op when ``train.lora_rank`` is 0. Draws A from the global torch RNG (seeded by the
    trainer, so every rank draws the same adapters).
    """
    if not train.lora_rank:
        return model
    peft = _peft()
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in train.lora_targets if t not in present]
    if missing:
        raise ConfigError(f"train.lora_targets names {missing}, which this model does not have (it has "
                          f"{', '.join(sorted(present))})")
    config = peft.LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, target_modules=list(train.lora_targets),
                             lora_dropout=0.0, bias="none", init_lora_weights=True)
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_state_names(model: nn.Module) -> set[str]:
    """State-dict names of the adapters' A and B matrices."""
    return {name for name in model.state_dict() if ".lora_" in name}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + (alpha / r) B A) and put the plain Linear back."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                with torch.no_grad():
                    child.merge()
                setattr(parent, child_name, child.get_base_layer())
    return model
