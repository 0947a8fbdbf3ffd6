"""Bad-step guard: one decision on every rank (NaN on one rank, spikes of the mean over ranks),
rollback counters, state round trips, and the skipped-data mapping against hand-written tables."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from peer_dist.config import GuardConfig
from peer_dist.parallel.spawn import run_ranks
from peer_dist.train.guard import DataSkips, StepGuard

NAN, INF = float("nan"), float("inf")

# Two ranks' losses per step (steps 1..8) with spike_factor=2, spike_window=3, max_bad_steps=2.
# Expected decisions, worked out by hand (mean = mean over the two ranks):
#   1: mean 2.0               good (window not full)      history [2]
#   2: mean 2.0               good                        history [2, 2]
#   3: rank 1 NaN             bad  (one rank is enough)
#   4: mean 9.0               good: 4.5x the mean so far, but the window holds only 2 good steps
#                                                         history [2, 2, 9]
#   5: mean 13.0 > 2 x 13/3   bad  (spike) -> 2 bad since the checkpoint: rollback, window (3, 5)
#   6: mean 8.5 <= 2 x 13/3   good                        history [2, 9, 8.5]
#   7: mean 12.5 <= 2 x 6.5   good although rank 0's 20 > 13: the mean over ranks decides
#                                                         history [9, 8.5, 12.5]
#   8: rank 0 Inf             bad
RANK_LOSSES = [(1.0, 3.0), (2.0, 2.0), (1.0, NAN), (9.0, 9.0), (12.0, 14.0), (8.0, 9.0), (20.0, 5.0),
               (INF, 1.0)]
EXPECTED_BAD = [False, False, True, False, True, False, False, True]
EXPECTED_ROLLBACK = [False, False, False, False, True, True, True, True]  # no checkpoint noted in between
EXPECTED_HISTORY = [9.0, 8.5, 12.5]
SPIKE_CFG = GuardConfig(spike_factor=2.0, spike_window=3, max_bad_steps=2)


def _run(guard: StepGuard, losses: list[float], group: object = None) -> dict[str, object]:
    bad, rollback = [], []
    for step, loss in enumerate(losses, start=1):
        bad.append(guard.check(torch.tensor(loss, dtype=torch.float32), group, step=step))
        rollback.append(guard.needs_rollback)
    return {"bad": bad, "rollback": rollback, "window": guard.bad_window, "state": guard.state_dict()}


def _expected_state() -> dict[str, object]:
    return {"version": 1, "history": EXPECTED_HISTORY, "bad_steps_total": 3, "rollbacks": 0}


# ---------------------------------------------------------------------------- one process


def test_single_process_matches_hand_table() -> None:
    """No process group: the decision is on this process's loss (the means of the 2-rank table)."""
    means = [sum(pair) / 2 for pair in RANK_LOSSES]
    out = _run(StepGuard(SPIKE_CFG), means)
    assert out["bad"] == EXPECTED_BAD
    assert out["rollback"] == EXPECTED_ROLLBACK
    assert out["window"] == (3, 8)
    assert out["state"] == _expected_state()


def test_spike_only_after_window_fills() -> None:
    guard = StepGuard(GuardConfig(spike_factor=3.0, spike_window=4))
    # 100x the running mean, but only 3 good steps are known: not a spike
    assert [guard.check(x) for x in (1.0, 1.0, 1.0, 100.0)] == [False] * 4
    guard = StepGuard(GuardConfig(spike_factor=3.0, spike_window=4))
    decisions = [guard.check(x) for x in (1.0, 1.0, 1.0, 1.0, 3.0, 3.01)]
    # window [1, 1, 1, 1] -> 3.0 is not above 3 x 1; then window [1, 1, 1, 3] (mean 1.5) -> 3.01 <= 4.5
    assert decisions == [False] * 6
    assert guard.running_mean == pytest.approx((1.0 + 1.0 + 3.0 + 3.01) / 4)
    assert guard.check(3 * guard.running_mean * 1.001) is True
    assert guard.check(math.nextafter(3 * guard.running_mean, 0.0)) is False


def test_bad_steps_do_not_enter_running_mean() -> None:
    guard = StepGuard(GuardConfig(spike_factor=2.0, spike_window=2, max_bad_steps=10))
    for x in (1.0, 1.0, 5.0, NAN, 50.0, 1.5):
        guard.check(x)
    assert guard.state_dict()["history"] == [1.0, 1.5]
    assert guard.bad_steps_total == 3


def test_spike_factor_zero_only_catches_nonfinite() -> None:
    guard = StepGuard(GuardConfig(spike_factor=0.0, spike_window=1))
    assert [guard.check(x) for x in (1.0, 1e6, -INF, 2.0)] == [False, False, True, False]


def test_disabled_guard_never_flags() -> None:
    guard = StepGuard(GuardConfig(enabled=False, max_bad_steps=1))
    assert guard.check(NAN, step=1) is False
    assert not guard.needs_rollback and guard.bad_steps_total == 0


def test_counters_checkpoint_and_window() -> None:
    guard = StepGuard(GuardConfig(max_bad_steps=2))
    assert guard.check(NAN, step=4) and not guard.needs_rollback
    assert guard.bad_window == (4, 4)
    guard.note_checkpoint()  # a checkpoint after step 5: step 4 is behind it
    assert guard.bad_since_checkpoint == 0 and guard.bad_window is None
    assert guard.check(1.0, step=6) is False
    assert guard.check(INF, step=7) and guard.check(NAN, step=9)
    assert guard.needs_rollback and guard.bad_window == (7, 9)
    assert (guard.bad_steps_total, guard.bad_since_checkpoint) == (3, 2)
    assert "NaN/Inf" in guard.last_reason


def test_state_round_trip_through_json() -> None:
    guard = StepGuard(SPIKE_CFG)
    _run(guard, [sum(pair) / 2 for pair in RANK_LOSSES])
    state = json.loads(json.dumps(guard.state_dict()))
    restored = StepGuard(SPIKE_CFG)
    restored.load_state_dict(state)
    assert restored.state_dict() == guard.state_dict()
    assert restored.bad_since_checkpoint == 0 and not restored.needs_rollback  # a resume starts after a checkpoint
    # the restored guard decides the following steps exactly as the original one
    follow = [10.0, 20.1, 19.9, NAN, 30.0, 100.0]
    decisions = [restored.check(x) for x in follow]
    assert decisions == [guard.check(x) for x in follow] == [False, False, False, True, False, True]
    assert restored.state_dict() == guard.state_dict()


def test_load_keeps_newest_entries_when_window_shrinks() -> None:
    guard = StepGuard(GuardConfig(spike_window=2))
    guard.load_state_dict({"version": 1, "history": [1.0, 2.0, 3.0], "bad_steps_total": 5, "rollbacks": 1})
    assert guard.state_dict() == {"version": 1, "history": [2.0, 3.0], "bad_steps_total": 5, "rollbacks": 1}
    with pytest.raises(ValueError, match="version"):
        guard.load_state_dict({"history": []})


def test_rollback_restores_checkpoint_mean_keeps_totals() -> None:
    guard = StepGuard(GuardConfig(spike_factor=2.0, spike_window=2, max_bad_steps=2))
    guard.check(1.0, step=1)
    guard.check(1.0, step=2)
    guard.note_checkpoint()
    at_checkpoint = guard.state_dict()
    guard.check(1.5, step=3)
    guard.check(NAN, step=4)
    guard.check(9.0, step=5)
    assert guard.needs_rollback and guard.bad_window == (4, 5)
    guard.rollback(at_checkpoint)
    assert guard.state_dict() == {"version": 1, "history": [1.0, 1.0], "bad_steps_total": 2, "rollbacks": 1}
    assert not guard.needs_rollback and guard.bad_window is None
    guard.rollback(None)  # a rollback to step 0: nothing known yet
    assert guard.state_dict() == {"version": 1, "history": [], "bad_steps_total": 2, "rollbacks": 2}


# ---------------------------------------------------------------------------- two gloo ranks


def _two_rank_worker(rank: int, world: int) -> dict[str, object]:
    import torch.distributed as dist

    out = _run(StepGuard(SPIKE_CFG), [pair[rank] for pair in RANK_LOSSES])
    # the same with an explicit group; and a NaN that only rank 0 sees
    group = dist.new_group([0, 1])
    explicit = StepGuard(GuardConfig(max_bad_steps=1))
    out["explicit"] = [explicit.check(torch.tensor(x), group, step=s)
                       for s, x in enumerate([1.0, NAN if rank == 0 else 1.0, 2.0], start=1)]
    out["explicit_rollback"] = explicit.needs_rollback
    return out


def test_two_ranks_agree_when_one_sees_nan() -> None:
    results = run_ranks(_two_rank_worker, 2, timeout=180)
    for out in results:
        assert out["bad"] == EXPECTED_BAD
        assert out["rollback"] == EXPECTED_ROLLBACK
        assert out["window"] == (3, 8)
        assert out["state"] == _expected_state()
        assert out["explicit"] == [False, True, False]
        assert out["explicit_rollback"] is True
    assert results[0] == results[1]  # bit for bit: the running means too


# ---------------------------------------------------------------------------- DataSkips


def _brute_force(windows: list[tuple[int, int]], steps: int) -> list[int]:
    """Training step t (1-based) reads the t-th data step outside every window."""
    free = [d for d in range(1, 10 * steps + 100) if not any(a <= d <= b for a, b in windows)]
    return [0] + free[:steps]


def test_data_skips_hand_table() -> None:
    skips = DataSkips([(5, 7)])
    assert [skips.data_step(t) for t in range(0, 8)] == [0, 1, 2, 3, 4, 8, 9, 10]
    two = DataSkips([(9, 9), (3, 4)])  # unsorted input
    #                 training step: 0  1  2  3  4  5  6  7   8   9
    assert [two.data_step(t) for t in range(10)] == [0, 1, 2, 5, 6, 7, 8, 10, 11, 12]
    assert two.windows == [(3, 4), (9, 9)]
    assert [DataSkips().data_step(t) for t in range(4)] == [0, 1, 2, 3]


def test_data_skips_merge() -> None:
    skips = DataSkips([(5, 7), (8, 9), (12, 14), (13, 20)])
    assert skips.windows == [(5, 9), (12, 20)]
    skips.add(1, 30)
    assert skips.windows == [(1, 30)]
    with pytest.raises(ValueError, match="start <= end"):
        skips.add(4, 3)


def test_data_skips_match_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        windows = []
        for _ in range(rng.randint(0, 5)):
            a = rng.randint(1, 40)
            windows.append((a, a + rng.randint(0, 6)))
        skips = DataSkips(windows)
        assert [skips.data_step(t) for t in range(60)] == _brute_force(windows, 59)


def test_skip_training_steps_over_two_rollbacks() -> None:
    """Checkpoint at 4; steps 5..7 bad -> rollback; after the replay, steps 5..6 bad again -> rollback."""
    skips = DataSkips()
    assert skips.skip_training_steps(5, 7) == [(5, 7)]
    assert [skips.data_step(t) for t in range(1, 9)] == [1, 2, 3, 4, 8, 9, 10, 11]
    assert skips.skip_training_steps(5, 6) == [(8, 9)]  # they read data steps 8 and 9
    assert skips.windows == [(5, 9)]
    assert [skips.data_step(t) for t in range(1, 7)] == [1, 2, 3, 4, 10, 11]


def test_skip_training_steps_across_an_older_window() -> None:
    """A rollback to an older checkpoint (the newest was damaged): steps 3..5 straddle window (4, 6)."""
    skips = DataSkips([(4, 6)])
    # training steps 3, 4, 5 read data steps 3, 7, 8
    assert skips.skip_training_steps(3, 5) == [(3, 3), (7, 8)]
    assert skips.windows == [(3, 8)]
    assert [skips.data_step(t) for t in range(1, 5)] == [1, 2, 9, 10]


def test_segments_and_chain_feed_a_stream() -> None:
    skips = DataSkips([(5, 7), (10, 10)])
    # data steps read after 3 completed steps: 4 | 8 9 | 11 12 ...
    assert list(skips.segments(3)) == [(3, 1), (7, 2), (10, None)]
    assert list(skips.segments(0)) == [(0, 4), (7, 2), (10, None)]
    assert list(skips.segments(7)) == [(11, None)]  # after step 7 (data step 11)

    def open_stream(start: int):  # a fake TrainStream: 2 micro-batches per data step, from position start
        pos = start
        while True:
            yield (pos + 1, "a")
            yield (pos + 1, "b")
            pos += 1

    items = list(iter_take(skips.chain(open_stream, done=3, per_step=2), 10))
    data_steps = [d for d, _ in items[::2]]
    assert data_steps == [skips.data_step(t) for t in range(4, 9)] == [4, 8, 9, 11, 12]
    assert [m for _, m in items] == ["a", "b"] * 5


def iter_take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_data_skips_state_round_trip() -> None:
    skips = DataSkips([(5, 7), (20, 22)])
    restored = DataSkips.from_state(json.loads(json.dumps(skips.state_dict())))
    assert restored == skips and restored.windows == [(5, 7), (20, 22)]
    assert DataSkips.from_state(None) == DataSkips()
    assert DataSkips.from_state({}) == DataSkips()


def test_nonfinite_table_gradients_make_a_finite_loss_step_bad() -> None:
    guard = StepGuard(GuardConfig(spike_factor=0.0, spike_window=1, max_bad_steps=10))
    assert not guard.check(1.0, step=1, grads_finite=True)
    assert guard.check(1.0, step=2, grads_finite=False)  # finite loss, NaN/Inf expert-table gradients
    assert guard.bad_steps_total == 1 and guard.bad_window == (2, 2)


def test_nonfinite_gradients_on_one_rank_make_the_step_bad_everywhere() -> None:
    """Finite losses everywhere, NaN gradients on rank 1 only: both ranks skip the step."""
    results = run_ranks(_grads_worker, 2, timeout=120)
    assert results == [[False, True, False]] * 2


def _grads_worker(rank: int, world: int) -> list[bool]:
    guard = StepGuard(GuardConfig(spike_factor=0.0, spike_window=1, max_bad_steps=10))
    return [guard.check(1.0, step=s, local_grads_finite=not (s == 2 and rank == 1)) for s in (1, 2, 3)]


def test_gradient_watch_sees_nan_in_a_backward_with_a_finite_loss() -> None:
    from peer_dist.train.faults import _NaNGradient
    from peer_dist.train.guard import GradientWatch

    layer = torch.nn.Linear(4, 2)
    watch = GradientWatch(layer.parameters())
    layer(torch.ones(3, 4)).sum().backward()
    assert watch.take()  # finite
    loss = _NaNGradient.apply(layer(torch.ones(3, 4)).sum())
    assert torch.isfinite(loss)
    loss.backward()
    assert not watch.take() and watch.take()  # NaN seen once, then reset
