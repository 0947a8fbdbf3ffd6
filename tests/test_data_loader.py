"""Training stream and validation batches, checked against the documented order and plain tar reads.

Ranks are simulated in one process: one TrainStream per rank over the same data.
"""

from __future__ import annotations

import io
import itertools
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from peer_dist.data import Manifest, SampleOrder, TrainStream, micro_batch_sample_ids, prepare, step_sample_ids
from peer_dist.data import val_batches
from peer_dist.errors import DataError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """308 train samples of 17 byte tokens in 13 shards of 24 (the last one 20), 44 val samples in 2 shards."""
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    for i in range(40):
        words = (" ".join(rng.choice(["ab", "cde", "fg", "hij", "k", "lmno", "pq", "rstu"]) for _ in range(35)))
        (root / "text").mkdir(exist_ok=True)
        (root / "text" / f"{i:02d}.txt").write_text(f"{i}: {words} {rng.random()}\n")
    prepare([str(root / "text")], root / "data", seq_len=SEQ_LEN, samples_per_shard=24, val_fraction=0.12, seed=0)
    return root / "data"


def _shard_rows(data_dir: Path, split: str) -> list[np.ndarray]:
    """Per manifest shard, its samples ``(count, SEQ_LEN + 1)`` read with tarfile + numpy."""
    out = []
    for shard in Manifest.load(data_dir).shards(split):
        with tarfile.open(data_dir / shard.file) as tar:
            out.append(np.stack([np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]))
    return out


def _expected_rows(data_dir: Path, seed: int, ids: list[int]) -> np.ndarray:
    """Rows of global ids by the documented definition, re-implemented here (see peer_dist/data/order.py)."""
    shards = _shard_rows(data_dir, "train")
    counts = [len(s) for s in shards]
    n = sum(counts)
    rows = []
    for g in ids:
        epoch, pos = divmod(g, n)
        sequence = [(k, i) for k in np.random.default_rng([seed, epoch, 0]).permutation(len(counts))
                    for i in np.random.default_rng([seed, epoch, 1, k]).permutation(counts[k])]
        k, i = sequence[pos]
        rows.append(shards[k][i])
    return np.stack(rows).astype(np.int64)


def _take(stream: TrainStream, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(stream), n))


def _key(row: np.ndarray | torch.Tensor) -> tuple[int, ...]:
    return tuple(int(x) for x in row)


def test_sample_order_is_the_documented_function(data: Path) -> None:
    counts = [s.samples for s in Manifest.load(data).shards("train")]
    order = SampleOrder(counts, seed=5)
    n = sum(counts)
    for epoch in (0, 1):
        expected = [(int(k), int(i)) for k in np.random.default_rng([5, epoch, 0]).permutation(len(counts))
                    for i in np.random.default_rng([5, epoch, 1, k]).permutation(counts[k])]
        assert [order.locate(epoch * n + p) for p in range(n)] == expected
    # A full epoch visits every (shard, sample) exactly once.
    assert sorted(order.locate(g) for g in range(n)) == [(k, i) for k, c in enumerate(counts) for i in range(c)]


def _mixed_sequence(counts: list[int], seed: int, epoch: int, width: int) -> list[tuple[int, int]]:
    """One epoch of the mixed order (data.shuffle_shards = width), by the documented definition."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(counts))
    out = []
    for j, first in enumerate(range(0, len(order), width)):
        group = [(int(k), i) for k in order[first:first + width] for i in range(counts[k])]
        out += [group[q] for q in np.random.default_rng([seed, epoch, 2, j]).permutation(len(group))]
    return out


@pytest.mark.parametrize("width", [2, 5, 13, 40])
def test_mixed_sample_order_is_the_documented_function(data: Path, width: int) -> None:
    counts = [s.samples for s in Manifest.load(data).shards("train")]  # 13 shards: 5 leaves a smaller last group
    order = SampleOrder(counts, seed=5, shuffle_shards=width)
    n = sum(counts)
    for epoch in (0, 1):
        assert [order.locate(epoch * n + p) for p in range(n)] == _mixed_sequence(counts, 5, epoch, width)
    assert sorted(order.locate(g) for g in range(n)) == [(k, i) for k, c in enumerate(counts) for i in range(c)]


def test_mixing_spreads_every_batch_over_the_group_and_streams_the_documented_rows(data: Path) -> None:
    shards = _shard_rows(data, "train")
    counts = [len(x) for x in shards]
    micro, steps, width = 8, 6, 4
    one = _take(TrainStream(data, rank=0, world=1, micro_batch_size=micro, seed=7), steps)
    mixed = _take(TrainStream(data, rank=0, world=1, micro_batch_size=micro, seed=7, shuffle_shards=width,
                              num_workers=2), steps)
    sequence = _mixed_sequence(counts, 7, 0, width)
    expected = np.stack([shards[k][i] for k, i in sequence[:micro * steps]]).astype(np.int64)
    np.testing.assert_array_equal(torch.cat(mixed).numpy(), expected)

    def shards_per_batch(locate: Callable[[int], tuple[int, int]]) -> list[int]:
        return [len({locate(b * micro + r)[0] for r in range(micro)}) for b in range(steps)]

    assert max(shards_per_batch(SampleOrder(counts, seed=7).locate)) <= 2  # one shard at a time (or its boundary)
    assert min(shards_per_batch(sequence.__getitem__)) >= 3  # mixed: every batch draws on several of the 4 shards
    assert len(one) == steps and not np.array_equal(torch.cat(one).numpy(), expected)


def test_a_checkpoint_from_before_mixing_continues_only_one_shard_at_a_time() -> None:
    from peer_dist.data.order import check_sample_order
    from peer_dist.errors import CheckpointError

    check_sample_order({"step": 3}, 1, "run folder r", "step_000003")  # no key: written reading one shard at a time
    check_sample_order({"shuffle_shards": 16}, 16, "run folder r", "step_000003")
    with pytest.raises(CheckpointError, match="trained with data.shuffle_shards=1, this run has data.shuffle_shards=16"):
        check_sample_order({"step": 3}, 16, "run folder r", "step_000003")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_of_a_step_make_exactly_the_global_batch(data: Path, world: int) -> None:
    micro, accum, steps = 3, 2, 3
    per_rank = [_take(TrainStream(data, rank=r, world=world, micro_batch_size=micro, grad_accum=accum, seed=7),
                      steps * accum) for r in range(world)]
    global_batch = world * micro * accum
    for step in range(steps):
        ids = [micro_batch_sample_ids(step, m, rank=r, world=world, micro_batch_size=micro, grad_accum=accum)
               for m in range(accum) for r in range(world)]
        flat = [g for part in ids for g in part]
        assert len(set(flat)) == len(flat) == global_batch  # disjoint across ranks and micro-steps
        assert sorted(flat) == step_sample_ids(step, global_batch)
        got = torch.cat([per_rank[r][step * accum + m] for m in range(accum) for r in range(world)])
        assert got.dtype == torch.int64 and got.shape == (global_batch, SEQ_LEN + 1)
        np.testing.assert_array_equal(got.numpy(), _expected_rows(data, 7, flat))


def test_an_epoch_visits_every_train_sample_once(data: Path) -> None:
    rows = np.concatenate(_shard_rows(data, "train"))
    n = len(rows)
    micro = 8
    batches = _take(TrainStream(data, rank=0, world=1, micro_batch_size=micro), -(-n // micro))
    seen = torch.cat(batches)[:n].numpy()
    assert Counter(map(_key, seen)) == Counter(map(_key, rows))
    assert not np.array_equal(seen, rows)  # ... and shuffled


def test_global_batches_do_not_depend_on_world_size(data: Path) -> None:
    def global_batches(world: int, micro: int, accum: int, steps: int = 5) -> list[Counter]:
        streams = [_take(TrainStream(data, rank=r, world=world, micro_batch_size=micro, grad_accum=accum, seed=1),
                         steps * accum) for r in range(world)]
        return [Counter(_key(row) for r in range(world) for m in range(accum)
                        for row in streams[r][s * accum + m]) for s in range(steps)]

    reference = global_batches(2, 4, 1)
    assert global_batches(4, 2, 1) == reference
    assert global_batches(1, 4, 2) == reference


def test_start_step_resumes_exactly(data: Path) -> None:
    accum = 2
    kwargs = dict(rank=1, world=2, micro_batch_size=4, grad_accum=accum, seed=3)  # G = 16: 19.25 steps per epoch
    full = _take(TrainStream(data, **kwargs), 26 * accum)
    for start in (1, 18):  # from 18, the stream crosses into the second epoch (sample 308)
        stream = TrainStream(data, start_step=start, **kwargs)
        assert stream.consumed_samples == start * 16
        resumed = _take(stream, (26 - start) * accum)
        for a, b in zip(resumed, full[start * accum:], strict=True):
            assert torch.equal(a, b)
        assert stream.consumed_samples == 26 * 16 == stream.state_dict()["consumed_samples"]


def test_workers_give_the_same_sequence(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(rank=1, world=2, micro_batch_size=3, grad_accum=2, seed=4, start_step=2)
    reference = _take(TrainStream(data, **kwargs), 12)
    # A launcher environment that disagrees must not matter: rank/world travel in the dataset object.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with_workers = _take(TrainStream(data, num_workers=2, **kwargs), 12)
    for a, b in zip(with_workers, reference, strict=True):
        assert torch.equal(a, b)


def test_seed_decides_the_order(data: Path) -> None:
    def first(seed: int) -> torch.Tensor:
        return torch.cat(_take(TrainStream(data, rank=0, world=1, micro_batch_size=8, seed=seed), 3))

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))


def _damage(src: Path, dst: Path, how: str) -> str:
    """Copy the data and damage the first shard of epoch 0 (seed 0); return its file name."""
    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    info = m.shards("train")[int(SampleOrder([s.samples for s in m.shards("train")], 0).shard_order(0)[0])]
    path = dst / info.file
    data = bytearray(path.read_bytes())
    if how == "truncated":  # on a 512-byte tar block boundary, a few samples short
        path.write_bytes(data[: 512 * 12])
    elif how == "corrupted":  # one token byte of the first sample (tar header 512 + npy header 128)
        data[512 + 128 + 4] ^= 0x01
        path.write_bytes(data)
    else:
        path.unlink()
    return info.file


@pytest.mark.parametrize("how", ["truncated", "corrupted", "missing"])
def test_bad_shard_policy(data: Path, tmp_path: Path, how: str) -> None:
    bad_dir = tmp_path / "data"
    name = _damage(data, bad_dir, how)
    workers = 2 if how == "missing" else 0  # the message also comes back clean from a worker process
    with pytest.raises(DataError, match=rf"^train shard .*{name} .*bad_shard=skip[^\n]*$"):
        next(iter(TrainStream(bad_dir, rank=0, world=1, micro_batch_size=4, num_workers=workers)))
    # skip: a full epoch never shows the bad shard's samples; they are counted.
    m = Manifest.load(data)
    order = SampleOrder([s.samples for s in m.shards("train")], 0)
    bad_index = [s.file for s in m.shards("train")].index(name)
    bad_rows = set(map(_key, _shard_rows(data, "train")[bad_index]))
    good_rows = set(map(_key, np.concatenate(_shard_rows(data, "train")))) - bad_rows
    n, micro = order.epoch_size, 4
    stream = TrainStream(bad_dir, rank=0, world=1, micro_batch_size=micro, bad_shard="skip")
    seen = [_key(row) for batch in _take(stream, -(-n // micro)) for row in batch]
    assert set(seen) <= good_rows
    slots = sum(order.locate(g)[0] == bad_index for g in range(len(seen)))
    assert stream.stats == {"skipped_shards": 1, "skipped_samples": slots} and slots > 0


def test_truncation_is_caught_without_checksums(data: Path, tmp_path: Path) -> None:
    """The webdataset pitfall: a tar cut on a 512-byte boundary parses cleanly with fewer samples."""
    from webdataset import tariterators

    name = _damage(data, tmp_path / "data", "truncated")
    raw = (tmp_path / "data" / name).read_bytes()
    samples = list(tariterators.group_by_keys(tariterators.tar_file_expander([{"url": name,
                                                                                "stream": io.BytesIO(raw)}])))
    assert 0 < len(samples) < 24  # no error from webdataset itself
    with pytest.raises(DataError, match=rf"{name} holds {len(samples)} samples, the manifest says 24"):
        next(iter(TrainStream(tmp_path / "data", rank=0, world=1, micro_batch_size=4, verify=False)))


def test_argument_errors(data: Path) -> None:
    with pytest.raises(DataError, match="bad_shard='ignore'.*allowed: error, skip"):
        TrainStream(data, rank=0, world=1, micro_batch_size=4, bad_shard="ignore")
    with pytest.raises(DataError, match="rank=2, world=2"):
        TrainStream(data, rank=2, world=2, micro_batch_size=4)
    with pytest.raises(DataError, match="manifest.json is missing"):
        TrainStream(data.parent / "nowhere", rank=0, world=1, micro_batch_size=4)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_batches_are_disjoint_and_even(data: Path, world: int) -> None:
    val = np.concatenate(_shard_rows(data, "val")).astype(np.int64)
    size = 4
    count = len(val) // (world * size)
    per_rank = [list(val_batches(data, rank=r, world=world, batch_size=size)) for r in range(world)]
    assert [len(b) for b in per_rank] == [count] * world
    # Batch b of rank r = samples [(b * world + r) * size, + size): the union is a prefix, nothing repeats.
    interleaved = torch.cat([per_rank[r][b] for b in range(count) for r in range(world)])
    np.testing.assert_array_equal(interleaved.numpy(), val[: count * world * size])
    capped = list(val_batches(data, rank=world - 1, world=world, batch_size=size, max_batches=2))
    assert len(capped) == 2 and all(torch.equal(a, b) for a, b in zip(capped, per_rank[-1]))


def test_val_batches_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than one batch per rank"):
        val_batches(data, rank=0, world=2, batch_size=1000)
    shutil.copytree(data, tmp_path / "data")
    shard = tmp_path / "data" / "val-000000-000000.tar"
    shard.write_bytes(shard.read_bytes()[:2048])
    with pytest.raises(DataError, match="val shard .*val-000000-000000.tar"):
        list(val_batches(tmp_path / "data", rank=0, world=1, batch_size=4))
    text = tmp_path / "one.txt"
    text.write_text("some text " * 50)
    prepare([str(text)], tmp_path / "noval", seq_len=SEQ_LEN, val_fraction=0.0)
    with pytest.raises(DataError, match="no validation split"):
        val_batches(tmp_path / "noval", rank=0, world=1, batch_size=4)


def test_pipe_location_reads_the_same_samples(data: Path) -> None:
    """A webdataset ``pipe:`` location (here `cat`, in practice curl or a cloud CLI) streams the same data."""
    remote = f"pipe:cat {data}/{{file}}"
    assert Manifest.load(remote).fingerprint == Manifest.load(data).fingerprint
    kwargs = dict(rank=0, world=1, micro_batch_size=5, seed=2)
    for a, b in zip(_take(TrainStream(remote, **kwargs), 6), _take(TrainStream(data, **kwargs), 6), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(val_batches(remote, rank=0, world=1, batch_size=4),
                                                 val_batches(data, rank=0, world=1, batch_size=4), strict=True))
    with pytest.raises(DataError, match=r"\{file\} placeholder"):
        Manifest.load(f"pipe:cat {data}/manifest.json")
    with pytest.raises(DataError, match=r"nowhere/manifest.json could not be read .*exit 1"):
        Manifest.load(f"pipe:cat {data}/nowhere/{{file}}")
