"""`peer-dist bench generate`: prefill and decode tokens/s, and what prompt-selected experts cost and save.

Part 1, speed (any model; without one a fresh model of the default config): a batch of
prompts of ``--prompt-len`` tokens, then ``--new-tokens`` greedy steps, timed apart:
    kv cache     the prompt's forward, then one token per step over the cache
    recompute    no cache: every step runs the whole sequence again (the cache's reference)
Modes alternate over ``--repeats`` rounds (drift on a shared machine hits all); medians.

Part 2, prompt selection (``--prompt-experts M,...`` and/or ``--prompt-neurons FRACTION``):
on held-out text (validation samples of ``--data``), the first ``--prompt-len`` tokens of
each sample are the prompt and the next ``--new-tokens`` the continuation, read with
teacher forcing through the decode path. Per mode: the continuation's perplexity, decode
tokens/s (as in part 1), the expert rows decoding must hold (a table of N per PEER layer, or
M per sequence), the distinct rows it read (per chunk of 16 sequences decoded together) and
the megabytes those held rows take (u and v, fp32). Full retrieval is the reference row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from peer_dist.errors import ConfigError
from peer_dist.inference.generate import Sampling, next_token
from peer_dist.inference.prompt_experts import PromptSelection, prompt_selection
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
    parser.add_argument("--prompt-experts", default="", help="comma-separated pool sizes M, e.g. 256,1024,4096")
    parser.add_argument("--prompt-neurons", type=float, default=0.0,
                        help="also the dense-FFN rule (GRIFFIN) keeping this fraction of neurons, e.g. 0.5")
    parser.add_argument("--data", default=None, help="prepared folder for the held-out text (default: the "
                        "model's training data)")
    parser.add_argument("--eval-sequences", type=int, default=64, help="held-out samples for perplexity")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from peer_dist.inference.loading import resolve_device

    pools = _check_args(args)
    device = resolve_device(args.device)
    model, context, source, data = _model(args, device)
    if args.prompt_len + args.new_tokens > context:
        raise ConfigError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed the model's "
                          f"context of {context}")
    results: dict[str, Any] = {"source": source, "device": str(device), "batch": args.batch,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                               "repeats": args.repeats, "speed": _speed(model, args)}
    if pools or args.prompt_neurons:
        results["selection"] = _selection(model, args, pools, data)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _check_args(args: argparse.Namespace) -> list[int]:
    for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len),
                        ("--new-tokens", args.new_tokens), ("--repeats", args.repeats),
                        ("--eval-sequences", args.eval_sequences)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    try:
        return [int(m) for m in args.prompt_experts.split(",") if m.strip()]
    except ValueError:
        raise ConfigError(f"--prompt-experts must be comma-separated integers, got {args.prompt_experts!r}") from None


def _model(args: argparse.Namespace, device: torch.device) -> tuple[TransformerLM, int, str, str | None]:
    """(model in eval mode, context length, what it is, held-out data folder or None)."""
    if args.model is None:
        from peer_dist.config import Config
        from peer_dist.model import build_model

        torch.manual_seed(0)
        return build_model(Config().model, 257).to(device).eval(), 128, "fresh default-config model", args.data
    from peer_dist.inference.loading import load_model

    loaded = load_model(args.model, device)
    return loaded.model, loaded.context_length, str(loaded.source), args.data or loaded.config.data.path


@torch.no_grad()
def _timed_decode(model: TransformerLM, prompts_BP: torch.Tensor, new: int, use_cache: bool,
                  selection: PromptSelection | None = None) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for ``new`` greedy tokens after the prompts."""
    sync = torch.cuda.synchronize if prompts_BP.is_cuda else (lambda: None)
    batch, length = prompts_BP.shape
    cache = KVCache.for_model(model, batch, length + new) if use_cache else None
    if selection is not None:
        selection.begin()
    start = time.perf_counter()
    logits = model(prompts_BP, cache)[:, -1]
    if selection is not None:
        selection.after_prefill(torch.ones_like(prompts_BP, dtype=torch.bool))
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


# ---------------------------------------------------------------------------- prompt selection


def _selection(model: TransformerLM, args: argparse.Namespace, pools: list[int], data: str | None) -> dict[str, Any]:
    if data is None:
        raise ConfigError("prompt selection is measured on held-out text: pass --data PREPARED_FOLDER")
    samples = _held_out(data, args, model.embed.weight.device)
    modes = [("full retrieval", {"track_full": True})] + [(f"experts {m}", {"experts": m}) for m in pools]
    if args.prompt_neurons:
        modes.append((f"neurons {args.prompt_neurons:g}", {"neurons": args.prompt_neurons, "track_full": True}))
    prompts = samples[:args.batch, :args.prompt_len]
    rows: dict[str, dict[str, Any]] = {}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in modes}
    for rep in range(args.repeats + 1):  # round 0: perplexity and row counts (and warm-up)
        for name, kw in modes:
            with prompt_selection(model, **kw) as selection:
                if rep == 0:
                    rows[name] = _quality(model, samples, args, selection)
                else:
                    times[name].append(_timed_decode(model, prompts, args.new_tokens, True, selection))
    for name, _ in modes:
        rows[name].update(_rates(times[name], args))
    return {"data": data, "sequences": samples.shape[0], "modes": rows}


def _held_out(data: str, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """(S, prompt + continuation) validation tokens."""
    from peer_dist.data import val_batches

    need = args.prompt_len + args.new_tokens
    rows, count = [], 0
    for batch in val_batches(data, rank=0, world=1, batch_size=16, max_batches=None):
        if batch.shape[1] < need:
            raise ConfigError(f"--data {data} has samples of {batch.shape[1]} tokens; --prompt-len + --new-tokens "
                              f"= {need}")
        rows.append(batch[:, :need])
        count += batch.shape[0]
        if count >= args.eval_sequences:
            break
    return torch.cat(rows)[:args.eval_sequences].to(device)


@torch.no_grad()
def _quality(model: TransformerLM, samples: torch.Tensor, args: argparse.Namespace,
             selection: PromptSelection | None) -> dict[str, Any]:
    """Perplexity of the continuations given their prompts (teacher forcing through the decode
    path), and the expert rows decoding holds and reads."""
    nll, count, read = 0.0, 0, 0
    length, prompt = samples.shape[1], args.prompt_len
    for chunk in samples.split(16):
        cache = KVCache.for_model(model, chunk.shape[0], length)
        selection.begin()
        first = model(chunk[:, :prompt], cache)[:, -1:]
        selection.after_prefill(torch.ones_like(chunk[:, :prompt], dtype=torch.bool))
        logits = torch.cat([first, model(chunk[:, prompt:-1], cache)], dim=1)
        targets = chunk[:, prompt:]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                       reduction="sum"))  # NOTE: host sync (per chunk)
        count += targets.numel()
        read += selection.decode_rows_read()
    chunks = math.ceil(samples.shape[0] / 16)
    held = sum(p.resident_rows() for p in selection.peers)
    return {"continuation_perplexity": math.exp(nll / count), "expert_rows_held_per_sequence": held,
            "expert_mb_held_per_sequence": held * 2 * model.cfg.d_model * 4 / 2**20,
            "expert_rows_read_per_chunk": read / chunks}


def format_report(results: dict[str, Any]) -> str:
    speed = results["speed"]
    lines = [f"generation, {results['source']} on {results['device']}: batch {results['batch']}, prompt "
             f"{results['prompt_len']} tokens, {results['new_tokens']} new tokens, median of {results['repeats']}",
             f"{'mode':<11} {'prefill tok/s':>13} {'decode tok/s':>12} {'decode vs cache':>15}"]
    ref = speed["kv cache"]["decode_tokens_per_s"]
    for mode, row in speed.items():
        lines.append(f"{mode:<11} {row['prefill_tokens_per_s']:>13.0f} {row['decode_tokens_per_s']:>12.1f} "
                     f"{row['decode_tokens_per_s'] / ref:>14.2f}x")
    if "selection" in results:
        sel = results["selection"]
        full = sel["modes"]["full retrieval"]
        lines += ["", f"prompt selection on {sel['sequences']} held-out samples of {sel['data']} (continuation "
                  "perplexity by teacher forcing; expert rows summed over PEER layers: held per sequence, "
                  "read per 16 sequences)",
                  f"{'mode':<15} {'cont. ppl':>9} {'vs full':>8} {'decode tok/s':>12} {'vs full':>8} "
                  f"{'rows held':>10} {'MB held':>8} {'rows read':>10}"]
        for mode, row in sel["modes"].items():
            lines.append(f"{mode:<15} {row['continuation_perplexity']:>9.3f} "
                         f"{row['continuation_perplexity'] / full['continuation_perplexity']:>7.3f}x "
                         f"{row['decode_tokens_per_s']:>12.1f} "
                         f"{row['decode_tokens_per_s'] / full['decode_tokens_per_s']:>7.2f}x "
                         f"{row['expert_rows_held_per_sequence']:>10.0f} {row['expert_mb_held_per_sequence']:>8.2f} "
                         f"{row['expert_rows_read_per_chunk']:>10.0f}")
    return "\n".join(lines)
