"""Config: defaults < file < overrides, strict keys and values, round trip, resume hash."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from peer_dist.config import (Config, config_hash, dump_toml, from_dict, load_config, resolve_ffn_blocks)
from peer_dist.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_merge_order_defaults_file_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\nd_model = 64\nn_heads = 2\n[train]\nlr = 0.5\n')
    cfg = load_config(path, ["train.lr=3e-4", "model.peer.topk=4"])
    assert cfg.model.d_model == 64  # file over default
    assert cfg.train.lr == pytest.approx(3e-4)  # override over file
    assert cfg.model.peer.topk == 4
    assert cfg.model.n_layers == Config().model.n_layers  # untouched default


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  ffn: dense\n  ffn_blocks: [0, 2]\n")
    cfg = load_config(path)
    assert cfg.model.ffn == "dense" and cfg.model.ffn_blocks == [0, 2]


@pytest.mark.parametrize("override,needle", [
    ("model.dmodel=3", "model.dmodel"),
    ("nosection.x=1", "nosection"),
    ("train.zero_stage=3", "train.zero_stage"),
    ("model.ffn=mixture", "'peer', 'dense', 'moe', 'pkm'"),
    ("train.lr=fast", "train.lr"),
    ("model.peer.heads=0", "model.peer.heads"),
    ("model.ffn_blocks=[7]", "model.ffn_blocks"),
    ("model.ffn_blocks=first", "model.ffn_blocks"),
    ("train.progress=maybe", "train.progress"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("model.d_model=130", "model.n_heads"),
    ("model=3", "model"),
    ("justtext", "section.key=value"),
])
def test_bad_keys_and_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(bad)
    ini = tmp_path / "c.ini"
    ini.write_text("")
    with pytest.raises(ConfigError, match=r"\.toml"):
        load_config(ini)


def test_dump_round_trip() -> None:
    cfg = load_config(None, ["model.ffn_blocks=[0, 1]", "train.lr=1e-4", "run.name=x"])
    assert from_dict(tomllib.loads(dump_toml(cfg))) == cfg


def test_ffn_blocks() -> None:
    assert resolve_ffn_blocks("middle", 4) == [2]
    assert resolve_ffn_blocks("middle", 5) == [2]
    assert resolve_ffn_blocks("all", 3) == [0, 1, 2]
    assert resolve_ffn_blocks("none", 3) == []
    assert resolve_ffn_blocks([2, 0, 2], 3) == [0, 2]


def test_hash_ignores_resume_safe_keys_only() -> None:
    base = config_hash(load_config(None, []))
    assert config_hash(load_config(None, ["train.max_steps=7", "run.name=other", "data.num_workers=2"])) == base
    # the same math elsewhere: a run checkpointed on CUDA resumes on CPU, with the torch kernels
    assert config_hash(load_config(None, ["train.device=cpu", "train.backend=gloo", "model.peer.kernel=chunked"])) \
        == base
    assert config_hash(load_config(None, ["train.lr=0.1"])) != base
    assert config_hash(load_config(None, ["model.peer.topk=4"])) != base


def test_keys_added_later_leave_old_hashes_alone_at_their_default() -> None:
    """The default config's hash as written by checkpoints before the lifelong-learning keys and
    data.shuffle_shards existed (a run saved then must still resume, with data.shuffle_shards=1, the
    order it trained on); setting one of those keys otherwise changes the hash."""
    from peer_dist.config import HASHED_UNLESS_DEFAULT

    old_order = ["data.shuffle_shards=1"]
    base = config_hash(load_config(None, old_order))
    assert base == "a0bbe31e9c74ead7"
    for key in HASHED_UNLESS_DEFAULT:
        assert config_hash(load_config(None, [*old_order, f"{key}={HASHED_UNLESS_DEFAULT[key]}"])) == base, key
    for override in ("train.trainable=peer", "model.add_peer=residual", "train.sparse_experts_select=phase",
                     "data.shuffle_shards=16"):
        assert config_hash(load_config(None, [*old_order, override])) != base, override
    assert config_hash(load_config(None, [])) != base  # the default mixes 16 shards: another sample order


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_the_default_config_is_small_and_the_paper_is_a_preset() -> None:
    """`peer-dist train` without --config must finish in minutes on a CPU: the defaults are the
    tiny preset, not the paper's 1024^2 experts (which configs/paper_peer.toml holds)."""
    from peer_dist.config import to_dict

    root = Path(__file__).resolve().parents[1]
    tiny, default = to_dict(load_config(root / "configs" / "tiny.toml")), to_dict(Config())
    for section in ("model", "train"):
        assert tiny[section] == default[section]
    paper = load_config(root / "configs" / "paper_peer.toml")
    assert (paper.model.peer.num_experts, paper.model.peer.heads, paper.model.peer.topk) == (1024 ** 2, 8, 16)
    assert paper.model.peer.d_key == 128 and paper.model.d_model == 1024


def test_reading_a_config_imports_no_torch() -> None:
    """Config validation (fault specs and signal names included) is plain Python: the sweep planner
    and the CLI's argument checks read configs without paying for torch or torch.distributed."""
    import subprocess
    import sys

    code = ("import sys; from peer_dist.config import load_config; "
            "load_config('configs/tiny.toml', ['faults.inject=[\"crash:step=2:rank=1\"]', 'train.stop_signals=[\"USR1\"]']); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", out
