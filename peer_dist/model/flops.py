"""Training FLOPs and parameter counts per token, for every feed-forward kind.

Used for the paper's isoFLOP comparison (PEER paper sec. 3: dense, MoE, PKM and PEER
at equal training compute), MFU estimates and ``peer-dist sweep``.

Conventions
-----------
- One multiply-add is 2 FLOPs.
- Counted: every product of an activation with a weight matrix or table, the two
  activation-activation products of attention, and the candidate additions of
  product-key retrieval. Not counted, as in Kaplan et al. 2020 and PaLM (Chowdhery
  et al. 2022, app. B): norms, activations, softmax, gate products, residual adds,
  the input embedding lookup, top-k comparisons and the loss. For PEER/PKM these
  are O(h k) per token against the O(h k d) counted.
- Training = forward + backward. The backward of a matmul Y = X W computes dX and
  dW, each as costly as the forward: backward = 2 x forward, training = 3 x forward.
  Sparse tables (PEER experts, PKM values) are no exception: their forward touches
  only the retrieved rows and so does their backward (grads for the retrieved rows
  and for the input), still 2 x forward. The ONE exception is sub-key scoring:
  its forward scores all n sub-keys, but top-k passes gradient to only k of the n
  columns, so its backward costs as a dense backward over k columns
  (product_keys.SubKeyTopK computes exactly that).
- Attention scores count the full T x T score matrix (PaLM / nanoGPT MFU
  convention), not halved for causal masking: a causal flash kernel does about half.

Per token, forward (d = d_model, V = vocab, T = seq_len; n = sqrt(N); h heads,
k top-k and d_key of the PEER/PKM layer; M = #{(i, j) : (i+1)(j+1) <= k}, the
candidate pairs of product_keys.candidate_ranks, 50 for k = 16):

    lm_head            2 d V               tied or not (the input lookup is free)
    attention.proj     8 d^2               q, k, v, o: four d x d matmuls, per layer
    attention.scores   4 T d               q . k over T keys (2 T d) + weights x values (2 T d), per layer
    dense.mlp          4 d d_ff            GELU: two d x d_ff matmuls; SwiGLU: three, 6 d d_ff
    peer.query         2 d h d_key         one Linear d -> h d_key
    peer.keys          2 h n d_key         per head and half: n sub-keys of d_key/2 (2 n d_key/2 FLOPs)
    peer.candidates    h M                 one addition per candidate pair (backward: 2 h M, one add per side)
    peer.experts       4 d h k             per retrieved expert: u . x (2 d) + scale-and-add of v (2 d)
    pkm.query, pkm.keys, pkm.candidates    as PEER
    pkm.values         2 d h k             per retrieved slot: scale-and-add of the value row
    moe.router         2 d E
    moe.experts        k * (4 or 6) d d_e  k dense MLPs of width d_e (d_expert, 0: d_ff; kind: model.mlp)

Backward = 2 x forward for every term except keys: 4 h k d_key (per head and
half: grad q = sum_k g c_k, 2 k d_key/2, plus grad of the k sub-key rows, same).

Training with frozen weights (``training_flops_per_token``: train.trainable, train.lora_rank):
the backward of a term splits into dX (the gradient of its inputs) and dW (of its
weights). dW is counted only for a term whose weights train; dX only where a gradient
must flow back: into a term whose input depends on a trained weight further down (or,
inside an attention or PEER/PKM layer, on an earlier trained part of the same layer).
Autograd computes exactly these: it builds no backward for tensors that need no grad.
So a frozen model below a trained layer costs its forward only. Per term, with
everything trained, dX + dW is the backward above (dense: dX = dW = forward; keys:
2 h k d_key each; experts: 4 d h k each; candidates and attention scores: dX only).
Frozen expert rows (train.old_expert_lr_scale = 0, unselected experts of
train.sparse_experts) are counted as trained: their row gradients are computed, then
dropped. A LoRA adapter on a Linear d_in -> d_out (rank r) adds forward 2 r (d_in + d_out),
dW 2 r (d_in + d_out) and dX 2 r d_out (into A's output) + 2 r d_in when its input needs one.

Parameter counts (``total_params`` / ``active_params``) count the model's actual
parameters, norms and embeddings included (tied embeddings once). Active = total
minus the experts / values a token does not retrieve (at most h*k, at most N).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from peer_dist.config import Config, ModelConfig, resolve_ffn_blocks
from peer_dist.errors import ConfigError
from peer_dist.model.peer import validate_peer_config
from peer_dist.model.pkm import validate_pkm_config
from peer_dist.model.product_keys import candidate_ranks

FFN_KINDS = ("dense", "peer", "moe", "pkm")

__all__ = [
    "FFN_KINDS",
    "FlopCount",
    "active_params",
    "ffn_flops_per_token",
    "flops_breakdown",
    "format_flops_breakdown",
    "model_flops_per_token",
    "total_params",
    "training_flops_breakdown",
    "training_flops_per_token",
    "trainable_params",
]


@dataclass(frozen=True)
class FlopCount:
    """Forward and backward FLOPs of one term, per token."""

    forward: float
    backward: float

    @property
    def train(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, factor: float) -> FlopCount:
        return FlopCount(self.forward * factor, self.backward * factor)


def _dense(forward: float) -> FlopCount:
    """A term whose backward is that of a matmul: dX and dW, 2 x forward."""
    return FlopCount(forward, 2.0 * forward)


# ---------------------------------------------------------------------------- FLOPs


def ffn_flops_per_token(cfg: ModelConfig, kind: str, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of ONE feed-forward block of ``kind``, by term (module docstring).

    ``seq_len`` does not change the cost of any current kind (all are per-token
    maps); it is validated and kept so every per-token count has one signature.
    """
    _require_positive("seq_len", seq_len)
    return {name: term.forward for name, term in _ffn_terms(cfg, kind).items()}


def flops_breakdown(cfg: ModelConfig, vocab_size: int, seq_len: int) -> dict[str, FlopCount]:
    """FLOPs per token of the whole model by term, each summed over the layers it occurs in.

    Keys: "lm_head", "attention.proj", "attention.scores", then "<kind>.<term>" for
    the feed-forward blocks (e.g. "dense.mlp" over all dense blocks, "peer.keys"
    over the blocks in ``model.ffn_blocks``). Insertion order is print order.
    """
    _require_positive("vocab_size", vocab_size)
    _require_positive("seq_len", seq_len)
    d, layers = cfg.d_model, cfg.n_layers
    terms = {
        "lm_head": _dense(2.0 * d * vocab_size),
        "attention.proj": _dense(8.0 * d * d) * layers,
        "attention.scores": _dense(4.0 * seq_len * d) * layers,
    }
    for kind, num_blocks in _blocks_per_kind(cfg).items():
        for name, term in _ffn_terms(cfg, kind).items():
            terms[f"{kind}.{name}"] = term * num_blocks
    return terms


def model_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of the whole model."""
    return sum(term.train for term in flops_breakdown(cfg, vocab_size, seq_len).values())


def training_flops_per_token(cfg: Config, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of ``cfg`` as it trains: frozen weights get no weight gradient, and no
    input gradient flows below the lowest trained weight (module docstring). With every weight
    trained (train.trainable = "all", no LoRA) this is :func:`model_flops_per_token`."""
    return sum(term.train for term in training_flops_breakdown(cfg, vocab_size, seq_len).values())


def training_flops_breakdown(cfg: Config, vocab_size: int, seq_len: int) -> dict[str, FlopCount]:
    """As :func:`flops_breakdown` (same keys, plus "lora" when train.lora_rank > 0), each term's backward
    reduced to the dX and dW that training ``cfg`` computes."""
    _require_positive("vocab_size", vocab_size)
    _require_positive("seq_len", seq_len)
    m, t = cfg.model, cfg.train
    trains = _trained_groups(cfg)
    special = set(resolve_ffn_blocks(m.ffn_blocks, m.n_layers)) if m.ffn != "dense" else set()
    added = set(resolve_ffn_blocks(m.add_peer_blocks, m.n_layers)) if m.add_peer != "none" else set()
    lora = set(t.lora_targets) if t.lora_rank else set()
    out: dict[str, FlopCount] = {}

    def add(name: str, count: FlopCount) -> None:
        out[name] = out.get(name, FlopCount(0.0, 0.0)) + count

    def linear(name: str, target: str, d_in: int, d_out: int, needs_dx: bool, trained: bool) -> bool:
        """One Linear (plus its adapter); returns whether its output depends on a trained weight."""
        forward = 2.0 * d_in * d_out
        add(name, FlopCount(forward, forward * (needs_dx + trained)))
        if target in lora:
            r = t.lora_rank
            add("lora", FlopCount(2.0 * r * (d_in + d_out), 2.0 * r * (d_in + d_out) + 2.0 * r * d_out
                                  + (2.0 * r * d_in if needs_dx else 0.0)))
            return True
        return needs_dx or trained

    grad = "embed" in trains  # does the residual stream depend on a trained weight?
    d = m.d_model
    add("lm_head", FlopCount(0.0, 0.0))
    for block in range(m.n_layers):
        # attention: q, k, v -> scores -> o
        qkv = [linear("attention.proj", name, d, d, grad, "dense" in trains) for name in ("wq", "wk", "wv")]
        scores = 4.0 * seq_len * d
        add("attention.scores", FlopCount(scores, 2.0 * scores if any(qkv) else 0.0))
        attn = linear("attention.proj", "wo", d, d, any(qkv), "dense" in trains)
        ffn_in = grad or attn
        # The block's FFN and, beside it or instead of it, an added PEER layer: both read the same input.
        kinds = [] if m.add_peer == "replace" and block in added else [(m.ffn if block in special else "dense", "ffn")]
        kinds += [("peer", "added")] if block in added else []
        outputs = [_ffn_training(cfg, kind, ffn_in, trains, where, add, linear) for kind, where in kinds]
        grad = ffn_in or any(outputs)
    head = 2.0 * d * vocab_size
    out["lm_head"] = FlopCount(head, head * (grad + ("embed" in trains)))
    return out


def _trained_groups(cfg: Config) -> set[str]:
    """Which weights train: "embed", "dense" (attention, dense MLPs, MoE), "ffn.<part>" and "added.<part>"
    for the PEER/PKM layers of model.ffn and of model.add_peer (part: query, keys, tables)."""
    t = cfg.train
    parts = ("query", "keys", "tables")
    if t.lora_rank:
        return set()
    if t.trainable == "all":
        return {"embed", "dense", *(f"{w}.{p}" for w in ("ffn", "added") for p in parts)}
    if t.trainable == "peer":
        return {f"{w}.{p}" for w in ("ffn", "added") for p in parts} if cfg.model.ffn == "peer" else \
            {f"added.{p}" for p in parts}
    if t.trainable == "added":
        return {f"added.{p}" for p in parts}
    return {"ffn.tables", "added.tables"}  # "experts": the tables of every PEER (and PKM) layer


def _ffn_training(cfg: Config, kind: str, needs_dx: bool, trains: set[str], where: str, add: Any,
                  linear: Any) -> bool:
    """Add one feed-forward block's training FLOPs; returns whether its output depends on a trained weight."""
    m = cfg.model
    if kind == "dense":
        gated = _mlp_matrices(m) == 3
        hidden = [linear("dense.mlp", name, m.d_model, m.d_ff, needs_dx, "dense" in trains)
                  for name in (("fc_in", "fc_gate") if gated else ("fc_in",))]
        return linear("dense.mlp", "fc_out", m.d_ff, m.d_model, any(hidden), "dense" in trains)
    if kind == "moe":
        trained = "dense" in trains
        for name, term in _ffn_terms(m, kind).items():
            add(f"moe.{name}", FlopCount(term.forward, term.forward * (needs_dx + trained)))
        return needs_dx or trained
    terms = _ffn_terms(m, kind)
    query, keys, tables = (f"{where}.{p}" in trains for p in ("query", "keys", "tables"))
    # Scores and gates depend on a trained weight when the input does or the query / keys train.
    scored = needs_dx or query or keys
    half = terms["keys"].backward / 2  # grad of the query, grad of the k sub-key rows: 2 h k d_key each
    rows = terms["experts" if kind == "peer" else "values"]
    parts: dict[str, FlopCount] = {
        "query": FlopCount(terms["query"].forward, terms["query"].forward * (needs_dx + query)),
        "keys": FlopCount(terms["keys"].forward, half * ((needs_dx or query) + keys)),
        "candidates": FlopCount(terms["candidates"].forward, terms["candidates"].backward * scored),
    }
    if kind == "peer":  # per slot: dX of the input (through u, 2 d), of the gate (v . dy, 2 d); dW of u and v (4 d)
        quarter = rows.backward / 4
        parts["experts"] = FlopCount(rows.forward, quarter * (needs_dx + scored + 2 * tables))
    else:  # per slot: dX of the gate (2 d), dW of the value row (2 d)
        parts["values"] = FlopCount(rows.forward, rows.backward / 2 * (scored + tables))
    for name, count in parts.items():
        add(f"{kind}.{name}", count)
    return scored or tables


def format_flops_breakdown(cfg: ModelConfig, vocab_size: int, seq_len: int) -> str:
    """A printable table: per-token forward and training FLOPs by term, share, totals, params."""
    terms = flops_breakdown(cfg, vocab_size, seq_len)
    total = sum(terms.values(), FlopCount(0.0, 0.0))
    lines = [f"{'term':<20} {'forward/token':>14} {'train/token':>14} {'share':>7}"]
    for name, term in terms.items():
        share = term.train / total.train if total.train else 0.0
        lines.append(f"{name:<20} {term.forward:>14.4g} {term.train:>14.4g} {share:>7.1%}")
    lines.append(f"{'total':<20} {total.forward:>14.4g} {total.train:>14.4g} {1:>7.1%}")
    lines.append(
        f"params: total {total_params(cfg, vocab_size):,}, active per token {active_params(cfg, vocab_size):,} "
        f"(ffn={cfg.ffn}, blocks {resolve_ffn_blocks(cfg.ffn_blocks, cfg.n_layers)}, seq_len={seq_len})"
    )
    return "\n".join(lines)


def _blocks_per_kind(cfg: ModelConfig) -> dict[str, int]:
    """{"dense": blocks, cfg.ffn: blocks}: blocks not in ``model.ffn_blocks`` are dense."""
    special = len(resolve_ffn_blocks(cfg.ffn_blocks, cfg.n_layers))
    counts = {"dense": cfg.n_layers - special}
    counts[cfg.ffn] = counts.get(cfg.ffn, 0) + special  # ffn="dense": all blocks are dense
    if cfg.add_peer != "none":  # PEER layers added beside (residual) or instead of (replace) dense FFNs
        added = len(resolve_ffn_blocks(cfg.add_peer_blocks, cfg.n_layers))
        counts["peer"] = counts.get("peer", 0) + added
        if cfg.add_peer == "replace":
            counts["dense"] -= added
    return {kind: n for kind, n in counts.items() if n > 0}


def _ffn_terms(cfg: ModelConfig, kind: str) -> dict[str, FlopCount]:
    d = cfg.d_model
    if kind == "dense":
        return {"mlp": _dense(2.0 * _mlp_matrices(cfg) * d * cfg.d_ff)}
    if kind == "moe":
        num_experts, topk, d_expert = _moe_shape(cfg)
        return {
            "router": _dense(2.0 * d * num_experts),
            "experts": _dense(topk * 2.0 * _mlp_matrices(cfg) * d * d_expert),
        }
    if kind in ("peer", "pkm"):
        heads, topk, d_key, num_sub = _retrieval_shape(cfg, kind)
        slots = heads * topk
        terms = {
            "query": _dense(2.0 * d * heads * d_key),
            # Forward scores all n sub-keys per half; backward only the k winners (module docstring).
            "keys": FlopCount(2.0 * heads * num_sub * d_key, 4.0 * heads * topk * d_key),
            "candidates": _dense(float(heads * len(candidate_ranks(topk)))),
        }
        if kind == "peer":
            terms["experts"] = _dense(4.0 * d * slots)
        else:
            terms["values"] = _dense(2.0 * d * slots)
        return terms
    raise ConfigError(f"model.ffn = {kind!r}: allowed kinds are {', '.join(FFN_KINDS)}")


def _mlp_matrices(cfg: ModelConfig) -> int:
    """Weight matrices of one dense MLP: GELU has in and out, SwiGLU adds the gate."""
    if cfg.mlp not in ("gelu", "swiglu"):
        raise ConfigError(f"model.mlp = {cfg.mlp!r}: allowed are 'gelu', 'swiglu'")
    return 3 if cfg.mlp == "swiglu" else 2


def _moe_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(E, k, d_expert) with d_expert = 0 resolved to model.d_ff."""
    moe = cfg.moe
    _require_positive("model.moe.num_experts", moe.num_experts)
    if not 1 <= moe.topk <= moe.num_experts:
        raise ConfigError(f"model.moe.topk = {moe.topk}: must be in 1..model.moe.num_experts = {moe.num_experts}")
    return moe.num_experts, moe.topk, moe.d_expert or cfg.d_ff


def _retrieval_shape(cfg: ModelConfig, kind: str) -> tuple[int, int, int, int]:
    """(h, k, d_key, n) of the PEER or PKM section, validated as the layer's constructor does."""
    try:
        if kind == "peer":
            p = cfg.peer
            num_sub = validate_peer_config(
                d_model=cfg.d_model, num_experts=p.num_experts, heads=p.heads, topk=p.topk, d_key=p.d_key,
                activation=p.activation, query_norm=p.query_norm, chunk_size=1, kernel="chunked",
            )
            return p.heads, p.topk, p.d_key, num_sub
        m = cfg.pkm
        num_sub = validate_pkm_config(cfg.d_model, m.num_values, m.heads, m.topk, m.d_key, m.query_norm)
        return m.heads, m.topk, m.d_key, num_sub
    except ConfigError as exc:
        raise ConfigError(f"model.{kind}: {exc}") from None


def _require_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------- parameters


def total_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of ``TransformerLM(cfg, vocab_size)``: embeddings (tied: once), blocks, final norm."""
    return _params(cfg, vocab_size, active=False)


def active_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters one token's forward uses: total minus the experts / value slots it does not
    retrieve (it retrieves at most h*k of them, at most N). Embeddings count whole."""
    return _params(cfg, vocab_size, active=True)


def _params(cfg: ModelConfig, vocab_size: int, active: bool) -> int:
    _require_positive("vocab_size", vocab_size)
    d = cfg.d_model
    embeddings = vocab_size * d * (1 if cfg.tie_embeddings else 2)
    per_block = 4 * d * d + 2 * d  # attention projections + the two RMSNorm weights
    total = embeddings + cfg.n_layers * per_block + d  # + final norm
    for kind, num_blocks in _blocks_per_kind(cfg).items():
        total += num_blocks * _ffn_params(cfg, kind, active)
    return total


def _ffn_params(cfg: ModelConfig, kind: str, active: bool) -> int:
    d = cfg.d_model
    if kind == "dense":
        return _mlp_matrices(cfg) * d * cfg.d_ff
    if kind == "moe":
        # Assumed layout: router Linear d -> E (no bias) + E dense MLPs of width d_expert.
        num_experts, topk, d_expert = _moe_shape(cfg)
        used = topk if active else num_experts
        return d * num_experts + used * _mlp_matrices(cfg) * d * d_expert
    if kind in ("peer", "pkm"):
        heads, topk, d_key, num_sub = _retrieval_shape(cfg, kind)
        section = cfg.peer if kind == "peer" else cfg.pkm
        norm = {"batchnorm": 2 * heads * d_key, "layernorm": 2 * d_key, "none": 0}[section.query_norm]
        retrieval = d * heads * d_key + norm + num_sub * d_key  # query, its norm, 2 x n x d_key/2 sub-keys
        slots = min(heads * topk, num_sub * num_sub) if active else num_sub * num_sub
        row_params = 2 * d if kind == "peer" else d  # (u, v) per expert; one value row per slot
        return retrieval + slots * row_params
    raise ConfigError(f"model.ffn = {kind!r}: allowed kinds are {', '.join(FFN_KINDS)}")

