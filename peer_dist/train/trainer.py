"""The training loop: read it top to bottom.

    set-up (launcher env, process group, data manifest, model, DeepSpeed engine)
    -> take the run folder's lease (one job per run folder)
    -> resume from the newest checkpoint every rank can read, if any
    -> for each step: grad_accum micro-steps of forward/backward, one optimizer step
       (DeepSpeed), periodic logging, validation and checkpoints
    -> final validation and checkpoint; the summary names the perplexity and log folder.
"""

from __future__ import annotations

import json
import random
import resource
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from peer_dist.checkpoint.export import (
    load_export_into, load_weights_into, open_export, plain_module_state, require_export,
)
from peer_dist.checkpoint.store import (
    Checkpoint, SaveOutcome, await_async_save, choose_checkpoint, list_checkpoints, load_engine_state,
    poll_async_save, resolve_checkpoint, save_checkpoint, wait_for_pending_save,
)
from peer_dist.config import Config, config_hash, dump_toml, hashed_differences, load_config, model_differences
from peer_dist.data import Manifest, TrainStream, val_batches
from peer_dist.data.order import check_sample_order
from peer_dist.errors import CheckpointError, ConfigError, DataError
from peer_dist.log import get_logger, setup_logging
from peer_dist.model import ExpertPlacement, build_model, lm_loss
from peer_dist.model.flops import training_flops_per_token
from peer_dist.model.lora import apply_lora
from peer_dist.parallel.data_parallel import sync_batch_statistics
from peer_dist.parallel.deepspeed_private import data_parallel_group, expert_parallel_group, tensor_parallel_group
from peer_dist.parallel.env import DistEnv, detect_env, finish_distributed, init_distributed, pick_backend, pick_device
from peer_dist.parallel.expert_parallel import dispatch_metrics, parallelize_experts
from peer_dist.parallel.launcher import die_with_launcher, under_torchrun_agent
from peer_dist.parallel.layout import ParallelLayout
from peer_dist.train.engine import build_engine, clip_gradients, clips_manually, table_optimizer
from peer_dist.train.metrics import MetricsWriter, evaluate, router_metrics
from peer_dist.train.faults import FaultPlan
from peer_dist.train.guard import DataSkips, GradientWatch, StepGuard
from peer_dist.train.lease import RunLease, take_run_lease
from peer_dist.train.signals import PreemptionHandler, requeue_slurm_job
from peer_dist.train.sparse_experts import ExpertSelector
from peer_dist.train.sparse_tables import clip_scale, table_metrics


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    run_dir: Path
    tensorboard_dir: Path
    losses: list[tuple[int, float]]  # (step, mean training loss of the log interval ending there)
    preempted: bool = False  # stopped on a signal after a checkpoint; the run resumes on restart
    tokens: int = 0  # training tokens consumed by the end (all ranks, since the run began)
    checkpoint: Path | None = None  # the final checkpoint
    wall_s: float = 0.0  # this process's training time, set-up to the final checkpoint


@dataclass
class _Setup:
    env: DistEnv
    layout: ParallelLayout
    device: torch.device
    manifest: Manifest
    model: torch.nn.Module
    engine: Any
    writer: MetricsWriter | None = None  # created once resume has checked the run folder
    update_s: float = 0.0  # time in optimizer updates since the last log line
    flops_per_token: float = 0.0  # training FLOPs per token of the model (peer_dist/model/flops.py)
    started: float = 0.0  # time.perf_counter() when set-up began
    state_buffers: list[str] | None = None  # persistent buffer names, see _state_buffers
    gradients: GradientWatch | None = None  # NaN/Inf in this rank's gradients (the guard's second check; off with it)
    lease: RunLease | None = None  # rank 0: this job's lease on the run folder
    startup: dict[str, float] = field(default_factory=dict)  # startup/* metrics: set-up and resume cost
    selector: ExpertSelector | None = None  # train.sparse_experts: which expert rows a step updates


def run_training(cfg: Config, stop: PreemptionHandler | None = None) -> TrainResult:
    """Train ``cfg`` in this process; every rank of the job calls it.

    ``stop``: a handler the caller installed earlier (``peer-dist train`` does, before
    torch loads); it is switched to ``cfg.train.stop_signals``. The handlers are in place
    before set-up, so a stop signal during set-up (process group, DeepSpeed engine, resume)
    is kept and acted on at the first step's check: one step, a checkpoint, exit 75. They
    stay installed until the process exits: Slurm sends SIGTERM again while a requeued job
    shuts down, and the default action would turn the documented exit code 75 into a
    kill. The run folder's lease is taken before anything reads or writes the folder and
    given up on the way out, whatever the way.
    """
    if stop is None:
        stop = PreemptionHandler(cfg.train.stop_signals).install()
    else:
        stop.switch_to(cfg.train.stop_signals)
    setup = _set_up(cfg)
    setup.lease = take_run_lease(cfg.run_dir)  # refuses (every rank, exit 2) if another job holds it
    try:
        result = _train(cfg, setup, stop)
    finally:
        wait_for_pending_save(cfg.train.collective_timeout_s)
        if setup.writer is not None:
            setup.writer.close()
        if setup.lease is not None:
            setup.lease.release()
    finish_distributed()
    return result


def _set_up(cfg: Config) -> _Setup:
    """Launcher env -> layout check -> process group -> data manifest -> model -> parallelism -> engine.

    Parallelism is applied from outside the model in a fixed order: the model is built
    holding only this rank's expert shards; the expert layers get their all_to_all
    dispatch; DeepSpeed then builds the groups, applies AutoTP and wraps everything;
    finally the batch statistics (query BatchNorms, MoE router losses) are summed over
    the data-parallel group.
    """
    started = time.perf_counter()
    env = detect_env()
    setup_logging(env.rank)
    die_with_launcher()  # under torchrun: a rank must not outlive its agent (kill -9 of the launcher)
    layout = ParallelLayout(env.world, tp=cfg.parallel.tp, ep=cfg.parallel.ep)  # fails before any work
    device = pick_device(cfg.train.device, env)
    init_distributed(env, pick_backend(cfg.train.backend, device), timeout_s=cfg.train.collective_timeout_s,
                     device=device)
    manifest = Manifest.load(cfg.data.path, read_retries=cfg.data.read_retries, retry_wait_s=cfg.data.retry_wait_s)
    manifest.num_samples(cfg.data.eval_split)  # a missing split (data.eval_split = "tune") fails now, not after training
    vocab = cfg.model.vocab_size or manifest.vocab_size
    if vocab < manifest.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the data's tokenizer vocabulary "
                          f"({manifest.vocab_size}); use 0 to take it from the data")
    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    placement = ExpertPlacement(layout.ep, layout.ep_rank(env.rank), cfg.parallel.expert_layout)
    build_start = time.perf_counter()
    model = build_model(cfg.model, vocab, placement)
    if cfg.train.init_from and not list_checkpoints(cfg.run_dir / "checkpoints"):
        _init_from_export(cfg, model, manifest)
    apply_lora(model, cfg.train)  # after init_from: the loaded weights become the adapters' frozen base
    model = model.to(device)
    model_init_s = time.perf_counter() - build_start
    parallelize_experts(model, layout, env.rank, row_sparse_tables=cfg.train.expert_update == "sparse")
    engine = build_engine(model, cfg, layout)
    if layout.dp > 1:
        sync_batch_statistics(model, data_parallel_group())
    get_logger().info("parallel layout: %s", layout.describe())
    flops = training_flops_per_token(cfg, vocab, manifest.seq_len)  # frozen weights: no weight gradients
    selector = ExpertSelector(model, table_optimizer(engine), cfg.train) if cfg.train.sparse_experts else None
    return _Setup(env, layout, device, manifest, model, engine, flops_per_token=flops, started=started,
                  selector=selector,
                  gradients=GradientWatch(engine.module.parameters()) if cfg.guard.enabled else None,
                  startup={"startup/set_up_s": time.perf_counter() - started, "startup/model_init_s": model_init_s})


def _init_from_export(cfg: Config, model: torch.nn.Module, manifest: Manifest) -> None:
    """Fine-tuning: this rank's share of an export's (or a run's) weights, before parallelism is applied.

    The source must be the same model (its config's model keys; model.add_peer may add PEER
    layers, which keep their initialisation) trained with the same tokenizer as the data of
    this run; the optimizer and schedule start fresh at step 0.
    """
    source = cfg.train.init_from
    export = open_export(Path(source))
    ckpt = None if export is not None or not Path(source).exists() else resolve_checkpoint(source)
    if export is None and ckpt is None:
        export = require_export(source, "train.init_from")  # raises, naming what is missing
    config = export.config_dict() if export is not None else tomllib.loads((ckpt.path / "config.toml").read_text())
    path = export.path if export is not None else ckpt.path
    what = "export" if export is not None else "run"
    differences = model_differences(config.get("model", {}), cfg.model)
    if differences:
        raise ConfigError(f"train.init_from={path}: the model comes from the {what}, but this run sets "
                          f"{'; '.join(differences)}; drop those settings")
    saved = export.info.get("tokenizer") if export is not None else _run_tokenizer(ckpt, config)
    data = manifest.info["tokenizer"]
    same = saved is not None and all(saved.get(k) == data.get(k) for k in ("vocab_size", "eot_id", "sha256"))
    if not same or (saved["name"] == "byte") != (data["name"] == "byte"):
        raise DataError(f"train.init_from={path} was trained with tokenizer {saved}, data {cfg.data.path} "
                        f"is tokenized with {data}: prepare the data with the {what}'s tokenizer "
                        f"(peer-dist prepare --tokenizer-file {path}/tokenizer.json, or --tokenizer byte)")
    added = added_state_names(model)
    if export is not None:
        load_export_into(model, export, added)
        step = export.step
    else:
        weights = plain_module_state(ckpt)  # a LoRA run's adapters merged
        load_weights_into(model, set(weights), weights.__getitem__, ckpt.path, added)
        step = ckpt.step
    get_logger().info("initialised from %s %s (step %d)%s", what, path, step,
                      f"; added {cfg.model.add_peer} PEER layers: {len(added)} new tensors" if added else "")


def _run_tokenizer(ckpt: Checkpoint, config: dict[str, Any]) -> dict[str, Any] | None:
    """The tokenizer entry of the data a run trained on (its manifest), or None when that data is gone."""
    try:
        return Manifest.load(config.get("data", {}).get("path", "")).info["tokenizer"]
    except (DataError, OSError, KeyError):
        return None


def added_state_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the layers model.add_peer adds (marked ``added``)."""
    return {f"{name}.{key}" for name, module in model.named_modules() if getattr(module, "added", False)
            for key in module.state_dict()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resume(cfg: Config, setup: _Setup, plan: FaultPlan) -> dict[str, Any]:
    """Restore the newest checkpoint every rank can read; refuse one from another run.

    The parallel layout and the world size may differ from the saving run's (elastic
    resume: expert tables and optimizer state are resharded); the global batch may not,
    since step s must continue on global samples [s * G, (s + 1) * G).
    """
    expected = {"config_hash": config_hash(cfg), "data_fingerprint": setup.manifest.fingerprint,
                "global_batch": _global_batch(cfg, setup.layout)}
    ckpt = _choose(cfg, setup, plan)
    if ckpt is None:
        return {"step": 0, "consumed_samples": 0, "consumed_tokens": 0}
    state = ckpt.trainer_state()
    if state["step"] > cfg.train.max_steps:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} is below the step of the checkpoint to resume "
                          f"({ckpt.path.name}, step {state['step']}): raise train.max_steps to continue, or pick a "
                          "new run.name to start over")
    check_sample_order(state, cfg.data.shuffle_shards, f"run folder {cfg.run_dir}", ckpt.path.name)
    for key, value in expected.items():
        if state.get(key) != value:
            hint = ("micro_batch_size x grad_accum x (world / parallel.tp) must stay the same"
                    if key == "global_batch" else "resume it with the same config and data")
            if key == "config_hash":
                hint = f"{_differing_keys(ckpt.path, cfg)}; {hint}"
            raise CheckpointError(
                f"run folder {cfg.run_dir} holds a checkpoint ({ckpt.path.name}) with {key}={state.get(key)!r}, "
                f"this run has {key}={value!r}: {hint}, or pick a new run.name"
            )
    if state.get("layout") != _layout_state(setup.layout):
        get_logger().info("elastic resume: checkpoint written at world %s %s, resharding to world %d %s",
                          state.get("world"), state.get("layout"), setup.env.world, _layout_state(setup.layout))
    _warn_if_statistics_batch_changes(state, cfg, setup)
    start = time.perf_counter()
    read = load_engine_state(ckpt, setup.engine, setup.layout, cfg.parallel.expert_layout)
    setup.startup.update({"startup/resume_s": time.perf_counter() - start, "startup/checkpoint_read_mb": read / 2**20})
    _schedule_lr_at(setup.engine, state["step"])
    get_logger().info("resumed from %s (step %d; this rank read %.1f MB in %.1f s)", ckpt.path, state["step"],
                      read / 2**20, setup.startup["startup/resume_s"])
    return state


def _statistics_batch(cfg: Config, layout: ParallelLayout) -> int:
    """Sequences a micro-step's batch statistics (query BatchNorm, MoE load balance) span:
    they are summed over the data-parallel ranks, not over accumulation micro-steps."""
    return cfg.train.micro_batch_size * layout.dp


def _warn_if_statistics_batch_changes(state: dict[str, Any], cfg: Config, setup: _Setup) -> None:
    """An elastic resume may split the same global batch into other micro-steps: allowed, but the
    layers that normalise over the batch then see another batch, so the run is no longer the
    uninterrupted one. Say so with the numbers."""
    saved, now = state.get("statistics_batch"), _statistics_batch(cfg, setup.layout)
    if saved is None or saved == now or not any(hasattr(m, "reduce_stats") for m in setup.model.modules()):
        return
    get_logger().warning(
        "elastic resume changes the batch that batch statistics (query BatchNorm, MoE load balance) span: "
        "%d sequences per micro-step before (checkpoint), %d now (train.micro_batch_size %d x data-parallel %d, "
        "train.grad_accum %d). Training continues on the same global batch but no longer matches an "
        "uninterrupted run; keep micro_batch_size x data-parallel ranks at %d to avoid it",
        saved, now, cfg.train.micro_batch_size, setup.layout.dp, cfg.train.grad_accum, saved)


def _differing_keys(ckpt_path: Path, cfg: Config) -> str:
    try:
        saved = load_config(ckpt_path / "config.toml")
    except (OSError, ConfigError) as exc:  # written by another version, or unreadable
        return f"its config.toml cannot be compared ({exc})"
    differences = hashed_differences(saved, cfg)
    return "keys that differ: " + ", ".join(differences) if differences else "no key differs in value"
def _choose(cfg: Config, setup: _Setup, plan: FaultPlan) -> Checkpoint | None:
    """Collective: the checkpoint to resume or roll back to, the same on every rank (store.choose_checkpoint)."""
    rank, seen = setup.env.rank, {}

    def visible(ckpt: Checkpoint) -> bool:  # hide_checkpoint faults; one answer per checkpoint per choice
        if ckpt.step not in seen:
            seen[ckpt.step] = not plan.hides_checkpoint(ckpt.step, rank)
        return seen[ckpt.step]

    return choose_checkpoint(cfg.run_dir / "checkpoints", setup.layout, cfg.parallel.expert_layout, visible)


def _global_batch(cfg: Config, layout: ParallelLayout) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * layout.dp


def _schedule_lr_at(engine: Any, step: int) -> None:
    """Set the learning rate from THIS run's schedule at ``step``.

    The checkpoint restores the lr the saving run had set, from its own schedule; a
    resume that extends train.max_steps (a resume-safe key) must continue on the new
    cosine, not on the old one for a step.
    """
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


@dataclass
class _Loop:
    """What changes from step to step: counters, the data stream, bad-step and fault bookkeeping."""

    state: dict[str, Any]  # step, consumed samples/tokens (what a checkpoint stores)
    guard: StepGuard
    skips: DataSkips  # data windows skipped after rollbacks
    plan: FaultPlan
    streams: list[TrainStream] = field(default_factory=list)  # every stream opened (for their stats)
    failed_saves: int = 0  # asynchronous saves that failed in this process (metric ckpt/failed_saves)
    batches: Any = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    interval_start: float = 0.0
    interval_steps: int = 0  # steps since the last log line, bad ones included (throughput)

    @property
    def step(self) -> int:
        return self.state["step"]


def _train(cfg: Config, setup: _Setup, stop: PreemptionHandler) -> TrainResult:
    log, t, env = get_logger(), cfg.train, setup.env
    plan = FaultPlan.from_config(cfg.faults, marker_dir=cfg.run_dir / "faults")
    plan.check_world(env.world, under_torchrun_agent())
    saved = _resume(cfg, setup, plan)
    if env.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.toml").write_text(dump_toml(cfg))
    setup.writer = MetricsWriter(cfg.run_dir / "tensorboard", cfg.run_dir / "metrics.jsonl", enabled=env.is_main,
                                 tensorboard=cfg.run.tensorboard, resume_step=saved["step"])
    loop = _Loop(_counters(saved), StepGuard(cfg.guard), DataSkips.from_state(saved.get("data_skips")), plan)
    if "guard" in saved:
        loop.guard.load_state_dict(saved["guard"])
    _open_data(cfg, setup, loop)
    log.info("training %s: world %d (%s), global batch %d x %d tokens, steps %d..%d%s",
             cfg.run.name, env.world, setup.layout.describe(), _global_batch(cfg, setup.layout),
             setup.manifest.seq_len, loop.step, t.max_steps, f"; faults: {loop.plan.describe()}" if loop.plan else "")
    progress = _progress_bar(cfg, env, loop.step)
    interval_loss = torch.zeros(2, dtype=torch.float64, device=setup.device)  # [loss sum, good steps]
    loop.interval_start = time.perf_counter()
    while loop.step < t.max_steps:
        step_loss, grad_norm, bad = _train_step(cfg, setup, loop)
        _advance(cfg, setup, loop)
        step = loop.step
        _report_save(setup, loop, poll_async_save())  # collective while an asynchronous save is in flight
        if bad and loop.guard.needs_rollback:
            _rollback(cfg, setup, loop)
            interval_loss.zero_()
            loop.interval_steps, loop.interval_start = 0, time.perf_counter()
            setup.writer.rewind(loop.step)  # the steps after the checkpoint are trained again
            if progress is not None:
                progress.n = loop.step
            continue
        loop.interval_steps += 1
        if not bad:  # a skipped step's loss (NaN, Inf or a spike) is no part of the training loss
            interval_loss += torch.stack([step_loss.double(), torch.ones((), dtype=torch.float64,
                                                                         device=setup.device)])
        if step % t.log_interval == 0 or step == t.max_steps:
            _log_interval(cfg, setup, loop, interval_loss, grad_norm)
            interval_loss.zero_()
        if progress is not None:
            progress.update(1)
        if t.eval_interval and step % t.eval_interval == 0 and step < t.max_steps:
            _validate(cfg, setup, step)
        if t.ckpt_interval and step % t.ckpt_interval == 0 and step < t.max_steps:
            _save(cfg, setup, loop)
        loop.plan.after_step(step, env.rank)
        if step < t.max_steps and stop.stop_requested():  # collective, same step on every rank
            return _stop_on_signal(cfg, setup, loop, progress)
    if progress is not None:
        progress.close()
    metrics = _validate(cfg, setup, loop.step)
    final = _save(cfg, setup, loop, final=True)
    result = TrainResult(loop.step, metrics, cfg.run_dir, setup.writer.log_dir, loop.losses,
                         tokens=loop.state["consumed_tokens"], checkpoint=final,
                         wall_s=time.perf_counter() - setup.started)
    _print_summary(result, env)
    return result


def _counters(saved: dict[str, Any]) -> dict[str, Any]:
    return {k: saved.get(k, 0) for k in ("step", "consumed_samples", "consumed_tokens")}


def _open_data(cfg: Config, setup: _Setup, loop: _Loop) -> None:
    """The training batches from the step after ``loop.step`` on, skipping the rolled-back windows.

    The data is split over the data-parallel replicas; the TP ranks of a replica share its batch.
    """
    t, layout = cfg.train, setup.layout

    def open_stream(start: int) -> TrainStream:
        stream = TrainStream(
            cfg.data.path, rank=layout.dp_index(setup.env.rank), world=layout.dp, micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum, seed=t.seed, start_step=start, num_workers=cfg.data.num_workers,
            bad_shard=cfg.data.bad_shard, verify=cfg.data.verify, read_retries=cfg.data.read_retries,
            retry_wait_s=cfg.data.retry_wait_s, shuffle_shards=cfg.data.shuffle_shards,
        )
        loop.streams.append(stream)
        return stream

    loop.batches = loop.skips.chain(lambda start: iter(open_stream(start)), loop.step, t.grad_accum)


def _stop_on_signal(cfg: Config, setup: _Setup, loop: _Loop, progress: Any) -> TrainResult:
    """Preemption: checkpoint the finished step, requeue under Slurm, report; the CLI exits 75."""
    if progress is not None:
        progress.close()
    _save(cfg, setup, loop, final=True)  # committed before we exit or requeue
    requeued = requeue_slurm_job() if setup.env.is_main else False
    if setup.env.is_main:
        print(f"stopped on a signal at step {loop.step}: checkpoint committed"
              + ("; Slurm job requeued" if requeued else "; restart the same command to resume"))
    return TrainResult(loop.step, {}, cfg.run_dir, setup.writer.log_dir, loop.losses, preempted=True)


def _train_step(cfg: Config, setup: _Setup, loop: _Loop) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """grad_accum micro-steps and one update, or none for a bad step.

    Returns (this rank's mean loss, grad norm or None, bad). The bad-step decision is
    taken on every rank alike (one all-reduce) before the update: a bad step leaves
    parameters and optimizer state untouched, but keeps its number (see guard.py).
    """
    engine, accum, rank = setup.engine, cfg.train.grad_accum, setup.env.rank
    step = loop.step + 1
    total = torch.zeros((), device=setup.device)
    grad_norm, bad = None, False
    # The forwards update BatchNorm running statistics; a bad step must not keep them (a NaN
    # in the activations would poison them for evaluation). They are small: copy, restore if bad.
    buffers = {name: engine.module.get_buffer(name).clone() for name in _state_buffers(setup)}
    if setup.selector is not None:
        setup.selector.start_step()
    for micro in range(accum):
        batch = next(loop.batches).to(setup.device, non_blocking=True)  # (B, T + 1)
        loss = loop.plan.loss(step, rank, lm_loss(engine(batch[:, :-1]), batch[:, 1:]), micro)
        aux = engine.module.aux_loss()  # MoE load-balancing + z-loss (None for other models)
        engine.backward(loss if aux is None else loss + aux)  # DeepSpeed: / grad_accum, averaged over DP
        total += loss.detach()
        last = micro == accum - 1
        update_start = time.perf_counter()
        if last:
            if setup.selector is not None:
                setup.selector.select()  # before the reduction: unselected rows' gradients are dropped there
            table_sq = _reduce_tables(setup)
            bad = loop.guard.check(total / accum, step=step,  # NOTE: host sync (one small all-reduce)
                                   grads_finite=table_sq is None or bool(torch.isfinite(table_sq)),
                                   local_grads_finite=setup.gradients is None or setup.gradients.take())
            _skip_next_update(engine, bad)
            if bad:
                _restore_buffers(engine.module, buffers)
            if clips_manually(cfg.train):
                grad_norm = clip_gradients(engine.module, cfg.train.grad_clip, *_sharded_groups(setup),
                                           extra_sq=table_sq)
        engine.step()  # applies the update only at the accumulation boundary (and not for a bad step)
        if last:
            _step_tables(cfg, setup, step, bad, grad_norm)
            setup.update_s += time.perf_counter() - update_start
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return total / accum, grad_norm, bad


def _reduce_tables(setup: _Setup) -> torch.Tensor | None:
    """Row-sparse table gradients summed over their replicas; their squared norm over all ranks."""
    tables = table_optimizer(setup.engine)
    if tables is None:
        return None
    tables.reduce()
    return tables.sq_norm()


def _step_tables(cfg: Config, setup: _Setup, step: int, bad: bool, grad_norm: torch.Tensor | None) -> None:
    """Update the tables' touched rows after DeepSpeed's step, clipped by the same global norm."""
    tables = table_optimizer(setup.engine)
    if tables is None:
        return
    if bad:
        tables.zero_grad()
        return
    norm = grad_norm if grad_norm is not None else setup.engine.get_global_grad_norm()  # includes the tables
    tables.set_step(step - 1)  # the schedule of step `step` (1-based), as DeepSpeed's scheduler
    tables.step(clip_scale(norm, cfg.train.grad_clip))


def _state_buffers(setup: _Setup) -> list[str]:
    """Names of the model's persistent buffers (BatchNorm statistics; not the usage counters)."""
    if setup.state_buffers is None:
        params = {name for name, _ in setup.engine.module.named_parameters()}
        setup.state_buffers = [k for k in setup.engine.module.state_dict() if k not in params]
    return setup.state_buffers


def _restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            model.get_buffer(name).copy_(value)


def _skip_next_update(engine: Any, skip: bool) -> None:
    """Tell our optimizer (under any DeepSpeed wrapper) to leave this update out entirely."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    base.skip_next_step = skip


def _rollback(cfg: Config, setup: _Setup, loop: _Loop) -> None:
    """Too many bad steps: reload the newest good checkpoint and skip the data of the bad window."""
    # An asynchronous save in flight is committed (or failed) on every rank before anyone looks.
    _report_save(setup, loop, await_async_save(cfg.train.collective_timeout_s))
    ckpt = _choose(cfg, setup, loop.plan)
    first, last = loop.guard.bad_window
    if ckpt is None:
        raise CheckpointError(
            f"{loop.guard.bad_since_checkpoint} bad steps (NaN/Inf or spiking loss, steps {first}..{last}) and no "
            "checkpoint to roll back to: set train.ckpt_interval, lower train.lr, or raise guard.max_bad_steps")
    added = loop.skips.skip_training_steps(first, last)
    saved = ckpt.trainer_state()
    load_engine_state(ckpt, setup.engine, setup.layout, cfg.parallel.expert_layout)
    _schedule_lr_at(setup.engine, saved["step"])
    loop.guard.rollback(saved.get("guard"))
    loop.state = _counters(saved)
    _open_data(cfg, setup, loop)
    get_logger().warning("rolled back to %s after bad steps %d..%d; data windows skipped from now on: %s",
                         ckpt.path.name, first, last, added)


def _sharded_groups(setup: _Setup) -> tuple[Any, Any]:
    """(EP group, TP group) over which sharded gradient norms are summed; None where unsharded."""

    layout = setup.layout
    ep = expert_parallel_group(f"ep_size_{layout.ep}") if layout.ep > 1 else None
    tp = tensor_parallel_group() if layout.tp > 1 else None
    return ep, tp


def _advance(cfg: Config, setup: _Setup, loop: _Loop) -> None:
    global_batch = _global_batch(cfg, setup.layout)
    st = loop.state
    loop.state = {"step": st["step"] + 1, "consumed_samples": st["consumed_samples"] + global_batch,
                  "consumed_tokens": st["consumed_tokens"] + global_batch * setup.manifest.seq_len}


def _log_interval(cfg: Config, setup: _Setup, loop: _Loop, interval_loss: torch.Tensor, grad_norm: Any) -> None:
    """Log the interval's mean loss (over its good steps and all ranks); one host sync per interval.

    An interval whose steps were all skipped as bad logs no ``train/loss``.
    """
    # Every rank's step loss is a mean over the same number of tokens, so summing
    # [loss, 1] over good steps and ranks and dividing gives the mean over the global batches.
    dist.all_reduce(interval_loss)
    loss_sum, count = interval_loss.tolist()  # NOTE: host sync (once per log interval)
    steps, loop.interval_steps = loop.interval_steps, 0  # every step read and trained on its tokens
    elapsed = time.perf_counter() - loop.interval_start
    # The dense weights' lr; with none training (train.trainable = "experts") the tables' (base lr x scale).
    lrs = setup.engine.get_lr()
    lr = lrs[0] if lrs else table_optimizer(setup.engine).lr / cfg.train.table_lr_scale if cfg.train.table_lr_scale \
        else 0.0
    tokens_per_step = _global_batch(cfg, setup.layout) * setup.manifest.seq_len
    tokens_per_s = tokens_per_step * steps / elapsed
    values = {"train/lr": lr, "train/tokens_per_s": tokens_per_s,
              "train/model_flops_per_s": tokens_per_s * setup.flops_per_token,
              "train/bad_steps": float(loop.guard.bad_steps_total), "train/rollbacks": float(loop.guard.rollbacks)}
    if count > 0:
        values["train/loss"] = loss_sum / count
    if grad_norm is not None:  # the norm of the interval's last step
        values["train/grad_norm"] = float(grad_norm)
    if cfg.train.peak_flops > 0:  # model FLOP utilisation over every rank's device
        values["train/mfu"] = values["train/model_flops_per_s"] / (cfg.train.peak_flops * setup.env.world)
    values.update(_system_metrics(setup, loop.streams, elapsed))
    values.update(dispatch_metrics(setup.engine.module, setup.device))
    values.update(router_metrics(setup.engine.module))
    values.update(table_metrics(table_optimizer(setup.engine)))
    values.update(setup.startup)  # the first log line after a start carries what the start cost
    setup.startup = {}
    setup.writer.scalars(values, loop.step)
    loss = values.get("train/loss", float("nan"))
    get_logger().info("step %d  loss %s  lr %.2e  tok/s %.0f", loop.step,
                      f"{loss:.4f}" if count > 0 else "- (all steps skipped)", lr, values["train/tokens_per_s"])
    if count > 0:
        loop.losses.append((loop.step, loss))
    loop.interval_start = time.perf_counter()


def _system_metrics(setup: _Setup, streams: list[TrainStream], elapsed: float) -> dict[str, float]:
    """Memory, update-time share and data accounting, reduced over all ranks (two small all-reduces)."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if setup.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(setup.device) / 2**20
    stats = {k: sum(s.stats[k] for s in streams) for k in ("skipped_shards", "skipped_samples")}
    reads = {k: sum(s.read_stats[k] for s in streams) for k in ("read_retries", "failed_reads")}
    # max over ranks: the worst rank's memory and update share; a bad shard seen by several ranks once
    worst = torch.tensor([peak_mb, setup.update_s / max(elapsed, 1e-9), stats["skipped_shards"]],
                         dtype=torch.float64, device=setup.device)
    # sum over ranks: the ranks' sample slots are disjoint
    summed = torch.tensor([stats["skipped_samples"], reads["read_retries"], reads["failed_reads"]],
                          dtype=torch.float64, device=setup.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    dist.all_reduce(summed)
    setup.update_s = 0.0
    peak, update_share, shards = worst.tolist()  # NOTE: host sync (once per log interval)
    skipped_samples, retries, failed = summed.tolist()
    return {"sys/peak_memory_mb": peak, "train/update_time_share": update_share, "data/skipped_shards": shards,
            "data/skipped_samples": skipped_samples, "data/read_retries": retries, "data/failed_reads": failed}


def _validate(cfg: Config, setup: _Setup, step: int) -> dict[str, float]:
    env = setup.env
    layout = setup.layout  # TP ranks evaluate the same batches; evaluate() averages them out
    batches = val_batches(cfg.data.path, rank=layout.dp_index(env.rank), world=layout.dp,
                          batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches,
                          read_retries=cfg.data.read_retries, retry_wait_s=cfg.data.retry_wait_s,
                          split=cfg.data.eval_split)
    # val/* metrics are of data.eval_split: the validation split, or the tuning split while tuning
    metrics = evaluate(setup.engine.module, batches, setup.device)
    # the setting it ran with: a sweep validates a finished run again when it changes
    metrics["val/eval_batches"] = float(cfg.train.eval_batches)
    setup.writer.scalars(metrics, step)
    get_logger().info("step %d  validation loss %.4f  perplexity %.2f", step, metrics["val/loss"],
                      metrics["val/perplexity"])
    return metrics


def _save(cfg: Config, setup: _Setup, loop: _Loop, final: bool = False) -> Path:
    """Checkpoint the finished step; interval saves go to the background with train.async_save.

    A synchronous save that fails raises CheckpointSaveError on every rank (exit 74): the
    final checkpoint, or the one a stop signal promises, is never missing after exit 0 or 75.
    """
    rank, step, asynchronous = setup.env.rank, loop.step, cfg.train.async_save and not final
    start = time.perf_counter()
    _report_save(setup, loop, await_async_save(cfg.train.collective_timeout_s))
    trainer_state = dict(loop.state, config_hash=config_hash(cfg), data_fingerprint=setup.manifest.fingerprint,
                         world=setup.env.world, layout=_layout_state(setup.layout),
                         expert_layout=cfg.parallel.expert_layout, global_batch=_global_batch(cfg, setup.layout),
                         statistics_batch=_statistics_batch(cfg, setup.layout), guard=loop.guard.state_dict(),
                         data_skips=loop.skips.state_dict(), shuffle_shards=cfg.data.shuffle_shards)

    def on_phase(phase: str) -> None:  # also runs in the background writer, while loop.step moves on
        if phase == "commit" and setup.lease is not None:
            setup.lease.check()  # never commit into a run folder another job has taken over
        loop.plan.during_save(step, rank, phase)

    path = save_checkpoint(cfg.run_dir / "checkpoints", step, setup.engine, trainer_state, dump_toml(cfg),
                           keep=cfg.train.ckpt_keep, layout=setup.layout, tp_group=_sharded_groups(setup)[1],
                           on_phase=on_phase, asynchronous=asynchronous, timeout_s=cfg.train.collective_timeout_s)
    # How long training stood still for this save (asynchronous: gathering and copying only).
    setup.writer.scalars({"ckpt/blocking_s": time.perf_counter() - start}, loop.step)
    loop.guard.note_checkpoint()
    if not asynchronous:  # corrupt_checkpoint faults act on committed checkpoints
        loop.plan.after_save(loop.step, rank, path)
    return path


def _report_save(setup: _Setup, loop: _Loop, outcome: SaveOutcome | None) -> None:
    """An asynchronous save that failed: one log line on every rank and the metric ckpt/failed_saves."""
    if outcome is None or outcome.ok:
        return
    loop.failed_saves += 1
    setup.writer.scalars({"ckpt/failed_saves": float(loop.failed_saves)}, loop.step)
    get_logger().error("asynchronous checkpoint %s failed and was not committed (%s); training goes on, the "
                       "previous checkpoint stays the newest and the next save does not depend on this one",
                       outcome.name, outcome.describe())


def _layout_state(layout: ParallelLayout) -> dict[str, int]:
    return {"tp": layout.tp, "ep": layout.ep, "dp": layout.dp}


def _progress_bar(cfg: Config, env: DistEnv, start: int) -> Any:
    if not (env.is_main and cfg.train.progress):
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (Slurm, nohup, a pipe): one frame per
    # step would flood the log, which gets the log_interval lines instead.
    return tqdm(total=cfg.train.max_steps, initial=start, desc=cfg.run.name, unit="step", dynamic_ncols=True,
                disable=None)


def _print_summary(result: TrainResult, env: DistEnv) -> None:
    if not env.is_main:
        return
    summary = {"step": result.step, "val_loss": round(result.metrics["val/loss"], 4),
               "val_perplexity": round(result.metrics["val/perplexity"], 3),
               "run_dir": str(result.run_dir), "tensorboard": str(result.tensorboard_dir),
               "checkpoint": str(result.checkpoint), "tokens": result.tokens, "wall_s": round(result.wall_s, 1)}
    summary.update({k: round(v, 4) for k, v in result.metrics.items() if k.startswith("experts/")})
    print(f"validation perplexity: {summary['val_perplexity']}  (loss {summary['val_loss']})")
    print(f"TensorBoard logs: {result.tensorboard_dir}   (tensorboard --logdir {result.tensorboard_dir})")
    print(f"trained {result.tokens:,} tokens to step {result.step} in {result.wall_s:.0f} s; "
          f"final checkpoint: {result.checkpoint}")
    print("summary: " + json.dumps(summary))
