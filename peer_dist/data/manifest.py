"""The manifest of a prepared data folder, and where its files live.

``manifest.json`` records the format version, sequence length, token dtype, the
tokenizer, the corpus and split description, and per split the shards with
sample count, byte size and sha256. Its ``fingerprint`` is the sha256 of the rest
of the manifest (canonical JSON: sorted keys, no spaces), so an edited manifest
is detected and a checkpoint can name the exact data it was trained on.

A data location is a local folder, an ``http(s)://`` base URL (read with curl)
or a ``pipe:`` command with a ``{file}`` placeholder, e.g.
``pipe:aws s3 cp s3://bucket/data/{file} -``; other webdataset URL schemes go
through webdataset's ``gopen``.

Reads and retries (``read_retrying``): a remote read is retried ``retries`` times,
waiting ``wait_s``, then twice as long before each further retry, when the read
fails (a dropped connection, curl or the pipe command exiting non-zero) or when
what it returned fails the caller's check (short, corrupted, not a tar or not
JSON). Not retried: a missing file (HTTP 404/410), HTTP 401/403 and other 4xx
except 408/429, and curl not installed. A local file is retried only for an
OSError a network file system can return transiently (EIO, ESTALE, EAGAIN,
EINTR, ETIMEDOUT): a truncated or corrupted local file does not heal by reading
it again.

Why not webdataset's ``gopen`` for http: it runs ``curl --retry 30 --retry-delay 2``,
hidden retries that can stall a read for minutes and that nobody counts; here
curl runs with ``--fail --show-error`` and no retries of its own, so a connection
closed mid-body is curl exit 18 ("transfer closed with N bytes remaining"), an
HTTP error is exit 22, and the size/sha256 check against the manifest is the
backstop for a body that ends early without an error (no Content-Length).
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from peer_dist.errors import DataError
from peer_dist.log import get_logger

T = TypeVar("T")

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2  # 2: per-chunk shards, hash split, corpus counts of JSONL/Parquet inputs
READABLE_VERSIONS = (1, 2)  # the shard and split entries the loader reads are the same in both
SPLITS = ("train", "val", "tune")  # tune: only in data prepared with --tune-fraction
SAMPLE_EXT = "tokens.npy"  # WebDataset member suffix: <key>.tokens.npy


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


def fingerprint_of(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def is_remote(root: str) -> bool:
    return root.startswith("pipe:") or "://" in root


def file_location(root: str | Path, name: str) -> str:
    """Path or webdataset URL of file ``name`` of the data at ``root``."""
    root = str(root)
    if root.startswith("pipe:"):
        if "{file}" not in root:
            raise DataError(f"data location {root!r}: a pipe: location needs a {{file}} placeholder, "
                            "e.g. pipe:curl -sf https://host/data/{file}")
        return root.replace("{file}", name)
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


# ---------------------------------------------------------------------------- reads and retries

# curl with no retries of its own (we retry, count and log); a stalled transfer (under
# 1 byte/s for 60 s) is an error too, exit 28, instead of a hang.
_CURL = ("curl", "--fail", "--silent", "--show-error", "--location", "--globoff", "--connect-timeout", "30",
         "--speed-limit", "1", "--speed-time", "60")
_CURL_SCHEMES = ("http://", "https://", "ftps://", "sftp://", "scp://")  # what webdataset reads with curl
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT})


class PermanentReadError(OSError):
    """A remote read failure that a retry will not fix (HTTP 401/403, curl not installed)."""


class ReadFailed(Exception):
    """A read that failed every attempt it was given; ``error`` is the last attempt's exception."""

    def __init__(self, location: str, attempts: int, retries: int, error: Exception) -> None:
        super().__init__(f"{location}: {error}")
        self.location, self.attempts, self.retries, self.error = location, attempts, retries, error

    @property
    def after(self) -> str:
        """Text to append to the error's description: empty after a single attempt."""
        if self.attempts == 1:
            return ""
        times = "once" if self.attempts == 2 else f"{self.attempts - 1} times"
        return f", failed {self.attempts} attempts (retried {times}, data.read_retries={self.retries})"


@dataclass
class ReadStats:
    """Read accounting: ``retries`` attempts repeated after a failed one, ``failed`` reads given up on."""

    retries: int = 0
    failed: int = 0

    def add(self, other: ReadStats) -> None:
        self.retries += other.retries
        self.failed += other.failed

    def take(self) -> ReadStats:
        """The counts so far, resetting them (a worker hands its counts back with each batch)."""
        out = ReadStats(self.retries, self.failed)
        self.retries = self.failed = 0
        return out


def read_bytes(location: str) -> bytes:
    """Whole file at a local path or a URL (http(s) via curl, pipe:, other webdataset schemes); one attempt."""
    if not is_remote(location):
        return _read_local(location)
    if location.startswith("pipe:"):
        return _run(location[len("pipe:"):], shell=True)
    if location.startswith(_CURL_SCHEMES):
        return _run([*_CURL, "--url", location], shell=False)
    from webdataset.gopen import gopen

    with gopen(location, "rb") as stream:
        return stream.read()


def _read_local(path: str) -> bytes:
    return Path(path).read_bytes()


def _run(command: str | list[str], shell: bool) -> bytes:
    """stdout of ``command``; a non-zero exit raises OSError with the end of its stderr."""
    try:
        done = subprocess.run(command, shell=shell, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except OSError as exc:  # the program itself is missing: no retry installs it
        raise PermanentReadError(f"{command[0] if isinstance(command, list) else 'sh'} could not be started "
                                 f"({exc.strerror})") from None
    if done.returncode == 0:
        return done.stdout
    detail = " ".join(done.stderr.decode(errors="replace").split())[-300:]
    status = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    if shell:
        raise OSError(f"command {status}: {detail}" if detail else f"command {status}")
    message = detail or f"curl {status}"  # curl's own line names its exit code: "curl: (18) transfer closed ..."
    http = re.search(r"returned error: (\d{3})", detail) if done.returncode == 22 else None
    code = int(http.group(1)) if http else 0
    if code in (404, 410):
        raise FileNotFoundError(message)
    if 400 <= code < 500 and code not in (408, 429):
        raise PermanentReadError(message)
    raise OSError(message)


def _retryable(location: str, exc: Exception) -> bool:
    if not is_remote(location):
        return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS
    return not isinstance(exc, (FileNotFoundError, PermissionError, PermanentReadError))


def read_retrying(location: str, check: Callable[[bytes], T], retries: int = 0, wait_s: float = 0.5,
                  stats: ReadStats | None = None) -> T:
    """``check(read_bytes(location))``, retrying a failed attempt (see the module docstring for which).

    Waits ``wait_s * 2**i`` seconds before retry ``i`` (0-based). Raises :class:`ReadFailed`
    with the last error once an attempt fails that is not retried or no retry is left.
    ``stats`` counts the retries made and a read given up on.
    """
    stats = stats if stats is not None else ReadStats()
    attempt = 1
    while True:
        try:
            return check(read_bytes(location))
        except Exception as exc:  # any failure of the read or of the check is judged by _retryable
            if attempt > retries or not _retryable(location, exc):
                stats.failed += 1
                raise ReadFailed(location, attempt, retries, exc) from exc
            wait = wait_s * 2 ** (attempt - 1)
            get_logger().warning("read of %s failed (attempt %d of %d: %s); retrying in %.3g s", location,
                                 attempt, retries + 1, " ".join(str(exc).split())[:300], wait)
            stats.retries += 1
            attempt += 1
            time.sleep(wait)


class _EmptyRead(ValueError):
    """A remote read that returned nothing (a pipe command that printed nothing)."""


def _parse_json(raw: bytes) -> Any:
    if not raw:
        raise _EmptyRead("it is empty")
    return json.loads(raw)


class Manifest:
    """A loaded, fingerprint-checked ``manifest.json``; ``info`` is its full content."""

    def __init__(self, info: dict[str, Any], root: str | Path) -> None:
        self.info = info
        self.root = str(root)

    @classmethod
    def create(cls, body: dict[str, Any], root: str | Path) -> Manifest:
        return cls(dict(body, fingerprint=fingerprint_of(body)), root)

    @classmethod
    def load(cls, root: str | Path, read_retries: int = 0, retry_wait_s: float = 0.5,
             stats: ReadStats | None = None) -> Manifest:
        """Read and check ``manifest.json`` at ``root``; a failed remote read (or bad JSON) is retried.

        ``read_retries`` defaults to 0 here (one attempt); TrainStream and val_batches pass theirs.
        """
        location = file_location(root, MANIFEST_FILE)
        try:
            info = read_retrying(location, _parse_json, read_retries, retry_wait_s, stats)
        except ReadFailed as failed:
            exc = failed.error
            if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or (
                    isinstance(exc, _EmptyRead) and is_remote(location)):
                raise DataError(f"{location}: manifest.json is missing{failed.after}; prepare the data first "
                                f"(peer-dist prepare --output {root}) or fix data.path") from None
            if isinstance(exc, ValueError):
                raise DataError(f"{location} is not a readable JSON manifest{failed.after}; "
                                "re-run `peer-dist prepare`") from None
            raise DataError(f"{location} could not be read ({' '.join(str(exc).split())[:300]})"
                            f"{failed.after}") from None
        version = info.get("version") if isinstance(info, dict) else None
        if version not in READABLE_VERSIONS:
            raise DataError(f"{location} has format version {version}; this peer_dist reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}: re-run `peer-dist prepare`")
        body = {k: v for k, v in info.items() if k != "fingerprint"}
        if info.get("fingerprint") != fingerprint_of(body):
            raise DataError(f"{location} was modified after prepare (its fingerprint does not match its "
                            "content); re-run `peer-dist prepare` instead of editing it")
        return cls(info, root)

    # ---- fields ----------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def seq_len(self) -> int:
        return int(self.info["seq_len"])

    @property
    def sample_len(self) -> int:
        """Tokens per stored sample: seq_len inputs + 1 for the shifted target."""
        return self.seq_len + 1

    @property
    def dtype(self) -> str:
        return self.info["dtype"]

    @property
    def tokenizer(self) -> str:
        return self.info["tokenizer"]["name"]

    @property
    def vocab_size(self) -> int:
        return int(self.info["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.info["tokenizer"]["eot_id"])

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this data has, in SPLITS order (train, val, and tune when prepared with one)."""
        return tuple(s for s in SPLITS if s in self.info["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.info["splits"]:
            extra = " (prepare with --tune-fraction F to write one)" if split == "tune" else ""
            raise DataError(f"data at {self.root} has no {split!r} split{extra}; it has: {', '.join(self.splits)}")
        return self.info["splits"][split]

    def shards(self, split: str) -> list[ShardInfo]:
        return [ShardInfo(**s) for s in self._split(split)["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def location(self, name: str) -> str:
        return file_location(self.root, name)

    def summary(self) -> str:
        t, v = self.info["splits"]["train"], self.info["splits"]["val"]
        tune = self.info["splits"].get("tune")
        tuning = f", {tune['samples']} tuning samples in {len(tune['shards'])} shards" if tune else ""
        return (f"{t['samples']} train samples in {len(t['shards'])} shards, {v['samples']} validation samples "
                f"in {len(v['shards'])} shards{tuning}, {self.seq_len} tokens each (+1 target), tokenizer "
                f"{self.tokenizer} (vocab {self.vocab_size}), fingerprint {self.fingerprint[:16]}")
