"""Autoregressive generation with a KV cache: batched, left-padded prompts, sampling, streaming.

Shape suffixes: B sequences, P padded prompt length, V vocabulary.

    prefill:  logits of the whole padded prompt batch in one forward, keys and values cached
    decode:   one token per sequence per step; each step's forward sees only the new token
              and attends over the cache (equal to recomputing the full sequence: tested)

Every prompt starts with the end-of-text id, the document separator of the training
stream, so the model reads it as the beginning of a document. A sequence stops at the
end-of-text id (not part of its output) or after ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from peer_dist.errors import ConfigError
from peer_dist.model import TransformerLM
from peer_dist.model.transformer import KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled from the filtered softmax."""

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1] (1: off), got {self.top_p}")


class DecodeHook(Protocol):
    """Something that changes the model between prefill and decode (prompt-selected experts)."""

    def begin(self) -> None: ...  # before the prompt's forward

    def after_prefill(self, valid_BP: Tensor) -> None: ...  # valid: False at padding positions


def next_token(logits_BV: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """(B,) int64: argmax at temperature 0, else a draw from softmax(logits / T) after top-k and top-p."""
    if sampling.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / sampling.temperature
    if 0 < sampling.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if sampling.top_p < 1:
        # Nucleus (Holtzman et al. 2020): the smallest set of most likely tokens whose mass
        # reaches top_p; a token is dropped when the mass before it already does.
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= sampling.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def pad_left(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(tokens (B, P), pad (B,)): prompts right-aligned, ``pad[b]`` leading filler positions."""
    length = max(len(p) for p in prompts)
    tokens_BP = torch.zeros(len(prompts), length, dtype=torch.int64)
    for b, ids in enumerate(prompts):
        tokens_BP[b, length - len(ids):] = torch.tensor(ids, dtype=torch.int64)
    pad_B = torch.tensor([length - len(p) for p in prompts], dtype=torch.int64)
    return tokens_BP.to(device), pad_B.to(device)


def valid_positions(pad_B: Tensor, length: int) -> Tensor:
    """(B, P) True at the prompt's own positions, False at left padding."""
    return torch.arange(length, device=pad_B.device).unsqueeze(0) >= pad_B.unsqueeze(1)


@torch.no_grad()
def generate(model: TransformerLM, prompts: list[list[int]], sampling: Sampling, eot_id: int,
             on_tokens: Callable[[Tensor, Tensor], None] | None = None,
             hook: DecodeHook | None = None) -> list[list[int]]:
    """The generated ids of every prompt (the end-of-text id that stopped one is left out).

    ``on_tokens(tokens_B, live_B)`` is called after every step with the new token of each
    sequence and whether it still runs (streaming). ``hook.begin`` runs before the prompt's
    forward, ``hook.after_prefill`` between it and the first decode step.
    """
    sampling.check()
    device = model.embed.weight.device
    tokens_BP, pad_B = pad_left(prompts, device)
    batch, length = tokens_BP.shape
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = KVCache.for_model(model, batch, length + sampling.max_new_tokens, pad_B)
    if hook is not None:
        hook.begin()
    logits_BV = model(tokens_BP, cache)[:, -1]
    if hook is not None:
        hook.after_prefill(valid_positions(pad_B, length))
    live_B = torch.ones(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in range(sampling.max_new_tokens):
        token_B = next_token(logits_BV, sampling, generator)
        live_B &= token_B != eot_id
        if on_tokens is not None:
            on_tokens(token_B, live_B)
        # NOTE: host sync, one per step: the ids are the output, and all-stopped ends the loop
        tokens, live = token_B.tolist(), live_B.tolist()
        for b in range(batch):
            if live[b]:
                out[b].append(tokens[b])
        if not any(live) or step == sampling.max_new_tokens - 1:
            break
        logits_BV = model(token_B.unsqueeze(1), cache)[:, -1]
    return out


class TextStream:
    """Prints one sequence's text as its tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]) -> None:
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.shown = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet (byte or byte-level BPE)
            return
        self.write(text[self.shown:])
        self.shown = len(text)

    def close(self) -> None:
        text = self.decode(self.ids)
        self.write(text[self.shown:])
        self.shown = len(text)
