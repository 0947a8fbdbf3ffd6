"""Fault injection units: spec parsing and its messages, hooks firing at the right step and rank only,
abrupt crashes with the documented exit codes (in child processes), once-only firing across restarts."""

from __future__ import annotations

import errno
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from peer_dist.checkpoint.store import MANIFEST, Checkpoint, verify
from peer_dist.config import FaultsConfig
from peer_dist.errors import ConfigError
from peer_dist.fileio import sha256_file
from peer_dist.train.faults import (
    EXIT_INJECTED_CRASH, EXIT_INJECTED_SAVE_CRASH, ENV_VAR, Fault, FaultPlan, corrupt_file, parse_fault, parse_faults,
    split_specs,
)
from tests.helpers import ROOT, _env

# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("crash:step=5:rank=1", Fault("crash", 5, 1)),
    ("crash:step=5", Fault("crash", 5, None)),
    (" NaN : step = 4 : rank = 0 ", Fault("nan", 4, 0)),
    ("inf:step=2", Fault("inf", 2)),
    ("spike:step=3:factor=4.5", Fault("spike", 3, factor=4.5)),
    ("hang:step=6:rank=1:seconds=3600", Fault("hang", 6, 1, seconds=3600.0)),
    ("hang:step=6", Fault("hang", 6, seconds=None)),
    ("signal:step=5:rank=1:sig=SIGUSR1", Fault("signal", 5, 1, sig=int(signal.SIGUSR1))),
    ("signal:step=5:sig=usr2", Fault("signal", 5, sig=int(signal.SIGUSR2))),
    (f"signal:step=5:sig={int(signal.SIGKILL)}", Fault("signal", 5, sig=int(signal.SIGKILL))),
    ("signal:step=1", Fault("signal", 1, sig=int(signal.SIGTERM))),
    ("crash_in_save:step=6:rank=0", Fault("crash_in_save", 6, 0, phase="written")),
    ("crash_in_save:step=6:phase=commit", Fault("crash_in_save", 6, phase="commit")),
    ("corrupt_checkpoint:step=6", Fault("corrupt_checkpoint", 6, file="trainer_state.json")),
    ("corrupt_checkpoint:step=6:file=state/*.pt:rank=0", Fault("corrupt_checkpoint", 6, 0, file="state/*.pt")),
    ("fail_save:step=6:rank=1", Fault("fail_save", 6, 1, phase="written")),
    ("fail_save:step=6:phase=commit", Fault("fail_save", 6, phase="commit")),
    ("hide_checkpoint:step=9:rank=1", Fault("hide_checkpoint", 9, 1)),
    ("signal:step=5:rank=0:sig=KILL:target=launcher", Fault("signal", 5, 0, sig=int(signal.SIGKILL), target="launcher")),
])
def test_parse_good_specs(text: str, expected: Fault) -> None:
    fault = parse_fault(text)
    assert fault == expected
    assert parse_fault(fault.spec) == fault  # the canonical text parses back to the same fault


def test_canonical_spec_text() -> None:
    assert parse_fault("signal:rank=1:step=5:sig=10").spec == "signal:step=5:rank=1:sig=SIGUSR1"
    assert parse_fault("hang:step=2").spec == "hang:step=2:seconds=forever"
    assert parse_fault("crash:step=3").spec == "crash:step=3"
    # target=self is the default and left out: the text (and marker) of older signal specs is unchanged
    assert parse_fault("signal:step=5:target=self").spec == "signal:step=5:sig=SIGTERM"
    assert parse_fault("signal:step=5:target=launcher").spec == "signal:step=5:sig=SIGTERM:target=launcher"
    assert parse_fault("fail_save:step=2").spec == "fail_save:step=2:phase=written"


@pytest.mark.parametrize("text, message", [
    ("boom:step=1", "unknown kind 'boom'; allowed kinds: crash, crash_in_save, fail_save, nan, inf, nan_grad, spike, "
                    "hang, signal, corrupt_checkpoint, hide_checkpoint"),
    ("signal:step=3:target=parent", "target='parent' allowed targets: self, launcher"),
    ("hide_checkpoint:step=3:file=x", "key 'file' is not allowed for kind hide_checkpoint; allowed keys: step, rank"),
    ("", "unknown kind ''"),
    ("crash", "step=N is required"),
    ("crash:rank=1", "step=N is required"),
    ("crash:step=5:seconds=3", "key 'seconds' is not allowed for kind crash; allowed keys: step, rank"),
    ("hang:step=5:sig=TERM", "key 'sig' is not allowed for kind hang; allowed keys: step, rank, seconds"),
    ("crash:step5", "'step5' must look like key=value"),
    ("crash:step=5:step=6", "key 'step' is given twice"),
    ("crash:step=0", "step='0' must be an integer >= 1"),
    ("crash:step=x", "step='x' must be an integer >= 1"),
    ("nan:step=3:rank=-1", "rank='-1' must be an integer >= 0"),
    ("signal:step=3:sig=SIGFOO", "sig='SIGFOO' must be a signal name"),
    ("crash_in_save:step=3:phase=later", "phase='later' allowed phases: start, written, commit"),
    ("corrupt_checkpoint:step=3:file=../x", "must be a path (glob) inside the checkpoint folder"),
    ("corrupt_checkpoint:step=3:file=/etc/passwd", "must be a path (glob) inside the checkpoint folder"),
    ("hang:step=3:seconds=0", "seconds='0' must be a finite number > 0"),
    ("spike:step=3:factor=-2", "factor='-2' must be a finite number > 0"),
])
def test_parse_bad_specs_name_the_spec_and_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fault(text, "faults.inject[1]")
    assert str(info.value).startswith(f"faults.inject[1]: fault spec {text.strip()!r}: ")
    assert message in str(info.value)


def test_split_and_sources_in_order() -> None:
    assert split_specs(" crash:step=5;nan:step=3, hang:step=2:seconds=1 ;; ") == [
        "crash:step=5", "nan:step=3", "hang:step=2:seconds=1"]
    cfg = FaultsConfig(inject=["crash:step=5:rank=1", "nan:step=4;inf:step=6"])
    faults = parse_faults(cfg, {ENV_VAR: "hang:step=2:seconds=1,signal:step=3"})
    assert [f.spec for f in faults] == ["crash:step=5:rank=1", "nan:step=4", "inf:step=6",
                                        "hang:step=2:seconds=1.0", "signal:step=3:sig=SIGTERM"]
    assert parse_faults(FaultsConfig(), {}) == []
    with pytest.raises(ConfigError, match=rf"^{ENV_VAR}: fault spec 'crash:step=-1'"):
        parse_faults(FaultsConfig(), {ENV_VAR: "nan:step=1;crash:step=-1"})
    with pytest.raises(ConfigError, match=r"^faults\.inject\[1\]: fault spec 'oops'"):
        parse_faults(FaultsConfig(inject=["nan:step=1", "crash:step=2;oops"]), {})


def test_check_world() -> None:
    plan = FaultPlan([parse_fault("crash:step=5:rank=3"), parse_fault("nan:step=2")])
    plan.check_world(4)
    with pytest.raises(ConfigError, match=r"rank=3 does not exist in a world of 2 \(ranks 0\.\.1\)"):
        plan.check_world(2)
    launcher = FaultPlan([parse_fault("signal:step=5:sig=SIGKILL:target=launcher")])
    launcher.check_world(2, under_agent=True)
    with pytest.raises(ConfigError, match="target=launcher needs a job started by torchrun"):
        launcher.check_world(1)  # a plain process: its parent is the user's shell (or the test runner)


# ---------------------------------------------------------------------------- loss faults


def test_nan_fires_on_its_step_and_rank_only_and_reaches_gradients() -> None:
    plan = FaultPlan([parse_fault("nan:step=4:rank=0")])
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    for step in (3, 5):
        assert plan.loss(step, 0, (x * x).sum()).item() == 5.0
    assert plan.loss(4, 1, (x * x).sum()).item() == 5.0  # other rank
    loss = plan.loss(4, 0, (x * x).sum(), micro=0)
    assert math.isnan(loss.item())
    loss.backward()
    assert torch.isnan(x.grad).all()  # the gradients are NaN as after a real NaN
    assert math.isnan(plan.loss(4, 0, (x * x).sum(), micro=1).item())  # second micro-batch of the same step
    # a replay of step 4 (after a rollback): fired already
    assert plan.loss(4, 0, (x * x).sum(), micro=0).item() == 5.0
    assert plan.loss(4, 0, (x * x).sum(), micro=1).item() == 5.0


def test_inf_and_spike_every_rank() -> None:
    plan = FaultPlan([parse_fault("inf:step=2"), parse_fault("spike:step=3:factor=8")])
    for rank in (0, 1):
        assert plan.loss(1, rank, torch.tensor(2.0)).item() == 2.0
        assert plan.loss(2, rank, torch.tensor(2.0)).item() == math.inf
        assert plan.loss(3, rank, torch.tensor(2.0), micro=0).item() == 16.0
        assert plan.loss(3, rank, torch.tensor(3.0), micro=1).item() == 24.0
    assert plan.pending(0) == [] and plan.pending(1) == []


def test_empty_plan_is_identity() -> None:
    plan = FaultPlan.from_config(FaultsConfig(), environ={})
    loss = torch.tensor(1.5)
    assert not plan and plan.loss(1, 0, loss) is loss and plan.describe() == "none"
    plan.after_step(1, 0)
    plan.during_save(1, 0, "written")
    with pytest.raises(ValueError, match="allowed: start, written, commit"):
        plan.during_save(1, 0, "middle")


# ---------------------------------------------------------------------------- signal and hang


@pytest.fixture
def usr1_log():
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGUSR1, previous)


def test_signal_to_self_on_its_step_and_rank(usr1_log: list[int]) -> None:
    plan = FaultPlan([parse_fault("signal:step=5:rank=1:sig=SIGUSR1")])
    plan.after_step(4, 1)
    plan.after_step(5, 0)
    assert usr1_log == []
    plan.after_step(5, 1)
    deadline = time.monotonic() + 5
    while not usr1_log and time.monotonic() < deadline:  # delivered at once to the main thread; be lenient
        time.sleep(0.01)
    assert usr1_log == [signal.SIGUSR1]
    plan.after_step(5, 1)  # once only
    time.sleep(0.05)
    assert usr1_log == [signal.SIGUSR1]


def test_hang_is_bounded_by_seconds() -> None:
    plan = FaultPlan([parse_fault("hang:step=2:rank=0:seconds=0.3")])
    start = time.monotonic()
    plan.after_step(2, 1)
    plan.after_step(1, 0)
    assert time.monotonic() - start < 0.2
    plan.after_step(2, 0)
    assert 0.3 <= time.monotonic() - start < 5.0


def test_markers_fire_once_per_run_folder(tmp_path: Path, usr1_log: list[int]) -> None:
    """A restarted process (a new plan, same marker folder) does not fire a fault again; other ranks still do."""
    specs = [parse_fault("signal:step=3:sig=SIGUSR1"), parse_fault("nan:step=2:rank=1")]
    first = FaultPlan(specs, tmp_path / "faults")
    first.after_step(3, 0)
    assert math.isnan(first.loss(2, 1, torch.tensor(1.0)).item())
    assert first.pending(0) == [] and first.pending(1) == [specs[0]]
    restarted = FaultPlan(specs, tmp_path / "faults")
    restarted.after_step(3, 0)
    assert restarted.loss(2, 1, torch.tensor(1.0)).item() == 1.0
    time.sleep(0.05)
    assert usr1_log == [signal.SIGUSR1]
    restarted.after_step(3, 1)  # rank 1 had not fired it yet
    time.sleep(0.05)
    assert usr1_log == [signal.SIGUSR1, signal.SIGUSR1]
    markers = sorted(p.name for p in (tmp_path / "faults").iterdir())
    assert [m.rsplit("-", 1)[0] for m in markers] == ["nan-step2-rank1", "signal-step3-rank0", "signal-step3-rank1"]
    # a different spec at the same kind/step is a different fault
    other = FaultPlan([parse_fault("signal:step=3:sig=SIGUSR1:rank=0")], tmp_path / "faults")
    assert other.pending(0) == list(other.faults)


# ---------------------------------------------------------------------------- crashes (child processes)

_CHILD = textwrap.dedent("""
    import sys
    from peer_dist.config import FaultsConfig
    from peer_dist.train.faults import FaultPlan
    plan = FaultPlan.from_config(FaultsConfig(inject=sys.argv[1:2]), marker_dir=sys.argv[2])
    try:
        for step in (4, 5, 6):
            plan.after_step(step, rank=1)
            print(f"after step {step}", flush=True)
            plan.during_save(step, 0, "start")
            plan.during_save(step, 0, "written")
            print(f"saved step {step}", flush=True)
    except BaseException:
        print("caught", flush=True)
    finally:
        print("finally ran", flush=True)
""")


def _child(spec: str, markers: Path, env_faults: str = "") -> subprocess.CompletedProcess:
    env = _env()
    env[ENV_VAR] = env_faults
    return subprocess.run([sys.executable, "-c", _CHILD, spec, str(markers)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_crash_exits_abruptly_with_its_code_on_the_first_attempt_only(tmp_path: Path) -> None:
    proc = _child("crash:step=5:rank=1", tmp_path / "faults")
    assert proc.returncode == EXIT_INJECTED_CRASH == 86, proc.stderr
    assert proc.stdout.splitlines() == ["after step 4", "saved step 4"]  # no except, no finally
    assert "injected fault fires: crash:step=5:rank=1 (rank 1)" in proc.stderr
    again = _child("crash:step=5:rank=1", tmp_path / "faults")  # the restart replays step 5
    assert again.returncode == 0, again.stderr
    assert "after step 5" in again.stdout and "finally ran" in again.stdout


def test_crash_in_save_from_environment(tmp_path: Path) -> None:
    proc = _child("", tmp_path / "faults", env_faults="crash:step=7;crash_in_save:step=5:rank=0:phase=written")
    assert proc.returncode == EXIT_INJECTED_SAVE_CRASH == 87, proc.stderr
    assert proc.stdout.splitlines() == ["after step 4", "saved step 4", "after step 5"]


def test_crash_for_another_rank_does_not_fire(tmp_path: Path) -> None:
    proc = _child("crash:step=5:rank=0", tmp_path / "faults")
    assert proc.returncode == 0, proc.stderr
    assert "saved step 6" in proc.stdout and not (tmp_path / "faults").exists()


# ---------------------------------------------------------------------------- corrupt_checkpoint


def _fake_checkpoint(path: Path) -> Checkpoint:
    (path / "state").mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 6, "consumed_samples": 96}))
    (path / "state" / "model.pt").write_bytes(bytes(range(256)) * 4)
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    manifest = {"files": {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return Checkpoint(path, 6)


def test_corrupt_checkpoint_fails_verification(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path / "step_000006")
    size = (ckpt.path / "trainer_state.json").stat().st_size
    plan = FaultPlan([parse_fault("corrupt_checkpoint:step=6")])
    plan.after_save(5, 0, ckpt.path)
    assert verify(ckpt) is None
    plan.after_save(6, 0, ckpt.path)
    plan.after_save(6, 1, ckpt.path)  # a second rank writes the same bytes: still corrupt, not undone
    assert verify(ckpt) == "file trainer_state.json fails its sha256 check"
    assert (ckpt.path / "trainer_state.json").stat().st_size == size


def test_corrupt_checkpoint_glob_and_rank(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path / "step_000006")
    plan = FaultPlan([parse_fault("corrupt_checkpoint:step=6:rank=0:file=state/*.pt")])
    plan.after_save(6, 1, ckpt.path)
    assert verify(ckpt) is None
    plan.after_save(6, 0, ckpt.path)
    assert verify(ckpt) == "file state/model.pt fails its sha256 check"
    data = (ckpt.path / "state" / "model.pt").read_bytes()
    assert data[512:516] == b"\xde\xad\xbe\xef" and data[:512] == (bytes(range(256)) * 2)


def test_fault_env_var_name_matches_docs() -> None:
    assert ENV_VAR == "PEER_DIST_FAULTS" and ENV_VAR in FaultsConfig.__doc__


# ---------------------------------------------------------------------------- fail_save, hide_checkpoint


def test_fail_save_raises_an_io_error_at_its_phase_once(tmp_path: Path) -> None:
    plan = FaultPlan([parse_fault("fail_save:step=6:rank=1:phase=commit")], tmp_path / "faults")
    plan.during_save(6, 1, "written")  # another phase
    plan.during_save(6, 0, "commit")  # another rank
    plan.during_save(5, 1, "commit")  # another step
    with pytest.raises(OSError, match=r"injected write failure \(fail_save:step=6:rank=1:phase=commit\)") as info:
        plan.during_save(6, 1, "commit")
    assert info.value.errno == errno.EIO
    plan.during_save(6, 1, "commit")  # once per run folder
    assert FaultPlan(plan.faults, tmp_path / "faults").pending(1) == []


def test_hide_checkpoint_hides_once_per_run_folder(tmp_path: Path) -> None:
    plan = FaultPlan([parse_fault("hide_checkpoint:step=9:rank=1")], tmp_path / "faults")
    assert not plan.hides_checkpoint(9, 0) and not plan.hides_checkpoint(6, 1)
    assert plan.hides_checkpoint(9, 1)
    assert not plan.hides_checkpoint(9, 1)  # the next choice (a rollback) sees it
    assert not FaultPlan(plan.faults, tmp_path / "faults").hides_checkpoint(9, 1)  # nor does a restart


# ---------------------------------------------------------------------------- ranks agree on the checkpoint


def _real_checkpoint(root: Path, step: int, salt: str = "") -> Path:
    """A committed checkpoint as a 2-rank run at EP = 2 writes it (file contents are stand-ins)."""
    path = root / f"step_{step:06d}"
    state = {"step": step, "world": 2, "layout": {"tp": 1, "ep": 2, "dp": 2}, "expert_layout": "permuted"}
    files = {"trainer_state.json": json.dumps(state), "config.toml": "[run]\n", "state/dense.pt": f"dense{step}{salt}",
             "state/experts/blocks.1.ffn.ep000.pt": f"shard0-{step}", "state/experts/blocks.1.ffn.ep001.pt":
             f"shard1-{step}", "rng/rank_00000.pt": "rng0", "rng/rank_00001.pt": "rng1"}
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    manifest = {"files": {rel: {"bytes": (path / rel).stat().st_size, "sha256": sha256_file(path / rel)}
                          for rel in files}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def _choose_in_views(rank: int, world: int, views: list[list[str]]) -> list[Any]:
    """Per scenario, the checkpoint step this rank chooses in its own view of the run folder,
    and, for the newest checkpoint of the first view, the files this rank would read."""
    from peer_dist.checkpoint.store import choose_checkpoint, files_to_load, list_checkpoints
    from peer_dist.parallel.layout import ParallelLayout

    layout = ParallelLayout(world, tp=1, ep=2)
    chosen = [getattr(choose_checkpoint(Path(view[rank]), layout, "permuted"), "step", None) for view in views]
    newest = list_checkpoints(Path(views[0][rank]))[0]
    entries = json.loads((newest.path / MANIFEST).read_text())["files"]
    return [chosen, files_to_load(newest, entries, layout, "permuted")]


@pytest.mark.timeout(180)
def test_ranks_take_the_same_checkpoint_whatever_each_one_sees(tmp_path: Path) -> None:
    """Each rank looks at its own copy of the run folder (as nodes whose file system views differ).
    A checkpoint that one rank cannot see or read is used by none; a file nobody reads is not checked."""
    from peer_dist.parallel.spawn import run_ranks

    def views(name: str, steps: tuple[list[int], list[int]], salt1: str = "") -> list[str]:
        roots = []
        for rank, rank_steps in enumerate(steps):
            root = tmp_path / name / f"rank{rank}"
            root.mkdir(parents=True)
            for step in rank_steps:
                _real_checkpoint(root, step, salt1 if rank == 1 and step == max(rank_steps) else "")
            roots.append(str(root))
        return roots

    damaged_shard = views("shard", ([3, 6], [3, 6]))
    corrupt_file(Path(damaged_shard[0]) / "step_000006/state/experts/blocks.1.ffn.ep001.pt")  # rank 1 reads it
    corrupt_file(Path(damaged_shard[1]) / "step_000006/state/experts/blocks.1.ffn.ep001.pt")
    unread = views("unread", ([3, 6], [3, 6]))
    for root in unread:
        corrupt_file(Path(root) / "step_000006/config.toml")  # no rank reads it to resume
    scenarios = {
        "rank 1 lags": views("lag1", ([3, 6], [3])),
        "rank 0 lags": views("lag0", ([3], [3, 6])),
        "another manifest on rank 1": views("other", ([3, 6], [3, 6]), salt1="x"),
        "a shard only rank 1 reads is damaged": damaged_shard,
        "a file nobody reads is damaged": unread,
        "no checkpoint": views("none", ([], [])),
    }
    ranks = run_ranks(_choose_in_views, 2, list(scenarios.values()), timeout=150)
    expected = [3, 3, 3, 3, 6, None]
    assert ranks[0][0] == ranks[1][0] == expected, dict(zip(scenarios, zip(ranks[0][0], ranks[1][0])))
    # Each rank verifies (and loads) the files it reads: its own expert shard and RNG state only.
    assert ranks[0][1] == ["trainer_state.json", "state/dense.pt", "rng/rank_00000.pt",
                           "state/experts/blocks.1.ffn.ep000.pt"]
    assert ranks[1][1] == ["trainer_state.json", "state/dense.pt", "rng/rank_00001.pt",
                           "state/experts/blocks.1.ffn.ep001.pt"]


# ---------------------------------------------------------------------------- asynchronous saves


def test_the_committer_stops_waiting_when_a_rank_reports_a_failure(tmp_path: Path) -> None:
    import threading

    from peer_dist.checkpoint.store import _wait_for_markers
    from peer_dist.errors import CheckpointSaveError

    (tmp_path / ".written-rank-00000").touch()
    (tmp_path / ".failed-rank-00001").write_text("OSError: [Errno 28] No space left on device")
    start = time.monotonic()
    with pytest.raises(CheckpointSaveError, match="rank 1 could not write its files: OSError: .*No space left"):
        _wait_for_markers(tmp_path, 2, timeout_s=600, cancel=threading.Event())
    assert time.monotonic() - start < 1.0
    (tmp_path / ".failed-rank-00001").unlink()
    with pytest.raises(CheckpointSaveError, match=r"within 0.3 s \(train.collective_timeout_s\)"):
        _wait_for_markers(tmp_path, 2, timeout_s=0.3, cancel=threading.Event())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CheckpointSaveError, match="given up"):
        _wait_for_markers(tmp_path, 2, timeout_s=600, cancel=cancel)
    (tmp_path / ".written-rank-00001").touch()
    _wait_for_markers(tmp_path, 2, timeout_s=600, cancel=threading.Event())  # every rank wrote: returns
