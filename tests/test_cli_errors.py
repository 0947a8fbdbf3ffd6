"""User errors of eval, export and resume: one line naming the flag or key, exit 2, nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer_dist.errors import EXIT_USER_ERROR
from tests.helpers import run_cli
from tests.test_train import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp}", "run.name=run"])
    return tmp / "run"


def _error(args: list[str]) -> str:
    proc = run_cli(args, check=False)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "perplexity" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("flag,value", [("--batches", "0"), ("--batch-size", "-1")])
def test_eval_needs_at_least_one_batch_of_one_sample(trained: Path, flag: str, value: str) -> None:
    assert f"{flag} must be >= 1, got {value}" in _error(["eval", str(trained), flag, value])


def test_eval_on_data_of_another_tokenizer_names_both_sizes(trained: Path, tmp_path: Path) -> None:
    from peer_dist.data import prepare

    other = tmp_path / "bpe"
    prepare([], other, tokenizer="bpe", vocab_size=300, seq_len=32, samples_per_shard=64, val_fraction=0.1,
            seed=0, max_bytes=100_000)
    line = _error(["eval", str(trained), "--data", str(other)])
    assert "tokenizer of 300 ids" in line and "has 257" in line


def test_export_onto_a_file_is_refused_and_the_file_kept(trained: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    assert "is a file" in _error(["export", str(trained), "-o", str(target)])
    assert target.read_bytes() == b"keep me"


def test_resume_with_max_steps_below_the_checkpoint_is_refused(trained: Path, tiny_data: Path) -> None:
    config = (trained / "config.toml").read_text()
    line = _error(["train", *TINY, f"data.path={tiny_data}", f"run.dir={trained.parent}", "run.name=run",
                   "train.max_steps=2"])
    assert "train.max_steps=2 is below the step of the checkpoint" in line and "step 4" in line
    assert (trained / "config.toml").read_text() == config  # nothing rewritten


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["torchrun", "peer-dist torchrun"])
def test_a_user_error_under_torchrun_is_printed_once(tmp_path: Path, launcher: str) -> None:
    """Both ranks meet the same bad key; one line reaches the terminal. Only the wrapper can turn
    torchrun's own exit 1 (and traceback) into the job's exit 2."""
    import subprocess
    import sys

    from tests.helpers import ROOT, TORCHRUN, _env

    args = ["--standalone", "--nproc-per-node", "2"]
    command = ["train", *TINY, f"run.dir={tmp_path}", "model.d_modle=3"]
    cmd = ([str(TORCHRUN), *args, "-m", "peer_dist.cli", *command] if launcher == "torchrun"
           else [sys.executable, "-m", "peer_dist.cli", "torchrun", *args, *command])
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=200)
    assert proc.stderr.count("unknown config key model.d_modle") == 1, proc.stderr[-3000:]
    if launcher == "peer-dist torchrun":
        assert proc.returncode == EXIT_USER_ERROR and proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == 1  # torchrun's own rule for any failed worker
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(240)
def test_peer_dist_torchrun_exits_with_the_crashed_workers_code(tmp_path: Path, tiny_data: Path) -> None:
    from peer_dist.train.faults import EXIT_INJECTED_CRASH

    proc = run_cli(["torchrun", "--standalone", "--nproc-per-node", "2", "train", *TINY, f"data.path={tiny_data}",
                    f"run.dir={tmp_path}", "train.micro_batch_size=4", 'faults.inject=["crash:step=2:rank=1"]'],
                   check=False, timeout=200)
    assert proc.returncode == EXIT_INJECTED_CRASH, proc.stderr[-3000:]
    assert f"rank 1 exited with {EXIT_INJECTED_CRASH}" in proc.stderr and "ChildFailedError" not in proc.stderr


def test_peer_dist_torchrun_needs_a_command() -> None:
    proc = run_cli(["torchrun", "--standalone", "--nproc-per-node", "2"], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "needs a command after torchrun's options" in proc.stderr


def test_a_message_is_reported_once_per_job_and_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ranks of a job share a parent; the first to report a message prints it, the rest don't."""
    import tempfile

    from peer_dist.errors import first_to_report

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    job = {"WORLD_SIZE": "2"}
    assert first_to_report("bad key", job) and not first_to_report("bad key", job)
    assert first_to_report("another message", job)
    assert first_to_report("bad key", {**job, "TORCHELASTIC_RESTART_COUNT": "1"})  # a restart reports again
    assert first_to_report("bad key", {}) and first_to_report("bad key", {})  # one process: always
