"""`peer-dist` command line: prepare | prepare-merge | tokenizer | verify | train | eval | export | grow | usage | generate |
bench | torchrun | sweep | lifelong."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import peer_dist.parallel.launcher  # noqa: F401  (first: remembers the launcher's pid before torch loads)
from peer_dist.errors import EXIT_SAVE_FAILED, EXIT_USER_ERROR, CheckpointSaveError, UserError, first_to_report


def _prepare(args: argparse.Namespace) -> int:
    from peer_dist.data import prepare
    from peer_dist.log import setup_logging

    setup_logging()
    manifest = prepare(
        args.inputs, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction, seed=args.seed,
        max_bytes=args.max_bytes, overwrite=args.overwrite, text_field=args.text_field, bad_record=args.bad_record,
        workers=args.workers, tokenizer_file=args.tokenizer_file, tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        chunk_bytes=args.chunk_bytes, part=args.part, num_parts=args.num_parts, progress=not args.no_progress,
        tune_fraction=args.tune_fraction,
    )
    if manifest is None:
        print(f"prepared part {args.part} of {args.num_parts} into {args.output}; when every part is done: "
              f"peer-dist prepare-merge {args.output}")
    else:
        print(f"prepared {args.output}: {manifest.summary()}")
    return 0


def _prepare_merge(args: argparse.Namespace) -> int:
    from peer_dist.data import merge_parts

    manifest = merge_parts(args.output)
    print(f"merged {args.output}: {manifest.summary()}")
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from peer_dist.data.prepare import write_tokenizer
    from peer_dist.log import setup_logging

    setup_logging()
    tok = write_tokenizer(args.inputs, args.output, vocab_size=args.vocab_size, seed=args.seed,
                          text_field=args.text_field, bad_record=args.bad_record,
                          sample_bytes=args.tokenizer_sample_bytes, overwrite=args.overwrite)
    print(f"wrote {args.output}: byte-level BPE, {tok.vocab_size} ids with end-of-text; give it to every part "
          f"with --tokenizer-file {args.output}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from peer_dist.data import verify_data

    manifest = verify_data(args.data, workers=args.workers, progress=not args.no_progress,
                           read_retries=args.read_retries)
    print(f"verified {args.data}: every shard matches manifest.json ({manifest.summary()})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from peer_dist.train.signals import EXIT_PREEMPTED, PreemptionHandler

    stop = PreemptionHandler().install()  # first, before torch loads: a stop signal during start-up is kept

    from peer_dist.config import load_config
    from peer_dist.train.trainer import run_training

    overrides = list(args.overrides) + ([f"train.init_from={args.init_from}"] if args.init_from else [])
    cfg = load_config(args.config, overrides)
    result = run_training(cfg, stop)
    return EXIT_PREEMPTED if result.preempted else 0


def _eval(args: argparse.Namespace) -> int:
    from peer_dist.train.evaluation import run_eval

    run_eval(args.checkpoint, data_path=args.data, batch_size=args.batch_size, max_batches=args.batches,
             device=args.device, split=args.split, batch_stats=args.batch_stats)
    return 0


def _usage(args: argparse.Namespace) -> int:
    from peer_dist.train.evaluation import run_usage

    run_usage(args.checkpoint, args.output, data_path=args.data, batch_size=args.batch_size,
              max_batches=args.batches, device=args.device, batch_stats=args.batch_stats)
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from peer_dist.inference.hf_export import export_hf

        out = export_hf(args.checkpoint, args.output, overwrite=args.overwrite, data=args.data)
        print(f"exported {args.checkpoint} -> {out} (Hugging Face transformers, trust_remote_code=True)")
        return 0
    from peer_dist.checkpoint.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite, data=args.data)
    print(f"exported {args.checkpoint} -> {out} (model.safetensors, config.toml, export.json, tokenizer)")
    return 0


def _grow(args: argparse.Namespace) -> int:
    from peer_dist.checkpoint.grow import run_grow

    result, before, after = run_grow(args.checkpoint, args.num_experts, args.output, list(args.overrides),
                                     key_scale=args.key_scale, seed=args.seed, batches=args.batches)
    print(f"grew {', '.join(result.layers)}: {result.old_sub_keys}^2 -> {result.new_sub_keys}^2 experts; "
          f"first checkpoint of the new run: {result.checkpoint}")
    print(f"validation loss before {before:.4f}  after {after:.4f}  change {after - before:+.4f} "
          f"({args.batches} batches)")
    print(f"continue it with: peer-dist train -c {args.output}/config.toml train.max_steps=...")
    return 0


def _bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


def _sweep(args: argparse.Namespace) -> int:
    from peer_dist.sweep import cli as sweep_cli

    return sweep_cli.run(args)


def _lifelong(args: argparse.Namespace) -> int:
    from peer_dist.sweep import lifelong

    return lifelong.run(args)


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="text, .jsonl[.gz|.zst], .json.gz or .parquet files, folders or globs "
                                              "(default: Python's standard library source)")
    p.add_argument("--output", "-o", required=True, help="output folder for shards, manifest and tokenizer")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default=None, help="byte (default) or BPE trained here")
    p.add_argument("--tokenizer-file", default=None, help="use this tokenizers tokenizer.json instead")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (ignored for byte)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sample")
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--tune-fraction", type=float, default=0.0,
                   help="a third split, 'tune', for choosing hyperparameters (data.eval_split = \"tune\"); its "
                        "pieces come out of train, validation stays as without it (default 0: none)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on the corpus size in bytes of text")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (the output is the same for any)")
    p.add_argument("--chunk-bytes", type=int, default=64 << 20,
                   help="files are grouped into chunks of at least this many bytes: the unit of work")
    p.add_argument("--part", type=int, default=None, help="with --num-parts: this job's part, 0..P-1")
    p.add_argument("--num-parts", type=int, default=1, help="independent jobs sharing the work (then prepare-merge)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _sample_arguments(p)


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--bad-record", choices=("error", "skip"), default="error",
                   help="a malformed JSONL line or Parquet row: stop (error) or leave it out and count it (skip)")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=100_000_000,
                   help="BPE is trained on a seeded sample of at most about this many bytes of text")
    p.add_argument("--seed", type=int, default=0, help="validation split and tokenizer sample")


def _torchrun(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from peer_dist.parallel.torchrun import launch

    commands = [name for name in parser.commands if name != "torchrun"]
    try:
        return launch(argv, commands)
    except UserError as exc:
        print(f"peer-dist torchrun: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="text, JSONL or Parquet -> WebDataset token shards + manifest")
    _prepare_arguments(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("prepare-merge", help="write the manifest of a prepare run as --part i --num-parts P jobs")
    p.add_argument("output", help="the --output folder every part wrote into")
    p.set_defaults(func=_prepare_merge)

    p = sub.add_parser("tokenizer", help="train byte-level BPE on a corpus sample once, for multi-part prepares")
    p.add_argument("inputs", nargs="*", help="the corpus, as for prepare (default: Python's standard library)")
    p.add_argument("--output", "-o", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    _sample_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("verify", help="check every shard of a prepared folder against its manifest (size, sha256)")
    p.add_argument("data", help="prepared data folder (or pipe:/http location)")
    p.add_argument("--workers", type=int, default=4, help="shards hashed at a time")
    p.add_argument("--read-retries", type=int, default=0, help="retries of a failed remote read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_verify)

    p = sub.add_parser("train", help="train a model (one process, or every rank under torchrun/srun/mpirun)",
                       description="Without --config: a small PEER model (d_model 128, 4 blocks, 128^2 experts) on "
                       "data/stdlib-byte that trains in minutes on a CPU. Presets in configs/: tiny.toml (the same, "
                       "spelled out), tiny_dense.toml, paper_peer.toml (the paper: 1024^2 experts, d_model 1024, 12 "
                       "blocks, 8 GPUs, bf16), paper_dense.toml, peer_1m_ep2.toml (1024^2 experts sharded over 2 "
                       "ranks).")
    p.add_argument("--config", "-c", default=None, help="TOML or YAML config file (default: the small model above)")
    p.add_argument("--init-from", default=None, metavar="RUN_OR_EXPORT",
                   help="start from an export's or a run's weights (fine-tuning; same as train.init_from=...; "
                   "with model.add_peer=residual|replace, PEER layers are added)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=128 train.max_steps=50")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="validation loss, perplexity and expert metrics of a checkpoint")
    p.add_argument("checkpoint", help="run folder, its checkpoints/ folder, a step_NNNNNN folder or an export")
    p.add_argument("--data", default=None, help="prepared data folder (default: the one the run trained on)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=None, help="validation batches per rank (default: all)")
    p.add_argument("--split", choices=("val", "tune"), default="val",
                   help="evaluate on the validation split (default) or the tuning split (--tune-fraction)")
    p.add_argument("--batch-stats", action="store_true",
                   help="query BatchNorm with each batch's statistics, as in training (default: running statistics)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_eval)

    p = sub.add_parser("usage", help="expert usage statistics of a PEER model on validation batches (background or "
                       "target of sparse expert finetuning, train.sparse_experts)")
    p.add_argument("checkpoint", help="run folder, its checkpoints/ folder, a step_NNNNNN folder or an export")
    p.add_argument("--output", "-o", required=True, help="file to write (torch.save; must not exist)")
    p.add_argument("--data", default=None, help="prepared data folder (default: the one the run trained on)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=50, help="validation batches (each one document of the ranking)")
    p.add_argument("--batch-stats", action="store_true",
                   help="query BatchNorm with each batch's statistics, as in training (default: running statistics)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_usage)

    p = sub.add_parser("export", help="a self-contained model: unsharded weights (safetensors), config, tokenizer")
    p.add_argument("checkpoint", help="run folder, its checkpoints/ folder, one step_NNNNNN folder (or, for "
                   "--format hf, an export)")
    p.add_argument("--output", "-o", required=True, help="folder for the export")
    p.add_argument("--format", choices=("peer-dist", "hf"), default="peer-dist",
                   help="peer-dist (default) or hf: a Hugging Face transformers folder (trust_remote_code)")
    p.add_argument("--data", default=None, help="prepared folder to take the tokenizer from (default: the data "
                   "the run trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --output")
    p.set_defaults(func=_export)

    p = sub.add_parser("grow", help="a checkpoint -> the first checkpoint of a new run with a larger PEER pool "
                       "(old experts keep their rows and optimizer state)")
    p.add_argument("checkpoint", help="run folder, its checkpoints/ folder or a step_NNNNNN folder")
    p.add_argument("--num-experts", type=int, required=True, help="experts per PEER layer after growth: m^2 > n^2")
    p.add_argument("--output", "-o", required=True, help="the new run folder (must not exist)")
    p.add_argument("--key-scale", type=float, default=0.5, help="scale of the new sub-keys relative to a fresh "
                   "layer's: smaller changes the function less at growth and retrieves new experts less at first")
    p.add_argument("--seed", type=int, default=0, help="seed of the new sub-keys and u rows")
    p.add_argument("--batches", type=int, default=20, help="validation batches for the loss before and after")
    p.add_argument("overrides", nargs="*", help="settings of the new run, e.g. train.old_expert_lr_scale=0 "
                   "train.trainable=peer train.max_steps=600")
    p.set_defaults(func=_grow)

    from peer_dist.inference import command as generate_command

    p = sub.add_parser("generate", help="text from a run's checkpoint or an export (KV cache, sampling, streaming)")
    generate_command.add_arguments(p)
    p.set_defaults(func=generate_command.run)

    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    bench = p.add_subparsers(dest="bench", required=True)
    from peer_dist.bench import ckpt, ep, layer

    b = bench.add_parser("layer", help="PEER layer fwd+bwd+update vs the torch expert path, dense-update PEER, "
                         "naive Algorithm 1, dense FFW over N (CPU or CUDA): time, peak memory, row traffic "
                         "and bandwidth, floor")
    layer.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=layer.run)
    b = bench.add_parser("ep", help="PEER layer at EP = 1, 2, 4: tokens/s, all_to_all bytes vs bound, imbalance")
    ep.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=ep.run)
    b = bench.add_parser("ckpt", help="training-time cost of interval checkpoints: none vs sync vs async")
    ckpt.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=ckpt.run)
    from peer_dist.bench import model as model_bench

    b = bench.add_parser("model", help="whole models of a sweep spec side by side: time per counted FLOP vs dense")
    model_bench.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=model_bench.run)
    from peer_dist.bench import startup as startup_bench

    b = bench.add_parser("startup", help="start-up and resume per rank at EP = 1, 2, 4: seconds and checkpoint MB read")
    startup_bench.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=startup_bench.run)
    from peer_dist.bench import prepare as prepare_bench

    b = bench.add_parser("prepare", help="prepare throughput (MB/s) at 1 and 2 workers, byte and BPE; peak RSS")
    prepare_bench.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=prepare_bench.run)

    from peer_dist.bench import kernels as kernels_bench

    b = bench.add_parser("kernels", help="the C kernels of the CPU path (top-k, argsort, gather-dot, row-sparse "
                         "AdamW) vs the torch ops they replace: ms and speedup")
    kernels_bench.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=kernels_bench.run)

    from peer_dist.bench import generate as generate_bench

    b = bench.add_parser("generate", help="prefill and decode tokens/s (KV cache vs recompute); with "
                         "--prompt-experts: perplexity, speed and rows of prompt-selected experts")
    generate_bench.add_arguments(b)
    b.set_defaults(func=_bench, bench_run=generate_bench.run)

    from peer_dist.sweep import cli as sweep_cli
    from peer_dist.sweep import lifelong

    p = sub.add_parser("torchrun", help="torchrun that exits with the job's code (2 user error, 75 stopped) "
                       "instead of a traceback: peer-dist torchrun [torchrun options] COMMAND [args]")
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="torchrun's options, then a peer-dist command")

    p = sub.add_parser("sweep", help="isoFLOP sweep: train every (budget, method, size) of a spec, table + plot")
    sweep_cli.add_arguments(p)
    p.set_defaults(func=_sweep)
    p = sub.add_parser("lifelong", help="the forgetting experiment: phase A, variants (a)-(g) on phase-B data at "
                       "equal training FLOPs, evaluations, table + plot (resumable)")
    lifelong.add_arguments(p)
    p.set_defaults(func=_lifelong)
    parser.commands = list(sub.choices)  # what `peer-dist torchrun` may run
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torchrun"] and not {"-h", "--help"} & set(argv[1:2]):
        return _torchrun(parser, argv[1:])
    args, extra = parser.parse_known_args(argv)
    # `sweep SPEC -o DIR key=value`: argparse hands out positionals in one go, so overrides
    # written after an option arrive here; only key=value words are taken.
    if extra and getattr(args, "overrides", None) is not None \
            and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
    except UserError as exc:
        message = f"peer-dist {args.command}: error: {exc}"
        if first_to_report(message):  # once per job, not once per rank
            print(message, file=sys.stderr)
        code = EXIT_USER_ERROR
    except CheckpointSaveError as exc:
        print(f"peer-dist {args.command}: error: {exc}", file=sys.stderr)
        code = EXIT_SAVE_FAILED
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (set-up, eval, prepare, ...)
        print(f"peer-dist {args.command}: interrupted", file=sys.stderr)
        code = 130
    env = sys.modules.get("peer_dist.parallel.env")  # imported by every command that joins a process group
    if env is not None:
        env.end_process(code)  # returns only where no process group was joined
    return code


if __name__ == "__main__":
    sys.exit(main())
