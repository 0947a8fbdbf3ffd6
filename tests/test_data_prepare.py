"""`prepare`: tokenizers, shards and manifest, checked against independent re-reads of the files."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from peer_dist.data import ByteTokenizer, Manifest, load_tokenizer, prepare
from peer_dist.data.corpus import default_corpus_files
from peer_dist.data.tokenizers import EOT_TEXT
from peer_dist.errors import DataError

EOT = 256  # byte tokenizer


def _write_corpus(root: Path, n_docs: int = 30, seed: int = 0) -> list[str]:
    """n_docs distinctive small documents in nested folders (+ one binary file that must be skipped)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "ε", "zeta", "日本", "theta", "\t", "\n", "  ", "x=1;"]
    docs = []
    for i in range(n_docs):
        text = f"doc {i:02d}: " + " ".join(rng.choice(words) for _ in range(rng.randint(10, 60))) + "\n"
        path = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        docs.append(text)
    (root / "part0" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    # Sorted by path, as prepare reads them: part0/doc00, part0/doc03, ..., part1/doc01, ...
    return [d for _, d in sorted((f"part{i % 3}/doc{i:02d}.txt", d) for i, d in enumerate(docs))]


def _read_split(data_dir: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    """Samples of a split in shard order, read with plain tarfile + numpy (not our reader)."""
    rows, keys = [], []
    for shard in sorted(data_dir.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                keys.append(member.name)
                rows.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    return rows, keys


def _docs_of(tokens: np.ndarray) -> tuple[list[str], str]:
    """Split a byte-token stream at EOT: (complete documents, trailing partial document)."""
    docs, start = [], 0
    for cut in np.flatnonzero(tokens == EOT):
        docs.append(bytes(tokens[start:cut].astype(np.uint8)).decode("utf-8"))
        start = cut + 1
    return docs, bytes(tokens[start:].astype(np.uint8)).decode("utf-8", errors="ignore")


def _stream(docs: list[str]) -> np.ndarray:
    """Byte tokens of ``docs``, one EOT after each: the documented token stream."""
    return np.array([t for d in docs for t in [*d.encode("utf-8"), EOT]], dtype=np.int64)


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld 日本\r\n\t<|endoftext|> end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # the literal EOT text stays ordinary bytes
    assert (tok.vocab_size, tok.eot_id) == (257, 256) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eot_id] + ids) == text + EOT_TEXT + text
    np.testing.assert_array_equal(tok.encode_array(text), ids)


def _reference_rows(docs: list[str], seq_len: int, val_fraction: float, seed: int,
                    tune_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """The documented split, re-implemented: byte tokens + EOT per document, 8-sample pieces, blake2b rule
    (u < val_fraction: val; val_fraction <= u < val_fraction + tune_fraction: tune; else train)."""
    piece = 8 * (seq_len + 1)
    streams: dict[str, list[int]] = {"train": [], "val": [], "tune": []}
    for doc in docs:
        tokens = [*doc.encode("utf-8"), EOT]
        key = hashlib.sha256(doc.encode("utf-8")).digest()
        for p, start in enumerate(range(0, len(tokens), piece)):
            data = seed.to_bytes(8, "little", signed=True) + key + p.to_bytes(8, "little")
            u = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2 ** 64
            split = "val" if u < val_fraction else "tune" if u < val_fraction + tune_fraction else "train"
            streams[split] += tokens[start: start + piece]
    rows = {}
    for split, stream in streams.items():
        n = len(stream) // (seq_len + 1)
        rows[split] = np.array(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)
    return rows


def test_samples_follow_the_documented_hash_split(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "text")
    seq_len = 16
    m = prepare([str(tmp_path / "text")], tmp_path / "out", seq_len=seq_len, samples_per_shard=8,
                val_fraction=0.2, seed=3)
    assert m.info["split"] == {"mode": "hash", "val_fraction": 0.2, "seed": 3, "piece_tokens": 8 * 17}
    corpus_info = m.info["corpus"]
    assert corpus_info["documents"] == len(corpus) and corpus_info["skipped_files"] == 1  # the binary
    expected = _reference_rows(corpus, seq_len, 0.2, 3)
    for split in ("train", "val"):
        rows, _ = _read_split(tmp_path / "out", split)
        assert all(r.dtype == np.uint16 and r.shape == (seq_len + 1,) for r in rows)
        np.testing.assert_array_equal(np.stack(rows).astype(np.int64), expected[split])
    assert 0 < len(expected["val"]) < len(expected["train"])


def test_tuning_split_is_apart_from_validation_and_training(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "text", n_docs=80)
    seq_len = 64  # a piece (8 samples, 520 tokens) holds any of these documents whole
    assert max(len(d.encode()) for d in corpus) < 8 * (seq_len + 1)
    plain = prepare([str(tmp_path / "text")], tmp_path / "plain", seq_len=seq_len, samples_per_shard=8,
                    val_fraction=0.2, seed=3)
    m = prepare([str(tmp_path / "text")], tmp_path / "out", seq_len=seq_len, samples_per_shard=8,
                val_fraction=0.2, seed=3, tune_fraction=0.15)
    # recorded in the manifest, with the split's shards and counts
    assert m.info["split"] == {"mode": "hash", "val_fraction": 0.2, "tune_fraction": 0.15, "seed": 3,
                               "piece_tokens": 8 * (seq_len + 1)}
    assert m.splits == ("train", "val", "tune") and plain.splits == ("train", "val")
    expected = _reference_rows(corpus, seq_len, 0.2, 3, tune_fraction=0.15)
    rows = {}
    for split in ("train", "val", "tune"):
        got, _ = _read_split(tmp_path / "out", split)
        rows[split] = np.stack(got).astype(np.int64)
        np.testing.assert_array_equal(rows[split], expected[split])
        assert m.num_samples(split) == len(rows[split]) > 0
    # disjoint: every document (distinct: "doc NN: ...") is whole in one split; a split's samples decode
    # to whole documents, the last one cut where the split's tail did not fill a sample
    docs = {s: _docs_of(rows[s].reshape(-1)) for s in rows}
    whole = {s: set(d) for s, (d, _) in docs.items()}
    assert not whole["tune"] & whole["val"] and not whole["tune"] & whole["train"]
    assert not whole["val"] & whole["train"]
    assert all(len(whole[s]) >= 3 for s in whole)
    assert set(corpus) - whole["train"] - whole["val"] - whole["tune"] == \
        {d for d in corpus if any(d.startswith(tail) and tail for _, tail in docs.values())}
    # the validation split is the one a prepare without --tune-fraction writes; tune comes out of train
    val_plain, _ = _read_split(tmp_path / "plain", "val")
    np.testing.assert_array_equal(np.stack(val_plain).astype(np.int64), rows["val"])
    assert m.num_samples("train") + m.num_samples("tune") <= plain.num_samples("train") + 1
    assert m.num_samples("train") < plain.num_samples("train")
    # deterministic: the same inputs and seed give the same files; another seed another split
    again = prepare([str(tmp_path / "text")], tmp_path / "again", seq_len=seq_len, samples_per_shard=8,
                    val_fraction=0.2, seed=3, tune_fraction=0.15)
    assert again.fingerprint == m.fingerprint
    other = prepare([str(tmp_path / "text")], tmp_path / "other", seq_len=seq_len, samples_per_shard=8,
                    val_fraction=0.2, seed=4, tune_fraction=0.15)
    assert other.fingerprint != m.fingerprint
    # data prepared without one says how to get one
    with pytest.raises(DataError, match=r"no 'tune' split \(prepare with --tune-fraction F"):
        plain.shards("tune")


def test_tuning_split_batches_and_errors(tmp_path: Path) -> None:
    from peer_dist.data import val_batches

    _write_corpus(tmp_path / "text", n_docs=80)
    m = prepare([str(tmp_path / "text")], tmp_path / "out", seq_len=16, samples_per_shard=8, val_fraction=0.2,
                seed=3, tune_fraction=0.15)
    tune, _ = _read_split(tmp_path / "out", "tune")
    batches = list(val_batches(tmp_path / "out", rank=0, world=1, batch_size=2, split="tune"))
    assert len(batches) == len(tune) // 2
    np.testing.assert_array_equal(torch_cat(batches), np.stack(tune[: 2 * len(batches)]).astype(np.int64))
    assert "tuning samples" in m.summary()
    with pytest.raises(DataError, match="evaluation split 'train': allowed are val, tune"):
        list(val_batches(tmp_path / "out", rank=0, world=1, batch_size=2, split="train"))
    for kwargs in ({"tune_fraction": -0.1}, {"tune_fraction": 0.9, "val_fraction": 0.2}):
        with pytest.raises(DataError, match="tune_fraction=.*allowed is 0 <= tune_fraction and val_fraction "
                                            r"\+ tune_fraction < 1"):
            prepare([str(tmp_path / "text")], tmp_path / "bad", **kwargs)


def torch_cat(batches: list) -> np.ndarray:
    return np.concatenate([b.numpy() for b in batches])


def test_single_file_is_split_in_pieces_not_one_block(tmp_path: Path) -> None:
    text = "".join(_write_corpus(tmp_path / "text", n_docs=60))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    seq_len = 10
    prepare([str(tmp_path / "one.txt")], tmp_path / "out", seq_len=seq_len, samples_per_shard=16,
            val_fraction=0.2, seed=1)
    expected = _reference_rows([text], seq_len, 0.2, 1)
    val, _ = _read_split(tmp_path / "out", "val")
    train, _ = _read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(np.stack(val).astype(np.int64), expected["val"])
    np.testing.assert_array_equal(np.stack(train).astype(np.int64), expected["train"])
    # The validation pieces come from several places of the file, not one contiguous block.
    stream = _stream([text])
    piece = 8 * (seq_len + 1)
    val_tokens = np.concatenate(val).astype(np.int64)
    starts = [p for p in range(0, len(stream), piece)
              if len(val_tokens) >= piece and any(np.array_equal(stream[p: p + piece], val_tokens[i: i + piece])
                                                   for i in range(0, len(val_tokens) - piece + 1, piece))]
    assert len(starts) >= 2 and max(np.diff(starts)) > piece


def test_manifest_matches_files(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "text")
    m = prepare([str(tmp_path / "text")], tmp_path / "out", seq_len=16, samples_per_shard=8, val_fraction=0.2)
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for split in ("train", "val"):
        files = sorted((tmp_path / "out").glob(f"{split}-*.tar"))
        assert [s.file for s in m.shards(split)] == [f.name for f in files]
        for info, f in zip(m.shards(split), files):
            data = f.read_bytes()
            assert info.bytes == len(data) == f.stat().st_size
            assert info.sha256 == hashlib.sha256(data).hexdigest()
            with tarfile.open(f) as tar:
                assert info.samples == len(tar.getmembers())
                first = int(f.name.split("-")[2][:6]) * 8
                assert tar.getnames() == [f"000000-{first + i:07d}.tokens.npy" for i in range(info.samples)]
        assert all(s.samples == 8 for s in m.shards(split)[:-1])
        n = sum(s.samples for s in m.shards(split))
        assert raw["splits"][split]["samples"] == n == m.num_samples(split)
        assert raw["splits"][split]["tokens"] == n * 17
    assert (m.tokenizer, m.vocab_size, m.eot_id, m.seq_len, m.dtype) == ("byte", 257, 256, 16, "uint16")
    body = {k: v for k, v in raw.items() if k != "fingerprint"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert m.fingerprint == raw["fingerprint"] == hashlib.sha256(canonical).hexdigest()
    assert not list((tmp_path / "out").glob("*.tmp"))
    # Deterministic: same inputs and arguments -> same bytes and fingerprint; another seed -> another split.
    again = prepare([str(tmp_path / "text")], tmp_path / "again", seq_len=16, samples_per_shard=8, val_fraction=0.2)
    assert again.fingerprint == m.fingerprint
    assert (tmp_path / "again" / "train-000000-000000.tar").read_bytes() == (tmp_path / "out" / "train-000000-000000.tar").read_bytes()
    other = prepare([str(tmp_path / "text")], tmp_path / "other", seq_len=16, samples_per_shard=8, val_fraction=0.2,
                    seed=1)
    assert other.fingerprint != m.fingerprint


def test_bpe_tokenizer_trains_saves_reloads(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "text")
    m = prepare([str(tmp_path / "text")], tmp_path / "out", tokenizer="bpe", vocab_size=300, seq_len=16,
                samples_per_shard=8, val_fraction=0.2)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "out")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bpe", m.vocab_size, m.eot_id)
    assert 258 <= tok.vocab_size <= 300
    for text in corpus[:5] + ["unseen ünïcode ✓ text\r\n\t  <|endoftext|>"]:
        ids = tok.encode(text)
        assert tok.eot_id not in ids and tok.decode(ids) == text
    assert len(tok.encode(corpus[0])) < len(corpus[0].encode())  # it learned merges
    # The stored train stream decodes to whole corpus documents separated by EOT.
    rows, _ = _read_split(tmp_path / "out", "train")
    ids = np.concatenate(rows).tolist()
    first_doc = ids[: ids.index(tok.eot_id)]
    assert tok.decode(first_doc) in corpus
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "out")


def test_default_corpus_is_the_stdlib(tmp_path: Path) -> None:
    files = default_corpus_files()
    assert files == sorted(files) and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    m = prepare([], tmp_path / "out", seq_len=32, samples_per_shard=64, val_fraction=0.1, max_bytes=30_000)
    corpus = m.info["corpus"]
    assert corpus["default_stdlib"] and corpus["bytes"] == 30_000 and corpus["truncated"]
    tokens = (m.num_samples("train") + m.num_samples("val")) * 33
    docs = corpus["documents"]
    assert corpus["files"] == docs
    assert 30_000 + docs - 2 * 33 < tokens <= 30_000 + docs  # every byte + one EOT per doc, minus dropped tails
    # Every complete document in the shards is one stdlib file, in sorted order within each split.
    texts = [f.read_text(encoding="utf-8") for f in files[:docs]]
    for split in ("train", "val"):
        rows, _ = _read_split(tmp_path / "out", split)
        complete, _ = _docs_of(np.concatenate(rows).astype(np.int64))
        positions = [texts.index(d) for d in complete if d in texts]
        assert len(positions) >= len(complete) - 2 and positions == sorted(positions)  # the cut ends aside


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "text")
    args = dict(seq_len=16, val_fraction=0.2)
    prepare([str(tmp_path / "text")], tmp_path / "out", samples_per_shard=4, **args)
    n_old = len(list((tmp_path / "out").glob("train-*.tar")))
    with pytest.raises(DataError, match="already holds prepared data.*overwrite"):
        prepare([str(tmp_path / "text")], tmp_path / "out", samples_per_shard=64, **args)
    # A failing prepare with overwrite=True leaves the old data alone.
    with pytest.raises(DataError):
        prepare([str(tmp_path / "nope")], tmp_path / "out", samples_per_shard=64, overwrite=True, **args)
    assert Manifest.load(tmp_path / "out").shards("train")[0].samples == 4
    m = prepare([str(tmp_path / "text")], tmp_path / "out", samples_per_shard=64, overwrite=True, **args)
    files = sorted(p.name for p in (tmp_path / "out").glob("train-*.tar"))
    assert files == [s.file for s in m.shards("train")] and len(files) < n_old  # stale shards removed


def test_output_inside_an_input_folder_is_not_read(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "text")
    first = prepare([str(tmp_path / "text")], tmp_path / "text" / "out", seq_len=16, val_fraction=0.2)
    again = prepare([str(tmp_path / "text")], tmp_path / "text" / "out", seq_len=16, val_fraction=0.2, overwrite=True)
    assert again.fingerprint == first.fingerprint  # manifest.json / shards of the first run were not read as text


def test_user_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt.*does not exist"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "out")
    with pytest.raises(DataError, match=r"pattern .*\*\.md.* matches no files"):
        prepare([str(tmp_path / "*.md")], tmp_path / "out")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x01\xff" * 10)
    with pytest.raises(DataError, match="no text found"):
        prepare([str(tmp_path / "bin")], tmp_path / "out")
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(DataError, match="too small"):
        prepare([str(tmp_path / "small.txt")], tmp_path / "out", seq_len=64)
    for kwargs, word in [({"tokenizer": "wordpiece"}, "tokenizer"), ({"val_fraction": 1.0}, "val_fraction"),
                         ({"seq_len": 0}, "seq_len"), ({"tokenizer": "bpe", "vocab_size": 100}, "vocab_size"),
                         ({"max_bytes": 0}, "max_bytes")]:
        with pytest.raises(DataError, match=word):
            prepare([str(tmp_path / "small.txt")], tmp_path / "out", **kwargs)


def test_manifest_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json is missing"):
        Manifest.load(tmp_path)
    _write_corpus(tmp_path / "text")
    out = tmp_path / "out"
    prepare([str(tmp_path / "text")], out, seq_len=16, samples_per_shard=8, val_fraction=0.2)
    path = out / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a readable JSON"):
        Manifest.load(out)
    path.write_text(json.dumps(dict(good, version=99)))
    with pytest.raises(DataError, match="version 99"):
        Manifest.load(out)
    edited = json.loads(json.dumps(good))
    edited["splits"]["train"]["shards"][0]["samples"] += 1
    path.write_text(json.dumps(edited))
    with pytest.raises(DataError, match="modified after prepare"):
        Manifest.load(out)
