"""Running a planned sweep: each point is one `peer-dist train` job in a subprocess.

Output folder layout::

    DIR/spec.toml              the spec this sweep was started with (a copy)
    DIR/configs/<run>.toml     the resolved config of each run (what `train --config` reads)
    DIR/runs/<run>/            each run's folder (metrics.jsonl, checkpoints/, tensorboard/)
    DIR/logs/<run>.log         stdout + stderr of every attempt at the run, appended
    DIR/logs/<run>.json        the attempts: command, exit code, wall seconds
    DIR/results.csv, results.md, isoflop.png

A run is *done* when its newest committed checkpoint is at the planned step and
metrics.jsonl has the validation row of that step (the trainer validates, then
commits the final checkpoint) made with the run's ``train.eval_batches``: it is never
started again. One validated with another ``train.eval_batches`` (a resume-safe key) is
started once more: the trainer finds nothing left to train and validates again. Any other run is started
with the same command; the trainer resumes by itself from its newest good checkpoint.
With ``jobs`` > 1 up to that many runs of a stage train at once, each in its own process
(with ``OMP_NUM_THREADS`` = cores / jobs unless the environment sets it); the stages
(tuning, main runs, extra seeds) still follow one another.
A run folder whose checkpoint belongs to another configuration (the spec, base
config, data or process count changed since) stops the sweep before anything runs.

With a [tune] table the tuning runs go first; each method's main runs are planned
with the settings its finished grid chose (stats.choose) and run after all tuning
runs. A method whose grid has a run that failed keeps its main runs waiting; the other
methods go on. The choice is recomputed from the run folders on every start, so a
resumed sweep continues with the same settings.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from peer_dist.config import dump_toml
from peer_dist.errors import CheckpointError, UserError
from peer_dist.fileio import write_atomic
from peer_dist.sweep.plan import Launch, PlannedRun, format_plan, plan_sweep, plan_tuning
from peer_dist.sweep.results import (RunResult, describe_data, final_validation, result_from_folder,
                                     write_results)
from peer_dist.sweep.spec import SweepSpec, flops_text
from peer_dist.sweep.stats import Choice, choose, close_points

EXIT_PREEMPTED = 75  # as the trainer's (peer_dist/train/signals.py): rerun the same command to continue
EXIT_RUN_FAILED = 1
_LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class _Job:
    """One started run: its process and what its end is reported with."""

    run: PlannedRun
    tag: str
    command: list[str]
    log_path: Path
    child: subprocess.Popen[bytes]
    start: float


@dataclass(frozen=True)
class RunState:
    status: str  # "done" | "resume" | "revalidate" | "new" | "waiting" (for its method's tuning) | "conflict"
    step: int = 0  # newest committed checkpoint's step


def run_state(run: PlannedRun) -> RunState:
    """Where ``run``'s folder stands, without hashing checkpoint files (the trainer verifies on resume).

    Raises CheckpointError when the folder holds a run of another configuration.
    """
    from peer_dist.checkpoint.store import list_checkpoints
    from peer_dist.data.order import check_sample_order

    if run.waiting:  # its learning rate is not chosen yet: its folder is checked once it is
        return RunState("waiting")
    checkpoints = list_checkpoints(run.run_dir / "checkpoints")
    if not checkpoints:
        return RunState("new")
    newest = checkpoints[0]
    try:
        state = newest.trainer_state()
    except (OSError, ValueError):  # a damaged checkpoint: the trainer falls back to an older one
        return RunState("resume", newest.step)
    check_sample_order(state, run.cfg.data.shuffle_shards, f"run folder {run.run_dir}", newest.path.name)
    expected = {"config_hash": run.config_hash, "global_batch": run.global_batch,
                "data_fingerprint": run.data_fingerprint}
    for key, value in expected.items():
        if state.get(key) != value:
            raise CheckpointError(
                f"run folder {run.run_dir} holds a checkpoint ({newest.path.name}) with {key}={state.get(key)!r}, "
                f"the sweep plans {key}={value!r} for it: the spec, its base config, the data or --nproc changed "
                "since that run. Delete the folder to retrain it, or use another --output")
    if newest.step > run.steps:
        raise CheckpointError(f"run folder {run.run_dir} has a checkpoint at step {newest.step}, beyond the "
                              f"{run.steps} steps planned: delete the folder to retrain it, or use another --output")
    if newest.step == run.steps:
        row = final_validation(run.run_dir, run.steps)
        if row is not None and row.get("val/eval_batches") == run.cfg.train.eval_batches:
            return RunState("done", newest.step)
        if row is not None:  # trained, validated with another train.eval_batches: validate again
            return RunState("revalidate", newest.step)
    return RunState("resume", newest.step)


def train_command(config_path: Path, launch: Launch) -> list[str]:
    """`peer-dist train --config FILE`, as one process or under torchrun (python -m torch.distributed.run)."""
    train = ["-m", "peer_dist.cli", "train", "--config", str(config_path)]
    if launch.launcher == "none":
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch.nproc}", *train]


class _Stopper:
    """SIGTERM / SIGUSR1 to the sweep: pass it to the running jobs (which checkpoint and exit 75), start no more.

    A plain child gets the same signal; torchrun gets SIGTERM, which it forwards to its
    workers (it would die on SIGUSR1 and orphan them). The trainer stops on both by default
    (train.stop_signals).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def install(self) -> _Stopper:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.stopped = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum if self.launch.launcher == "none" else signal.SIGTERM)


@contextmanager
def _locked(output: Path) -> Iterator[None]:
    """One sweep per output folder at a time (two would train the same run folders)."""
    with open(output / ".sweep.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `peer-dist sweep` is running on {output} (lock {output / '.sweep.lock'})") \
                from None
        yield


class SweepRunner:
    """Plans (tuning runs, then main runs with the chosen settings), trains what is not done, writes results."""

    def __init__(self, spec: SweepSpec, output: Path, launch: Launch, only: list[str] | None = None,
                 jobs: int = 1) -> None:
        if jobs < 1:
            raise UserError(f"--jobs must be at least 1, got {jobs}")
        self.spec, self.output, self.launch, self.only, self.jobs = spec, output, launch, only, jobs
        self.tune_runs = plan_tuning(spec, output, launch, only)
        self.runs = self._plan_main()
        self.extra_runs = self._plan_extra()

    def _chosen(self) -> dict[str, dict[str, float]] | None:
        if self.spec.tune is None:
            return None
        return {m: c.chosen for m, c in self.choices().items() if c.chosen is not None}

    def _plan_main(self) -> list[PlannedRun]:
        return plan_sweep(self.spec, self.output, self.launch, self.only, self._chosen())

    def _plan_extra(self) -> list[PlannedRun]:
        """sweep.close_seeds runs of the points whose differences are within noise (decided on the
        finished runs of sweep.seeds alone, so a rerun plans the same ones)."""
        if not self.spec.close_seeds:
            return []
        close = close_points(self._results(self.runs))
        if not close:
            return []
        spec, chosen = replace(self.spec, seeds=self.spec.close_seeds), self._chosen()
        runs = []
        for budget, method, size in close:
            runs += [r for r in plan_sweep(spec, self.output, self.launch, [f"{method}/{size}"], chosen)
                     if r.budget == budget]
        return runs

    @property
    def all_runs(self) -> list[PlannedRun]:
        return self.tune_runs + self.runs + self.extra_runs

    def choices(self) -> dict[str, Choice]:
        return choose(self._results(self.tune_runs))

    def states(self, conflicts: list[str] | None = None) -> dict[str, RunState]:
        """Every run's state. A run folder of another configuration raises (before anything runs),
        or, with a ``conflicts`` list, is reported there and gets the state "conflict"."""
        out = {}
        for run in self.all_runs:
            try:
                out[run.name] = run_state(run)
            except CheckpointError as exc:
                if conflicts is None:
                    raise
                conflicts.append(str(exc))
                out[run.name] = RunState("conflict")
        return out

    def execute(self) -> int:
        """Train every run that is not done, in plan order (tuning first); results after each. Returns the exit code."""
        self.output.mkdir(parents=True, exist_ok=True)
        with _locked(self.output):
            states = self.states()
            write_atomic(self.output / "spec.toml", self.spec.path.read_text())
            print(format_plan(self.all_runs, {n: s.status for n, s in states.items()}), flush=True)
            self.write_results()
            stopper = _Stopper(self.launch).install()
            try:
                code = self._run_all(self.tune_runs, states, stopper, "tuning ") if self.tune_runs else 0
                if code != EXIT_PREEMPTED:
                    code = max(code, self._run_main(stopper))
                if code == 0:
                    code = self._run_extra(stopper)
            finally:
                stopper.restore()
            paths = self.write_results()
            print("results: " + ", ".join(str(p) for p in paths), flush=True)
            return code

    def _run_main(self, stopper: _Stopper) -> int:
        if self.tune_runs:
            self.runs = self._plan_main()  # with the settings the finished grids chose
            for method, choice in self.choices().items():
                if choice.chosen is None:
                    print(f"{method}: its tuning grid has unfinished runs; its runs wait (rerun to retry)", flush=True)
                else:
                    print(f"{method}: chosen on the tuning split: "
                          + ", ".join(f"{k} = {v:g}" for k, v in choice.chosen.items()), flush=True)
        states = self.states()  # a folder trained with other settings stops the sweep here
        code = self._run_all(self.runs, states, stopper, "")
        waiting = sorted({r.method for r in self.runs if r.waiting})
        if waiting and code == 0:
            print(f"method(s) {', '.join(waiting)} wait for their tuning runs; rerun the same command", flush=True)
            return EXIT_RUN_FAILED
        return code

    def _run_extra(self, stopper: _Stopper) -> int:
        self.extra_runs = self._plan_extra()
        if not self.extra_runs:
            return 0
        points = sorted({f"{flops_text(r.budget)} {r.method}/{r.size}" for r in self.extra_runs})
        print(f"within noise: seeds {', '.join(map(str, self.spec.close_seeds or ()))} added to "
              + "; ".join(points), flush=True)
        return self._run_all(self.extra_runs, self.states(), stopper, "extra seed ")

    def _run_all(self, runs: list[PlannedRun], states: dict[str, RunState], stopper: _Stopper, what: str) -> int:
        """Train the runs that are not done, up to self.jobs at a time, in plan order."""
        todo = []
        for i, run in enumerate(runs, 1):
            tag = f"[{what}{i}/{len(runs)}] {run.name}"
            if states[run.name].status == "done":
                print(f"{tag}: done, not retrained", flush=True)
            elif not run.waiting:
                todo.append((run, tag))
        failed, preempted, running = [], False, []
        while todo or running:
            while todo and len(running) < self.jobs and not stopper.stopped:
                run, tag = todo.pop(0)
                running.append(self._start(run, states[run.name], stopper, tag))
            if not running:
                break
            job = self._wait_any(running, stopper)
            running.remove(job)
            code = self._finish(job, stopper)
            self.write_results()
            if code == EXIT_PREEMPTED or stopper.stopped:
                print(f"{job.tag}: stopped on a signal; rerun the same command to continue", flush=True)
                preempted = True
            elif code != 0:
                failed.append(job.run.name)
        if preempted or stopper.stopped:
            return EXIT_PREEMPTED
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; see {self.output / 'logs'}/<run>.log. "
                  "Rerun the same command to retry them (finished runs are kept).", flush=True)
            return EXIT_RUN_FAILED
        return 0

    def _start(self, run: PlannedRun, state: RunState, stopper: _Stopper, tag: str) -> _Job:
        config_path = self.output / "configs" / f"{run.name}.toml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(config_path, dump_toml(run.cfg))
        command = train_command(config_path, self.launch)
        log_path = self.output / "logs" / f"{run.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        how = {"resume": f"resuming from step {state.step}",
               "revalidate": f"trained; validating again with train.eval_batches = {run.cfg.train.eval_batches}"
               }.get(state.status, "starting")
        print(f"{tag}: {how}, {run.steps} steps of {run.tokens_per_step} tokens (log {log_path})", flush=True)
        with open(log_path, "ab") as log:
            log.write(f"\n=== sweep attempt {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n".encode())
            log.flush()
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._child_env())
        stopper.children.append(child)
        return _Job(run, tag, command, log_path, child, time.monotonic())

    def _child_env(self) -> dict[str, str] | None:
        """With several jobs, each gets an equal share of the cores unless OMP_NUM_THREADS is set."""
        if self.jobs == 1 or "OMP_NUM_THREADS" in os.environ:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_job = max(1, cores // (self.jobs * self.launch.nproc))
        return {**os.environ, "OMP_NUM_THREADS": str(per_job)}

    @staticmethod
    def _wait_any(running: list[_Job], stopper: _Stopper) -> _Job:
        """The first of ``running`` to exit. Ctrl-C reaches the children too (same process group):
        it marks the sweep stopped and the jobs are left to end by themselves."""
        while True:
            try:
                for job in running:
                    if job.child.poll() is not None:
                        return job
                time.sleep(0.2)
            except KeyboardInterrupt:
                stopper.stopped = True

    def _finish(self, job: _Job, stopper: _Stopper) -> int:
        run, tag, code = job.run, job.tag, int(job.child.returncode)
        stopper.children.remove(job.child)
        wall = time.monotonic() - job.start
        self._record_attempt(run, job.command, code, wall, stopped=stopper.stopped or code == EXIT_PREEMPTED)
        if code == 0 and run_state(run).status != "done":
            print(f"{tag}: exited 0 but its folder has no final checkpoint + validation at step {run.steps}",
                  flush=True)
            return EXIT_RUN_FAILED
        if code == 0:
            row = final_validation(run.run_dir, run.steps) or {}
            split = "tuning-split" if run.stage == "tune" else "validation"
            print(f"{tag}: done in {wall:.0f} s, {split} perplexity {row.get('val/perplexity', float('nan')):.3f}",
                  flush=True)
        elif code != EXIT_PREEMPTED:
            print(f"{tag}: FAILED (exit {code}) after {wall:.0f} s; last lines of {job.log_path}:\n"
                  + _tail(job.log_path, _LOG_TAIL_LINES), flush=True)
        return code

    def _record_attempt(self, run: PlannedRun, command: list[str], code: int, wall: float, stopped: bool) -> None:
        path = self.output / "logs" / f"{run.name}.json"
        attempts = _read_attempts(path)
        # stopped: a stop signal ended it (torchrun itself then exits 1 although its workers checkpointed)
        attempts.append({"command": command, "exit_code": code, "stopped": stopped, "wall_s": round(wall, 2),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_atomic(path, json.dumps({"attempts": attempts}, indent=1))

    def _results(self, runs: list[PlannedRun]) -> list[RunResult]:
        out = []
        for run in runs:
            attempts = _read_attempts(self.output / "logs" / f"{run.name}.json")
            wall = sum(a["wall_s"] for a in attempts) if attempts else None
            try:
                state = run_state(run)
            except CheckpointError:
                state = RunState("conflict")
            out.append(result_from_folder(run, _status_text(run, state, attempts), wall))
        return out

    def results(self) -> list[RunResult]:
        return self._results(self.runs + self.extra_runs)

    def write_results(self) -> list[Path]:
        data = [describe_data(path) for path in dict.fromkeys(run.cfg.data.path for run in self.all_runs)]
        tuning = self._results(self.tune_runs)
        return write_results(self.output, self.results(), self.spec.description or self.spec.path.stem, data,
                             tuning)


def _status_text(run: PlannedRun, state: RunState, attempts: list[dict[str, Any]]) -> str:
    if state.status in ("done", "conflict"):
        return state.status
    if state.status == "waiting":
        return "waiting for tuning"
    if state.status == "revalidate":
        return "trained; to validate again (train.eval_batches changed)"
    last = attempts[-1] if attempts else {}
    if last.get("exit_code", 0) != 0:
        what = "stopped" if last.get("stopped") else "failed"
        return f"{what} (exit {last['exit_code']}, step {state.step} of {run.steps})"
    return f"partial (step {state.step} of {run.steps})" if state.step else "pending"


def _read_attempts(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["attempts"])
    except (ValueError, KeyError, TypeError):
        return []


def _tail(path: Path, lines: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 16384))
        text = fh.read().decode(errors="replace")
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
