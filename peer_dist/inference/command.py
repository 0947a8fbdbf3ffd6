"""`peer-dist generate`: text from a run's checkpoint or an export, streamed to the terminal; optionally
decoding with prompt-selected experts and neurons (peer_dist/inference/prompt_experts.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from peer_dist.errors import ConfigError, DataError
from peer_dist.inference.generate import Sampling, TextStream, generate
from peer_dist.inference.loading import LoadedModel, load_model, resolve_device
from peer_dist.inference.prompt_experts import prompt_selection


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an export folder, or a run folder / checkpoints folder / step_NNNNNN folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt "
                   "(repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed gives the same text)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--prompt-experts", type=int, default=0, metavar="M",
                   help="decode with each sequence's M experts of most prompt gate mass per PEER layer (0: off)")
    p.add_argument("--prompt-neurons", type=float, default=0.0, metavar="FRACTION",
                   help="decode dense FFN blocks with this fraction of neurons, chosen by the prompt (GRIFFIN; 0: off)")


def prompt_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.prompt)
    for name in args.prompt_file:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"--prompt-file {path} does not exist")
        texts.append(path.read_text())
    if not texts:
        raise ConfigError("give at least one --prompt TEXT or --prompt-file FILE")
    return texts


def encode_prompts(loaded: LoadedModel, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """End-of-text (document start) + the prompt's ids; each must leave room for the new tokens."""
    tok = loaded.tokenizer
    prompts = [[tok.eot_id, *tok.encode(text)] for text in texts]
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > loaded.context_length:
            which = f"prompt {i + 1} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
            raise ConfigError(f"{which} has {len(ids)} tokens (with the leading end-of-text) and --max-new-tokens "
                              f"is {max_new_tokens}: {len(ids) + max_new_tokens} positions, more than the model's "
                              f"context of {loaded.context_length} (its training sequence length); shorten the "
                              "prompt or lower --max-new-tokens")
    return prompts


def run(args: argparse.Namespace) -> int:
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    if args.prompt_experts < 0 or args.prompt_neurons < 0:
        raise ConfigError("--prompt-experts and --prompt-neurons must be >= 0 (0: off)")
    texts = prompt_texts(args)
    loaded = load_model(args.model, resolve_device(args.device))
    prompts = encode_prompts(loaded, texts, sampling.max_new_tokens)
    tok = loaded.tokenizer
    with prompt_selection(loaded.model, experts=args.prompt_experts, neurons=args.prompt_neurons) as selection:
        stream = None
        if len(prompts) == 1:  # one prompt: its text as it is generated
            print(texts[0], end="", flush=True)
            stream = TextStream(tok.decode, lambda text: print(text, end="", flush=True))
        started = time.perf_counter()
        outputs = generate(loaded.model, prompts, sampling, tok.eot_id, hook=selection,
                           on_tokens=None if stream is None else lambda token_B, live_B: (
                               stream.add(int(token_B[0])) if bool(live_B[0]) else None))
        elapsed = time.perf_counter() - started
    if stream is not None:
        stream.close()
        print()
    else:
        for i, (text, ids) in enumerate(zip(texts, outputs)):
            print(f"--- {i + 1} of {len(texts)} ---\n{text}{tok.decode(ids)}")
    new = sum(len(ids) for ids in outputs)
    print(f"{new} new tokens for {len(prompts)} prompt(s) in {elapsed:.2f} s ({loaded.source}, step {loaded.step})",
          file=sys.stderr)
    return 0
