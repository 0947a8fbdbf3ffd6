"""Remote shards: reads over a real HTTP server on 127.0.0.1 that drops connections, and flaky pipe: commands.

The reference for every remote stream is the same stream read from the local folder
(for a shard given up on under ``skip``: the local folder with that shard deleted).
"""

from __future__ import annotations

import errno
import itertools
import random
import shutil
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import peer_dist.data.manifest as manifest_module
from peer_dist.data import Manifest, SampleOrder, TrainStream, prepare, val_batches
from peer_dist.errors import DataError

pytestmark = pytest.mark.timeout(120)

SEQ_LEN = 16
MICRO = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``data/``: 308 train samples in 13 shards of 24 (the last 20), 44 val samples in 2."""
    root = tmp_path_factory.mktemp("remote")
    rng = random.Random(0)
    (root / "text").mkdir()
    for i in range(40):
        words = " ".join(rng.choice(["ab", "cde", "fg", "hij", "k", "lmno", "pq", "rstu"]) for _ in range(35))
        (root / "text" / f"{i:02d}.txt").write_text(f"{i}: {words} {rng.random()}\n")
    prepare([str(root / "text")], root / "data", seq_len=SEQ_LEN, samples_per_shard=24, val_fraction=0.12, seed=0)
    return root


class _DroppingServer(ThreadingHTTPServer):
    """Serves ``root``; the first ``drops[path]`` GETs of ``path`` send part of the body, then close.

    ``mode="drop"`` announces the full Content-Length (the client sees a connection closed
    mid-body); ``mode="short"`` sends no Content-Length, so the cut body looks complete
    to HTTP and only the manifest's size check can tell.
    """

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.mode = "drop"
        self.drops: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _DroppingServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        with srv.lock:
            srv.requests[self.path] += 1
            drop = srv.drops.get(self.path, 0) > 0
            if drop:
                srv.drops[self.path] -= 1
        file = (srv.root / self.path.lstrip("/")).resolve()
        if not file.is_file() or srv.root.resolve() not in file.parents:
            self.send_error(404)
            return
        body = file.read_bytes()
        self.send_response(200)
        if not (drop and srv.mode == "short"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:  # part of the body, then the connection is closed
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(served: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_DroppingServer]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # curl must talk to the test server directly
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    srv = _DroppingServer(served)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _take(stream: TrainStream, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(stream), n))


def _first_shard(data: Path, seed: int = 0) -> str:
    """File name of the first train shard of epoch 0: the first micro-batch reads it."""
    shards = Manifest.load(data).shards("train")
    return shards[int(SampleOrder([s.samples for s in shards], seed).shard_order(0)[0])].file


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["drop", "short"])
@pytest.mark.parametrize("workers", [0, 2])
def test_dropped_reads_are_retried_and_counted(server: _DroppingServer, served: Path, mode: str, workers: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """(a) Two dropped reads of a shard with read_retries=3: the same batches as the local folder, 2 retries."""
    name = _first_shard(served / "data")
    server.mode = mode
    server.drops[f"/data/{name}"] = 2
    waits: list[float] = []
    if workers == 0:  # the backoff schedule, recorded instead of slept (in-process only)
        monkeypatch.setattr(manifest_module.time, "sleep", waits.append)
    kwargs = dict(rank=0, world=1, micro_batch_size=MICRO, seed=0, num_workers=workers)
    stream = TrainStream(f"{server.url}/data", read_retries=3, retry_wait_s=0.25, **kwargs)
    remote = _take(stream, 10)
    local = _take(TrainStream(served / "data", **kwargs), 10)
    assert _same(remote, local)
    assert stream.read_stats == {"read_retries": 2, "failed_reads": 0}
    assert stream.stats == {"skipped_shards": 0, "skipped_samples": 0}
    # Every loader process reads the shard once it succeeds: 2 dropped GETs + 1 per process.
    assert server.requests[f"/data/{name}"] == 2 + max(workers, 1)
    if workers == 0:
        assert waits == [0.25, 0.5]  # retry_wait_s, then doubled


@pytest.mark.parametrize("workers", [0, 2])
def test_retries_exhausted_is_one_clear_error(server: _DroppingServer, served: Path, workers: int) -> None:
    """(b) More drops than retries under bad_shard=error: one DataError naming the URL, the attempts, the cause."""
    name = _first_shard(served / "data")
    server.drops[f"/data/{name}"] = 100
    url = f"{server.url}/data"
    stream = TrainStream(url, rank=0, world=1, micro_batch_size=MICRO, num_workers=workers, read_retries=3,
                         retry_wait_s=0.01)
    with pytest.raises(DataError) as info:
        next(iter(stream))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"train shard {url}/{name} could not be read (curl: (18) transfer closed with ")
    assert ", failed 4 attempts (retried 3 times, data.read_retries=3); stopping (data.bad_shard=error)" in message
    assert stream.read_stats == {"read_retries": 3, "failed_reads": 1}  # the failing process's counts
    if workers == 0:
        assert server.requests[f"/data/{name}"] == 4


def test_retries_exhausted_under_skip(server: _DroppingServer, served: Path, tmp_path: Path) -> None:
    """(c) bad_shard=skip: the shard is skipped and refilled exactly as a missing local shard is."""
    data = served / "data"
    name = _first_shard(data)
    server.drops[f"/data/{name}"] = 100
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / name).unlink()
    shards = Manifest.load(data).shards("train")
    order = SampleOrder([s.samples for s in shards], 0)
    steps = -(-order.epoch_size // MICRO)  # one epoch
    kwargs = dict(rank=0, world=1, micro_batch_size=MICRO, bad_shard="skip")
    stream = TrainStream(f"{server.url}/data", read_retries=2, retry_wait_s=0.01, **kwargs)
    remote = _take(stream, steps)
    reference = TrainStream(tmp_path / "data", **kwargs)
    assert _same(remote, _take(reference, steps))
    assert all(b.shape == (MICRO, SEQ_LEN + 1) for b in remote)
    bad_index = [s.file for s in shards].index(name)
    slots = sum(order.locate(g)[0] == bad_index for g in range(steps * MICRO))
    assert slots == shards[bad_index].samples  # every sample slot of the shard was refilled once
    assert stream.stats == reference.stats == {"skipped_shards": 1, "skipped_samples": slots}
    assert stream.read_stats == {"read_retries": 2, "failed_reads": 1}
    assert reference.read_stats == {"read_retries": 0, "failed_reads": 1}  # a missing local file is not retried
    assert server.requests[f"/data/{name}"] == 3


def test_manifest_and_validation_over_http(server: _DroppingServer, served: Path) -> None:
    """(d) data.path is a URL: the manifest (dropped once) and the validation shards are read over http too."""
    url = f"{server.url}/data"
    server.drops["/data/manifest.json"] = 1
    server.drops["/data/val-000000-000000.tar"] = 2
    stream = TrainStream(url, rank=1, world=2, micro_batch_size=MICRO, grad_accum=2, seed=3, read_retries=3,
                         retry_wait_s=0.01)
    assert stream.read_stats == {"read_retries": 1, "failed_reads": 0}  # the manifest's retry
    assert stream.manifest.fingerprint == Manifest.load(served / "data").fingerprint
    reference = TrainStream(served / "data", rank=1, world=2, micro_batch_size=MICRO, grad_accum=2, seed=3)
    assert _same(_take(stream, 6), _take(reference, 6))
    remote_val = list(val_batches(url, rank=0, world=1, batch_size=4, read_retries=3, retry_wait_s=0.01))
    assert _same(remote_val, list(val_batches(served / "data", rank=0, world=1, batch_size=4)))
    assert server.requests["/data/val-000000-000000.tar"] == 3
    # A missing manifest (HTTP 404) is not retried and says what to do.
    with pytest.raises(DataError, match=r"nowhere/manifest.json: manifest.json is missing; prepare the data"):
        Manifest.load(f"{server.url}/nowhere", read_retries=3, retry_wait_s=0.01)
    assert server.requests["/nowhere/manifest.json"] == 1
    # A validation shard that never arrives is an error naming it and the retries.
    server.drops["/data/val-000000-000000.tar"] = 100
    with pytest.raises(DataError, match=rf"^val shard {url}/val-000000-000000.tar could not be read .*failed 2 attempts "
                                        r"\(retried once, data.read_retries=1\); re-run prepare"):
        list(val_batches(url, rank=0, world=1, batch_size=4, read_retries=1, retry_wait_s=0.01))


_FLAKY = """#!/bin/sh
# flaky.sh COUNTS FAILS PATH: cat PATH, but fail the first FAILS times for each file.
count="$1/$(basename "$3").count"
n=$(cat "$count" 2>/dev/null || echo 0)
echo $((n + 1)) > "$count"
if [ "$n" -lt "$2" ]; then echo "flaky: simulated failure $((n + 1))" >&2; exit 7; fi
exec cat "$3"
"""


def _flaky(tmp_path: Path, data: Path, fails: int) -> str:
    script = tmp_path / "flaky.sh"
    script.write_text(_FLAKY)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "counts").mkdir()
    return f"pipe:{script} {tmp_path / 'counts'} {fails} {data}/{{file}}"


def test_flaky_pipe_command_is_retried(served: Path, tmp_path: Path) -> None:
    """(e) A pipe: command that fails the first time for every file: each read is retried once."""
    data = served / "data"
    location = _flaky(tmp_path, data, fails=1)
    kwargs = dict(rank=0, world=1, micro_batch_size=5, seed=2)
    stream = TrainStream(location, read_retries=1, retry_wait_s=0.01, **kwargs)
    assert _same(_take(stream, 6), _take(TrainStream(data, **kwargs), 6))
    shards = Manifest.load(data).shards("train")
    order = SampleOrder([s.samples for s in shards], 2)
    read = {shards[order.locate(g)[0]].file for g in range(30)}
    assert stream.read_stats == {"read_retries": 1 + len(read), "failed_reads": 0}  # manifest + shards
    counts = {p.name.removesuffix(".count"): int(p.read_text()) for p in (tmp_path / "counts").iterdir()}
    assert counts == {"manifest.json": 2, **{name: 2 for name in read}}


def test_pipe_command_failing_every_time(served: Path, tmp_path: Path) -> None:
    location = _flaky(tmp_path, served / "data", fails=100)
    with pytest.raises(DataError, match=r"manifest.json could not be read \(command exit 7: flaky: simulated "
                                        r"failure 3\), failed 3 attempts \(retried 2 times, data.read_retries=2\)$"):
        TrainStream(location, rank=0, world=1, micro_batch_size=4, read_retries=2, retry_wait_s=0.01)


def test_local_reads_retry_only_transient_errors(served: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Local files: an EIO (a network file system hiccup) is retried; a truncated file is not."""
    data = served / "data"
    name = _first_shard(data)
    real_read = manifest_module._read_local
    failed: list[str] = []

    def read_once_eio(path: str) -> bytes:
        if path.endswith(name) and not failed:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error", path)
        return real_read(path)

    monkeypatch.setattr(manifest_module, "_read_local", read_once_eio)
    kwargs = dict(rank=0, world=1, micro_batch_size=MICRO, bad_shard="skip")
    stream = TrainStream(data, read_retries=3, retry_wait_s=0.01, **kwargs)
    batches = _take(stream, 3)
    monkeypatch.setattr(manifest_module, "_read_local", real_read)
    assert _same(batches, _take(TrainStream(data, **kwargs), 3))
    assert failed and stream.read_stats == {"read_retries": 1, "failed_reads": 0}
    shutil.copytree(data, tmp_path / "data")
    shard = tmp_path / "data" / name
    shard.write_bytes(shard.read_bytes()[: 512 * 12])
    truncated = TrainStream(tmp_path / "data", read_retries=3, retry_wait_s=0.01, **kwargs)
    _take(truncated, 3)
    assert truncated.read_stats == {"read_retries": 0, "failed_reads": 1}
    assert truncated.stats["skipped_shards"] == 1


def test_retry_arguments_are_checked(served: Path) -> None:
    with pytest.raises(DataError, match=r"data.read_retries=-1, data.retry_wait_s=0.5: both must be >= 0"):
        TrainStream(served / "data", rank=0, world=1, micro_batch_size=4, read_retries=-1)
    with pytest.raises(DataError, match=r"data.retry_wait_s=-1"):
        val_batches(served / "data", rank=0, world=1, batch_size=4, retry_wait_s=-1)
