"""Sparse memory finetuning for PEER experts (Lin et al. 2025, "Continual Learning via Sparse Memory
Finetuning", arXiv 2510.15103): update only the experts that new data uses much more than the
background data did.

Shape suffixes: N experts of a layer, L rows this rank holds.

Ranking (the paper's TF-IDF, a batch as the document, background batches as the corpus):

    tf_i  = c_i / sum_j c_j                   c_i: retrievals of expert i by the new data
    idf_i = log((B + 1) / (df_i + 1))         df_i: background batches that retrieved i, of B
    score_i = tf_i * idf_i

The top-t experts by score (among those the new data retrieved) are the ones updated;
every other row of the layer's u/v tables gets learning-rate factor 0 (frozen: gradient
dropped, value and moments unchanged, see sparse_tables.TableSpec.row_scale).

Background statistics come from ``peer-dist usage RUN -o FILE`` (the validation split of
the run's own data by default): per layer, c and df over ``--batches`` batches. The new
data's usage is either the current step's global batch (``train.sparse_experts_select =
"step"``: a new selection every step) or a usage file of the new data made the same way
(``"phase"``: one selection for the whole run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.peer import PEER
from peer_dist.model.retrieval import batch_statistics


def tfidf_scores(counts_N: Tensor, doc_freq_N: Tensor, num_docs: int) -> Tensor:
    """score_i = (c_i / sum c) * log((B + 1) / (df_i + 1)), float64 (module doc)."""
    tf = counts_N.double() / counts_N.double().sum().clamp_min(1.0)
    idf = torch.log((num_docs + 1.0) / (doc_freq_N.double() + 1.0))
    return tf * idf


def top_experts(counts_N: Tensor, doc_freq_N: Tensor, num_docs: int, t: int) -> Tensor:
    """Global ids of the (at most) t retrieved experts of highest TF-IDF score, ties to the lower id."""
    scores = tfidf_scores(counts_N, doc_freq_N, num_docs)
    used = counts_N.gt(0).nonzero().squeeze(1)
    order = torch.argsort(-scores[used], stable=True)  # stable: equal scores keep id order
    return used[order[:t]].sort().values


def collect_usage(model: nn.Module, batches: Iterable[Tensor], batch_stats: bool = False) -> dict[str, Any]:
    """Per PEER layer, retrievals per expert (``counts``) and batches retrieving it (``doc_freq``).

    Collective over the default group (every rank the same number of batches); eval mode.
    ``batch_stats``: query BatchNorms normalise with each batch's own statistics (as in
    training) instead of their running ones; the running statistics are left unchanged.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PEER)]
    if not layers:
        raise ConfigError("the model has no PEER layer: expert usage needs one")
    stats = {name: {"counts": torch.zeros(m.num_experts, dtype=torch.float64),
                    "doc_freq": torch.zeros(m.num_experts, dtype=torch.float64)} for name, m in layers}
    model.eval()
    num, tokens = 0, 0
    with torch.no_grad(), batch_statistics(model, batch_stats):
        for batch in batches:
            for _, m in layers:
                m.reset_usage()
                m.track_usage(True)
            model(batch[:, :-1])
            num, tokens = num + 1, tokens + batch[:, :-1].numel()
            for name, m in layers:
                counts = m.usage_counts.detach().cpu().clone()
                dist.all_reduce(counts)  # one document = one global batch (every rank's share)
                stats[name]["counts"] += counts
                stats[name]["doc_freq"] += counts.gt(0).double()
    for _, m in layers:
        m.track_usage(False)
    return {"layers": stats, "batches": num, "tokens": tokens * dist.get_world_size(), "batch_stats": batch_stats}


def load_usage(path: str, key: str) -> dict[str, Any]:
    """A file written by ``peer-dist usage``, or a ConfigError naming ``key``."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path!r}: no such file; write one with `peer-dist usage RUN -o FILE`")
    usage = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(usage, dict) or "layers" not in usage:
        raise ConfigError(f"{key}={path}: not a file written by `peer-dist usage`")
    return usage


class ExpertSelector:
    """Sets, for each PEER layer, which table rows the row-sparse optimizer updates (the top-t)."""

    def __init__(self, model: nn.Module, tables: Any, train: Any) -> None:
        self.t, self.per_step = train.sparse_experts, train.sparse_experts_select == "step"
        self.background = load_usage(train.sparse_experts_background, "train.sparse_experts_background")
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PEER)]
        specs = {id(spec.param): spec for spec in tables.tables}
        self.specs = {}
        for name, m in self.layers:
            if name not in self.background["layers"]:
                raise ConfigError(f"train.sparse_experts_background has no statistics for PEER layer {name} "
                                  f"(it has {', '.join(self.background['layers'])}): another model?")
            if self.background["layers"][name]["counts"].numel() != m.num_experts:
                raise ConfigError(f"train.sparse_experts_background: layer {name} has "
                                  f"{self.background['layers'][name]['counts'].numel()} experts, the model "
                                  f"{m.num_experts}")
            self.specs[name] = [specs[id(m.expert_tables.u)], specs[id(m.expert_tables.v)]]
        # factors set before (train.old_expert_lr_scale after growth) still apply to the selected rows
        self.base = {id(spec): spec.row_scale for group in self.specs.values() for spec in group}
        self.selected: dict[str, Tensor] = {}
        if not self.per_step:
            target = load_usage(train.sparse_experts_target, "train.sparse_experts_target")
            self._apply({name: target["layers"][name]["counts"] for name, _ in self.layers})

    def start_step(self) -> None:
        """Per-step selection: count this step's retrievals (evaluation switches tracking off)."""
        if self.per_step:
            for _, m in self.layers:
                m.reset_usage()
                m.track_usage(True)

    def select(self) -> None:
        """Collective (per-step): rank the global batch's usage against the background; set row factors."""
        if not self.per_step:
            return
        counts = {}
        for name, m in self.layers:
            c = m.usage_counts.detach().clone()
            dist.all_reduce(c)  # the step's global batch (TP lanes repeat their tokens: a common factor)
            counts[name] = c.cpu()
        self._apply(counts)

    def _apply(self, counts: dict[str, Tensor]) -> None:
        bg = self.background
        for name, m in self.layers:
            layer = bg["layers"][name]
            chosen = top_experts(counts[name], layer["doc_freq"], bg["batches"], self.t)
            self.selected[name] = chosen
            mask = torch.zeros(m.num_experts, dtype=torch.bool)
            mask[chosen] = True
            ids_L = m.expert_tables.sharding.global_ids()
            scale_L = mask[ids_L].float().to(m.expert_tables.u.device)
            for spec in self.specs[name]:
                base = self.base[id(spec)]
                spec.row_scale = scale_L if base is None else scale_L * base

