"""Bad steps: one decision for every rank, a rollback after too many, and the data they skip.

The rule (docs/resume.md, "Bad steps"): a NaN/Inf loss or gradient, or a loss spike, on
any rank makes every rank skip the step (one all-reduced flag); after K bad steps the run
rolls back to the last good checkpoint and skips the offending batch window,
deterministically.

Step numbers. Everywhere in this module "step N" is the N-th optimizer step of the run
(1-based): the value of the trainer's ``step`` counter *after* that step, the number in
the log line "step N loss ..." and in the checkpoint name ``step_N`` (which holds the
state after step N). A checkpoint at step s0 has done steps 1..s0; a resume or a
rollback continues with step s0 + 1.

:class:`StepGuard` — one per process, every rank calls :meth:`StepGuard.check` with its
loss of step N after the backward pass(es) and before the optimizer update:

* a step is **bad** when the loss of any rank is NaN/Inf, or (``spike_factor > 0`` and
  ``spike_window`` good steps have been seen) when the mean loss over the ranks exceeds
  ``spike_factor`` x the mean of the last ``spike_window`` good steps' mean losses;
* the decision comes from one all-reduce, so it is the same on every rank; every rank
  then skips the update of that step (no parameter or optimizer-state change). A
  skipped step keeps its number: the step counter, the data stream and the learning
  rate schedule move on as after a good step (as Megatron counts skipped iterations),
  so a bad step below the rollback limit simply drops its batch;
* bad steps do not enter the running mean; after ``max_bad_steps`` bad steps since the
  last checkpoint, :attr:`StepGuard.needs_rollback` turns True.

:class:`DataSkips` — what "skip the offending batch window" means, exactly: after a
rollback to the checkpoint at step s0 because of the bad steps f <= ... <= l (the first
and last bad step since that checkpoint, training-step numbers), the run replays from
step s0 + 1, but the *data* that training steps f..l read (every one of them, the good
steps in between too) is never read again: the data steps they read are added to a list
of skipped windows, and training step t from then on reads data step
:meth:`DataSkips.data_step` (t), the t-th data step that is in no window. The steps
s0 + 1 .. f - 1 read the same data as before (they were fine); step f reads the first
data step after the window, and so on. The run still makes ``train.max_steps``
optimizer steps; it reads (l - f + 1) more global batches than a run without a
rollback. The windows depend only on the losses (identical on every rank), so every
rank skips the same batches, and a run restarted from a checkpoint that stores the
windows (:meth:`DataSkips.state_dict`) reads exactly the same data.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from peer_dist.config import GuardConfig
from peer_dist.log import get_logger
from peer_dist.parallel.env import flag_device

T = TypeVar("T")

_STATE_VERSION = 1


class StepGuard:
    """Detects bad steps with one small all-reduce per step and counts them towards a rollback.

    Use (every rank, every step, same place)::

        if guard.check(step_loss, step=step + 1):      # before the optimizer update
            drop the gradients, no optimizer update (the step number and lr schedule still advance)
            if guard.needs_rollback:
                first, last = guard.bad_window
                skips.skip_training_steps(first, last)
                reload the last good checkpoint; guard.rollback(its guard state)
        ...
        save {"guard": guard.state_dict(), "data_skips": skips.state_dict(), ...}; then guard.note_checkpoint()

    With ``cfg.enabled`` False, :meth:`check` returns False without communicating
    (every rank has the same config, so no rank waits for another).
    """

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self._history: deque[float] = deque(maxlen=cfg.spike_window)  # mean losses of the last good steps
        self.bad_steps_total = 0  # bad steps over the run (kept by checkpoints; rollbacks do not undo it)
        self.bad_since_checkpoint = 0  # reset by note_checkpoint(), rollback() and load_state_dict()
        self.rollbacks = 0
        self.bad_window: tuple[int, int] | None = None  # (first, last) bad step since the last checkpoint
        self.last_reason: str | None = None  # why the last bad step was bad (for logs)

    # ------------------------------------------------------------------ decision

    def check(self, loss: torch.Tensor | float, group: dist.ProcessGroup | None = None, *,
              step: int | None = None, grads_finite: bool = True, local_grads_finite: bool = True) -> bool:
        """Whether this step is bad on any rank of ``group``; the same answer on every rank.

        ``loss``: this rank's (detached) loss of the step, a scalar (for grad_accum > 1 the
        mean over its micro-batches). ``group``: every rank that takes part in the update
        (the world: with TP/EP a rank skipping alone would desynchronise the replicas);
        None is the default group. ``step``: the step's number (see the module
        docstring), needed for :attr:`bad_window`. A collective: every rank of ``group``
        calls it at the same point of every step. Without an initialised process group
        it decides on this process's loss alone. ``grads_finite``: False when gradients
        that are already the same on every rank (the row-sparse expert tables' norm, summed
        over all ranks) are NaN/Inf: the step is bad whatever the loss. ``local_grads_finite``:
        False when this rank's own backward produced a NaN/Inf gradient (see
        :class:`GradientWatch`); counted over the ranks in the same all-reduce as the loss.
        """
        if not self.cfg.enabled:
            return False
        nonfinite, mean_loss, bad_grads = self._reduce(loss, group, local_grads_finite)
        reason = self._bad_reason(nonfinite, mean_loss)
        if reason is None and bad_grads:
            reason = f"NaN/Inf gradients on {bad_grads} rank(s) with a finite loss"
        if reason is None and not grads_finite:
            reason = "NaN/Inf expert-table gradients"
        if reason is None:
            self._history.append(mean_loss)
            return False
        self._record_bad(reason, step)
        return True

    def _reduce(self, loss: torch.Tensor | float, group: dist.ProcessGroup | None,
                grads_finite: bool = True) -> tuple[int, float, int]:
        """(ranks whose loss is not finite, mean loss over the ranks, ranks whose gradients are not
        finite) from one all-reduce."""
        if isinstance(loss, torch.Tensor):
            value = loss.detach().reshape(()).double()
        else:
            value = torch.tensor(float(loss), dtype=torch.float64)
        finite = torch.isfinite(value)
        # One SUM all-reduce of [not-finite flag, loss or 0]: element 0 counts the ranks with
        # a NaN/Inf loss (> 0 <=> "any rank", a logical OR); element 1 is the sum of the
        # finite losses, so sum / world is the mean over the ranks whenever element 0 is 0
        # (a NaN is replaced by 0 so it cannot hide the count). Each rank's loss is a mean
        # over the same number of tokens, so the plain mean over ranks is the global-batch
        # mean. The reduced buffer is bitwise identical on every rank (each element is
        # reduced once, then broadcast/all-gathered), so every decision below is too. Element 2
        # counts the ranks whose backward produced a NaN/Inf gradient.
        buf = torch.stack([(~finite).double(), torch.where(finite, value, torch.zeros_like(value)),
                           torch.tensor(0.0 if grads_finite else 1.0, dtype=torch.float64)])
        world = 1
        if dist.is_available() and dist.is_initialized():
            buf = buf.to(flag_device(group))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            world = dist.get_world_size(group)
        count, total, bad_grads = buf.tolist()  # NOTE: host sync (24 bytes, once per step: the decision needs it)
        return round(count), total / world, round(bad_grads)

    def _bad_reason(self, nonfinite: int, mean_loss: float) -> str | None:
        if nonfinite:
            return f"NaN/Inf loss on {nonfinite} rank(s)"
        if not math.isfinite(mean_loss):  # the sum of finite float64 losses overflowed: not a real loss
            return "mean loss over the ranks is not finite"
        factor, window = self.cfg.spike_factor, self.cfg.spike_window
        if factor > 0 and len(self._history) == window:
            running = math.fsum(self._history) / window
            if mean_loss > factor * running:
                return f"loss spike: {mean_loss:.4g} > {factor:g} x running mean {running:.4g} of {window} good steps"
        return None

    def _record_bad(self, reason: str, step: int | None) -> None:
        self.bad_steps_total += 1
        self.bad_since_checkpoint += 1
        self.last_reason = reason
        if step is not None:
            first = step if self.bad_window is None else self.bad_window[0]
            self.bad_window = (first, step)
        at = f"step {step}" if step is not None else "a step"
        get_logger().warning("bad step at %s (%s): update skipped on every rank; %d of %d bad steps since the "
                             "last checkpoint before a rollback", at, reason, self.bad_since_checkpoint,
                             self.cfg.max_bad_steps)

    # ------------------------------------------------------------------ rollback bookkeeping

    @property
    def needs_rollback(self) -> bool:
        """True once ``max_bad_steps`` bad steps happened since the last checkpoint (same on every rank)."""
        return self.cfg.enabled and self.bad_since_checkpoint >= self.cfg.max_bad_steps

    @property
    def running_mean(self) -> float | None:
        """Mean of the remembered good steps' losses (None before the first good step)."""
        return math.fsum(self._history) / len(self._history) if self._history else None

    def note_checkpoint(self) -> None:
        """A checkpoint was committed: bad steps before it are behind us (their updates were skipped)."""
        self.bad_since_checkpoint = 0
        self.bad_window = None

    def rollback(self, checkpoint_state: dict[str, Any] | None) -> None:
        """The trainer reloaded a checkpoint after :attr:`needs_rollback`; resynchronise with it.

        ``checkpoint_state``: the :meth:`state_dict` stored in that checkpoint (None when it
        holds none, e.g. a rollback to step 0). The running mean becomes the checkpoint's
        (so the replay decides as a restart from that checkpoint would); the totals of
        this process stay, and the rollback is counted.
        """
        total, rollbacks = self.bad_steps_total, self.rollbacks
        self.load_state_dict(checkpoint_state or {"version": _STATE_VERSION, "history": []})
        self.bad_steps_total = max(total, self.bad_steps_total)
        self.rollbacks = max(rollbacks, self.rollbacks) + 1

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values: the running-mean window and the run's counters.

        The since-checkpoint counters are not stored: a run that loads this state starts
        right after the checkpoint, with no bad step since it.
        """
        return {"version": _STATE_VERSION, "history": list(self._history),
                "bad_steps_total": self.bad_steps_total, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"guard state version {state.get('version')!r}; this code reads {_STATE_VERSION}")
        # A resume may change guard.spike_window (a resume-safe key): keep the newest entries.
        self._history = deque((float(x) for x in state["history"]), maxlen=self.cfg.spike_window)
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.bad_since_checkpoint = 0
        self.bad_window = None
        self.last_reason = None


class GradientWatch:
    """Notes NaN/Inf in this rank's gradients as its backward computes them.

    A finite loss can come with non-finite gradients (an overflow inside the backward);
    the loss check alone would apply such a step. Tensor hooks on the parameters see
    every gradient before DeepSpeed reduces, partitions or frees it, whatever the ZeRO
    stage or precision; the flag stays on the device (no host sync) until :meth:`take`.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._bad: torch.Tensor | None = None
        self._handles = [p.register_hook(self._observe) for p in params if p.requires_grad]

    def _observe(self, grad: torch.Tensor) -> None:
        flag = ~torch.isfinite(grad).all()
        self._bad = flag if self._bad is None else self._bad | flag

    def take(self) -> bool:
        """Whether every gradient since the last call was finite; resets. NOTE: host sync."""
        bad, self._bad = self._bad, None
        return bad is None or not bool(bad)


# ---------------------------------------------------------------------------- skipped data


class DataSkips:
    """Training step -> data step, given the data windows skipped after rollbacks. Pure and JSON-serialisable.

    A *data step* N is the global batch the data stream yields as its N-th step when it
    skips nothing (``TrainStream(start_step=N - 1)`` starts at it). ``windows`` are
    inclusive ranges (start, end) of data steps that are never read; training step t
    reads the t-th data step outside every window (1-based, as step numbers; the same
    formula maps 0 -> 0 for 0-based indices). Example, windows [(5, 7)]::

        training step  1 2 3 4 5 6  7 ...
        data step      1 2 3 4 8 9 10 ...
    """

    def __init__(self, windows: Iterable[tuple[int, int]] = ()) -> None:
        self._windows: list[tuple[int, int]] = []
        for start, end in windows:
            self.add(start, end)

    @property
    def windows(self) -> list[tuple[int, int]]:
        """Sorted, disjoint, non-adjacent inclusive ranges of skipped data steps."""
        return list(self._windows)

    def add(self, start: int, end: int) -> None:
        """Skip data steps start..end (inclusive); overlapping and adjacent windows merge."""
        if not 0 <= start <= end:
            raise ValueError(f"skip window ({start}, {end}) needs 0 <= start <= end")
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self._windows, (start, end)]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._windows = merged

    def skip_training_steps(self, first: int, last: int) -> list[tuple[int, int]]:
        """Skip the data that training steps first..last read (under the current windows).

        Returns the data windows added (several when an older window lies inside).
        Training steps before ``first`` keep their data: every new window starts at or
        after ``data_step(first)``.
        """
        if not 0 <= first <= last:
            raise ValueError(f"training steps ({first}, {last}) need 0 <= first <= last")
        added: list[tuple[int, int]] = []
        for t in range(first, last + 1):
            d = self.data_step(t)
            if added and d == added[-1][1] + 1:
                added[-1] = (added[-1][0], d)
            else:
                added.append((d, d))
        for start, end in added:
            self.add(start, end)
        return added

    def data_step(self, step: int) -> int:
        """The data step that training step ``step`` reads."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        d = step
        for start, end in self._windows:  # sorted: each window at or before d pushes d past it
            if start > d:
                break
            d += end - start + 1
        return d

    def segments(self, done: int) -> Iterator[tuple[int, int | None]]:
        """Contiguous data runs for the training steps after ``done`` completed steps.

        Yields (stream start, steps): ``TrainStream(start_step=stream start)`` yields the
        right data for ``steps`` training steps (None: for ever, after the last window).
        E.g. windows [(5, 7)], done=3 -> (3, 1): data step 4, then (7, None): data steps 8, 9, ...
        """
        d = self.data_step(done + 1)  # the next data step to read
        for start, end in self._windows:
            if end < d:
                continue
            yield d - 1, start - d  # data steps d..start-1 (start > d: d is in no window)
            d = end + 1
        yield d - 1, None

    def chain(self, open_stream: Callable[[int], Iterable[T]], done: int, per_step: int = 1) -> Iterator[T]:
        """The items of the training steps after ``done``: ``open_stream(start)`` per segment.

        ``open_stream(start)`` must yield ``per_step`` items per data step from data
        position ``start`` on (e.g. ``lambda s: TrainStream(..., start_step=s)`` with
        per_step = grad_accum micro-batches). A new stream is opened only at a window.
        """
        for start, steps in self.segments(done):
            if steps == 0:
                continue
            stream = open_stream(start)
            yield from (stream if steps is None else islice(stream, steps * per_step))

    def state_dict(self) -> dict[str, Any]:
        return {"windows": [list(w) for w in self._windows]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> DataSkips:
        """From :meth:`state_dict` (None or a checkpoint written before skips existed: no windows)."""
        return cls((int(a), int(b)) for a, b in (state or {}).get("windows", []))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataSkips) and other._windows == self._windows

    def __repr__(self) -> str:
        return f"DataSkips({self._windows})"
