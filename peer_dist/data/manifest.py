"""The manifest of a prepared data folder, and where its files live.

``manifest.json`` records the format version, sequence length, token dtype, the
tokenizer, the corpus and split description, and per split the shards with
sample count, byte size and sha256. Its ``fingerprint`` is the sha256 of the rest
of the manifest (canonical JSON: sorted keys, no spaces), so an edited manifest
is detected and a checkpoint can name the exact data it was trained on.

A data location is a local folder, an ``http(s)://`` base URL (read with curl
through webdataset's ``gopen``) or a ``pipe:`` command with a ``{file}``
placeholder, e.g. ``pipe:aws s3 cp s3://bucket/data/{file} -``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer_dist.errors import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
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


def read_bytes(location: str) -> bytes:
    """Whole file at a local path or webdataset URL (pipe:, http(s) via curl)."""
    if not is_remote(location):
        return Path(location).read_bytes()
    from webdataset.gopen import gopen

    with gopen(location, "rb") as stream:
        return stream.read()


class Manifest:
    """A loaded, fingerprint-checked ``manifest.json``; ``info`` is its full content."""

    def __init__(self, info: dict[str, Any], root: str | Path) -> None:
        self.info = info
        self.root = str(root)

    @classmethod
    def create(cls, body: dict[str, Any], root: str | Path) -> Manifest:
        return cls(dict(body, fingerprint=fingerprint_of(body)), root)

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        location = file_location(root, MANIFEST_FILE)
        try:
            raw: bytes | None = read_bytes(location)
        except (FileNotFoundError, NotADirectoryError):
            raw = None
        except OSError as exc:
            raise DataError(f"{location} could not be read ({exc})") from None
        if raw is None or (not raw and is_remote(location)):  # a failed remote read comes back empty
            raise DataError(f"{location}: manifest.json is missing; prepare the data first "
                            f"(peer-dist prepare --output {root}) or fix data.path")
        try:
            info = json.loads(raw)
        except ValueError:
            raise DataError(f"{location} is not a readable JSON manifest; re-run `peer-dist prepare`") from None
        version = info.get("version") if isinstance(info, dict) else None
        if version != MANIFEST_VERSION:
            raise DataError(f"{location} has format version {version}; this peer_dist reads version "
                            f"{MANIFEST_VERSION}: re-run `peer-dist prepare`")
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

    def shards(self, split: str) -> list[ShardInfo]:
        return [ShardInfo(**s) for s in self.info["splits"][split]["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.info["splits"][split]["samples"])

    def location(self, name: str) -> str:
        return file_location(self.root, name)

    def summary(self) -> str:
        t, v = self.info["splits"]["train"], self.info["splits"]["val"]
        return (f"{t['samples']} train samples in {len(t['shards'])} shards, {v['samples']} validation samples "
                f"in {len(v['shards'])} shards, {self.seq_len} tokens each (+1 target), tokenizer "
                f"{self.tokenizer} (vocab {self.vocab_size}), fingerprint {self.fingerprint[:16]}")
