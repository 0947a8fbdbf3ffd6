"""`peer-dist bench generate`: prefill and decode tokens/s, with and without the KV cache.

Any model (without one a fresh model of the default config): a batch of
prompts of ``--prompt-len`` tokens, then ``--new-tokens`` greedy steps, timed apart:
    kv cache     the prompt's forward, then one token per step over the cache
    recompute    no cache: every step runs the whole sequence again (the cache's reference)
Modes alternate over ``--repeats`` rounds (drift on a shared machine hits all); medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from peer_dist.errors import ConfigError
from peer_dist.inference.generate import Sampling, next_token
from peer_dist.model import TransformerLM
from peer_dist.model.transformer import KVCache

GREEDY = Sampling(temperature=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="export or run folder (default: a fresh model of the default config)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians reported (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from peer_dist.inference.loading import resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    model, context, source = _model(args, device)
    if args.prompt_len + args.new_tokens > context:
        raise ConfigError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed the model's "
                          f"context of {context}")
    results: dict[str, Any] = {"source": source, "device": str(device), "batch": args.batch,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                               "repeats": args.repeats, "speed": _speed(model, args)}
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len),
                        ("--new-tokens", args.new_tokens), ("--repeats", args.repeats)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


def _model(args: argparse.Namespace, device: torch.device) -> tuple[TransformerLM, int, str]:
    """(model in eval mode, context length, what it is)."""
    if args.model is None:
        from peer_dist.config import Config
        from peer_dist.model import build_model

        torch.manual_seed(0)
        return build_model(Config().model, 257).to(device).eval(), 128, "fresh default-config model"
    from peer_dist.inference.loading import load_model

    loaded = load_model(args.model, device)
    return loaded.model, loaded.context_length, str(loaded.source)


@torch.no_grad()
def _timed_decode(model: TransformerLM, prompts_BP: torch.Tensor, new: int, use_cache: bool) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for ``new`` greedy tokens after the prompts."""
    sync = torch.cuda.synchronize if prompts_BP.is_cuda else (lambda: None)
    batch, length = prompts_BP.shape
    cache = KVCache.for_model(model, batch, length + new) if use_cache else None
    start = time.perf_counter()
    logits = model(prompts_BP, cache)[:, -1]
    sync()  # NOTE: host sync (timing)
    prefilled = time.perf_counter()
    seq = prompts_BP
    for _ in range(new - 1):
        token = next_token(logits, GREEDY, None).unsqueeze(1)
        if use_cache:
            logits = model(token, cache)[:, -1]
        else:
            seq = torch.cat([seq, token], dim=1)
            logits = model(seq)[:, -1]
    sync()  # NOTE: host sync (timing)
    return prefilled - start, time.perf_counter() - prefilled


def _random_prompts(args: argparse.Namespace, vocab: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).to(device)


def _speed(model: TransformerLM, args: argparse.Namespace) -> dict[str, Any]:
    prompts = _random_prompts(args, model.vocab_size, model.embed.weight.device)
    _timed_decode(model, prompts, 2, True)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"kv cache": [], "recompute": []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(_timed_decode(model, prompts, args.new_tokens, mode == "kv cache"))
    return {mode: _rates(runs, args) for mode, runs in times.items()}


def _rates(runs: list[tuple[float, float]], args: argparse.Namespace) -> dict[str, float]:
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"prefill_tokens_per_s": args.batch * args.prompt_len / prefill,
            "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / decode}


def format_report(results: dict[str, Any]) -> str:
    speed = results["speed"]
    lines = [f"generation, {results['source']} on {results['device']}: batch {results['batch']}, prompt "
             f"{results['prompt_len']} tokens, {results['new_tokens']} new tokens, median of {results['repeats']}",
             f"{'mode':<11} {'prefill tok/s':>13} {'decode tok/s':>12} {'decode vs cache':>15}"]
    ref = speed["kv cache"]["decode_tokens_per_s"]
    for mode, row in speed.items():
        lines.append(f"{mode:<11} {row['prefill_tokens_per_s']:>13.0f} {row['decode_tokens_per_s']:>12.1f} "
                     f"{row['decode_tokens_per_s'] / ref:>14.2f}x")
    return "\n".join(lines)
