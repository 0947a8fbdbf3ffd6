"""launch/gpu_check.sh on the CPU: arguments, the results file, step failures, the carried wheel.

The GPU steps themselves run only on a CUDA machine; here a stand-in python records what
each step would run, so the script's own logic (time limits, logs, the failure count, the
install command over the carried wheels) is exercised without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT

SCRIPT = ROOT / "launch" / "gpu_check.sh"
STEPS = ["machine", "install", "gpu_tier", "bench_layer", "prepare", "train_bf16"]


def _wheels(tmp: Path) -> Path:
    folder = tmp / "wheels"
    folder.mkdir()
    for name in ("peer_dist-0.1.0-py3-none-any.whl", "deepspeed-0.19.8-py3-none-any.whl"):
        (folder / name).write_bytes(b"")
    return folder


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"}
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_lists_every_step_and_the_benchmark_shape(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("--dry-run", "--wheels", str(_wheels(tmp_path)), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = (out / "gpu_check.md").read_text()
    assert [line[3:] for line in results.splitlines() if line.startswith("## ")] == STEPS
    assert results.count("(dry run: not run") == len(STEPS)
    bench = next(line for line in results.splitlines() if "bench layer" in line)
    for arg in ("--device cuda", "--dtype bf16", "--experts 65536,1048576", "--heads 8", "--topk 16",
                "--d-model 1024", "--tokens 16384", f"--json {out}/bench_layer.json"):
        assert arg in bench
    assert "-m gpu" in results and "train.precision=bf16" in results
    assert not list(out.glob("*.log"))  # nothing ran
    # the time limits of the steps add up to under 8 minutes
    limits = [int(line.split("limit ")[1].split(" s")[0]) for line in results.splitlines() if "limit " in line]
    assert len(limits) == len(STEPS) and sum(limits) < 480


def test_steps_run_log_and_count_failures(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ran: $*"\ncase "$*" in *"bench layer"*) exit 3 ;; esac\n')
    fake.chmod(0o755)
    wheels, out = _wheels(tmp_path), tmp_path / "results"
    proc = _run("--wheels", str(wheels), env={"PYTHON": str(fake), "OUT": str(out),
                                             "PEER_DIST_SITE": str(tmp_path / "site"),
                                             "PEER_DIST_GPU_DATA": str(tmp_path / "data")})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one failed step: the benchmark
    results = (out / "gpu_check.md").read_text()
    assert "(exit 3 after" in results and "failed steps: 1" in results
    assert results.count("(exit 0 after") == len(STEPS) - 1
    assert {p.stem for p in out.glob("*.log")} == set(STEPS)
    install = (out / "install.log").read_text()
    assert f"--no-index --no-deps --no-compile --target {tmp_path / 'site'}" in install
    assert all(str(w) in install for w in wheels.iterdir())
    train = (out / "train_bf16.log").read_text()
    assert f"data.path={tmp_path / 'data'}" in train and f"run.dir={out}/runs" in train


def test_bad_arguments_and_missing_wheels_exit_2(tmp_path: Path) -> None:
    proc = _run("--wheels", str(tmp_path / "none"), "--out", str(tmp_path))
    assert proc.returncode == 2 and "launch/gpu_wheels.sh" in proc.stderr
    proc = _run("--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


def test_our_wheel_carries_the_kernels_and_installs_without_an_index(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("peer_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "peer_dist/model/triton_kernels.py" in names and "peer_dist/bench/layer.py" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = "import peer_dist.model.expert_ops as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().startswith(str(site))
