"""Pretraining-scale prepare: JSONL (gzip, zstd) and Parquet corpora, bad records, workers, parts + merge,
tokenizer files and samples, `peer-dist verify` and ``data.verify=upfront`` — checked against the documents
tokenized directly and against files re-read with plain tarfile/numpy."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from peer_dist.data import Manifest, merge_parts, prepare
from peer_dist.data.corpus import plan_corpus, tokenizer_sample
from peer_dist.data.records import ReadOptions
from peer_dist.errors import DataError
from tests.helpers import read_metrics, run_cli

EOT = 256
WORDS = ["alpha", "beta", "gamma", "δέλτα", "日本", "zeta", "\n", "x=1;", "theta", "ωμέγα"]


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 80)))) for i in range(n)]


def _jsonl_lines(docs: list[str], field: str = "text") -> list[bytes]:
    return [json.dumps({"id": i, field: d, "meta": {"n": i}}).encode() + b"\n" for i, d in enumerate(docs)]


def _write(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def _corpus_files(root: Path) -> list[list[str]]:
    """Five files, one of every format, 30 documents each; their documents, file by file in corpus order."""
    files = {"a.jsonl": _docs(30, 1), "b.jsonl.gz": _docs(30, 2), "c.jsonl.zst": _docs(30, 3),
             "d.json.gz": _docs(30, 4)}
    for name, docs in files.items():
        _write(root / name, _jsonl_lines(docs))
    parquet = _docs(30, 5)
    pq.write_table(pa.table({"text": parquet, "id": list(range(30))}), root / "e.parquet", row_group_size=7)
    return [files[name] for name in sorted(files)] + [parquet]


def _corpus(root: Path) -> list[str]:
    return [d for docs in _corpus_files(root) for d in docs]


def _split_rows(data_dir: Path, split: str) -> np.ndarray:
    """All samples of a split in manifest order, read with tarfile + numpy (not our reader)."""
    rows = []
    for shard in Manifest.load(data_dir).shards(split):
        with tarfile.open(data_dir / shard.file) as tar:
            rows += [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0,), dtype=np.int64)


def _reference(docs: list[str], seq_len: int, val_fraction: float, seed: int,
               encode=lambda d: list(d.encode("utf-8")), eot: int = EOT) -> dict[str, list[int]]:
    """Each split's token stream by the documented rule (per document: ids + EOT, 8-sample pieces, blake2b)."""
    piece = 8 * (seq_len + 1)
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc in docs:
        tokens = [*encode(doc), eot]
        key = hashlib.sha256(doc.encode("utf-8")).digest()
        for p, start in enumerate(range(0, len(tokens), piece)):
            data = seed.to_bytes(8, "little", signed=True) + key + p.to_bytes(8, "little")
            u = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2 ** 64
            streams["val" if val_fraction > 0 and u < val_fraction else "train"] += tokens[start: start + piece]
    return streams


def _as_rows(stream: list[int], seq_len: int) -> np.ndarray:
    n = len(stream) // (seq_len + 1)
    return np.array(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------- formats


def test_every_format_gives_its_records_as_documents(tmp_path: Path) -> None:
    docs = _corpus(tmp_path / "in")
    seq_len = 12
    m = prepare([str(tmp_path / "in")], tmp_path / "out", seq_len=seq_len, samples_per_shard=16, val_fraction=0.1,
                seed=4)
    corpus = m.info["corpus"]
    assert (corpus["files"], corpus["documents"], corpus["chunks"]) == (5, 150, 1)
    assert corpus["bytes"] == sum(len(d.encode()) for d in docs) and corpus["bad_records"] == 0
    expected = _reference(docs, seq_len, 0.1, 4)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_split_rows(tmp_path / "out", split), _as_rows(expected[split], seq_len))


def test_bad_records_error_names_file_and_line_or_skip_counts_them(tmp_path: Path) -> None:
    good = _docs(12, 7)
    lines = _jsonl_lines(good[:4]) + [
        b'{"text": "cut off\n',                           # line 5: not JSON
        b'{"id": 1, "body": "no text field"}\n',          # line 6: missing field
        b'\n',                                            # blank: not a record
        b'{"text": "caf\xe9 latin-1"}\n',                 # line 8: not UTF-8
        b'{"text": ""}\n',                                # line 9: empty document (not bad)
        b'[1, 2]\n',                                      # line 10: not an object
        b'{"text": null}\n',                              # line 11: not a string
        b'{"text": "\\ud800 lone surrogate"}\n',          # line 12: not valid Unicode
    ] + _jsonl_lines(good[4:])
    _write(tmp_path / "in" / "x.jsonl.zst", lines)
    with pytest.raises(DataError, match=r"x\.jsonl\.zst line 5 is not valid JSON .*--bad-record skip"):
        prepare([str(tmp_path / "in")], tmp_path / "out", seq_len=8)
    assert not (tmp_path / "out").exists()
    m = prepare([str(tmp_path / "in")], tmp_path / "out", seq_len=8, val_fraction=0.2, bad_record="skip")
    corpus = m.info["corpus"]
    assert (corpus["bad_records"], corpus["empty_documents"], corpus["documents"]) == (6, 1, 12)
    expected = _reference(good, 8, 0.2, 0)
    np.testing.assert_array_equal(_split_rows(tmp_path / "out", "train"), _as_rows(expected["train"], 8))
    # Each kind of bad record, alone, under error: one message naming file, line and what is wrong.
    for number, why in [(6, "has no field 'text' \\(fields: body, id\\)"), (8, "is not UTF-8"),
                        (10, "is a JSON array, not an object"), (11, "field 'text' is null, not a string"),
                        (12, "field 'text' is not valid Unicode")]:
        _write(tmp_path / "one" / "y.jsonl", _jsonl_lines(good[:number - 1]) + [lines[number - 1]])
        with pytest.raises(DataError, match=rf"y\.jsonl line {number}:? {why}"):
            prepare([str(tmp_path / "one")], tmp_path / "out1", seq_len=8)


def test_text_field_and_parquet_problems(tmp_path: Path) -> None:
    docs = _docs(20, 8)
    _write(tmp_path / "in" / "c4.json.gz", _jsonl_lines(docs, field="content"))
    with pytest.raises(DataError, match="line 1 has no field 'text' .*fields: content, id, meta.*--text-field"):
        prepare([str(tmp_path / "in")], tmp_path / "out", seq_len=8)
    m = prepare([str(tmp_path / "in")], tmp_path / "out", seq_len=8, val_fraction=0.0, text_field="content")
    np.testing.assert_array_equal(_split_rows(tmp_path / "out", "train"),
                                  _as_rows(_reference(docs, 8, 0.0, 0)["train"], 8))
    assert m.info["corpus"]["text_field"] == "content"
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": docs}), tmp_path / "p" / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet has no column 'text' \(columns: body\)"):
        prepare([str(tmp_path / "p")], tmp_path / "out2", seq_len=8)
    pq.write_table(pa.table({"text": [docs[0], None, docs[1], b"\xff\xfe".decode("latin-1")]}),
                   tmp_path / "p" / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet row 2: field 'text' is null"):
        prepare([str(tmp_path / "p")], tmp_path / "out2", seq_len=8)
    (tmp_path / "p" / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x\.parquet is not a readable Parquet file"):
        prepare([str(tmp_path / "p")], tmp_path / "out2", seq_len=8)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "x.jsonl.gz").write_bytes(gzip.compress(b"".join(_jsonl_lines(docs)))[:-30])
    with pytest.raises(DataError, match=r"x\.jsonl\.gz could not be decompressed"):
        prepare([str(tmp_path / "z")], tmp_path / "out2", seq_len=8)


def test_parquet_binary_column_and_max_bytes(tmp_path: Path) -> None:
    docs = _docs(40, 9)
    raw = [d.encode() for d in docs]
    raw[3] = b"\xff\xfe not utf-8"
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary())}), tmp_path / "b.parquet", row_group_size=9)
    with pytest.raises(DataError, match=r"b\.parquet row 4: field 'text' is not UTF-8"):
        prepare([str(tmp_path / "b.parquet")], tmp_path / "out", seq_len=8)
    kept = docs[:3] + docs[4:]
    cap = sum(len(d.encode()) for d in kept[:20]) + 5  # 20 documents and the head of the 21st
    m = prepare([str(tmp_path / "b.parquet")], tmp_path / "out", seq_len=8, val_fraction=0.0, max_bytes=cap,
                bad_record="skip")
    assert m.info["corpus"]["bytes"] == cap and m.info["corpus"]["truncated"]
    cut = kept[:20] + [kept[20].encode()[:5].decode()]
    np.testing.assert_array_equal(_split_rows(tmp_path / "out", "train"),
                                  _as_rows(_reference(cut, 8, 0.0, 0)["train"], 8))


# ---------------------------------------------------------------------------- workers, parts, tokenizers


@pytest.mark.timeout(180)
def test_worker_count_and_parts_give_the_same_bytes(tmp_path: Path) -> None:
    per_file = _corpus_files(tmp_path / "in")
    args = dict(tokenizer="bpe", vocab_size=300, seq_len=12, samples_per_shard=10, val_fraction=0.1, seed=2,
                chunk_bytes=1500)  # every file is a chunk: five chunks
    one = prepare([str(tmp_path / "in")], tmp_path / "w1", workers=1, **args)
    assert one.info["corpus"]["chunks"] == 5
    prepare([str(tmp_path / "in")], tmp_path / "w2", workers=2, **args)
    reference = _folder_bytes(tmp_path / "w1")
    assert _folder_bytes(tmp_path / "w2") == reference
    for part in (2, 0, 1):
        assert prepare([str(tmp_path / "in")], tmp_path / "parts", part=part, num_parts=3, **args) is None
    assert sorted(p.name for p in (tmp_path / "parts").glob("part-*")) == [f"part-000{i}-of-0003.json" for i in range(3)]
    merged = merge_parts(tmp_path / "parts")
    assert merged.fingerprint == one.fingerprint
    assert _folder_bytes(tmp_path / "parts") == reference  # shards, tokenizer.json, manifest.json; part files gone
    # And the tokens are the BPE of the documents: per chunk (= file) the documented split, tails dropped.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "w1" / "tokenizer.json"))
    for split in ("train", "val"):
        expected = [_as_rows(_reference(docs, 12, 0.1, 2, lambda d: tok.encode(d, add_special_tokens=False).ids,
                                        one.eot_id)[split], 12) for docs in per_file]
        np.testing.assert_array_equal(_split_rows(tmp_path / "w1", split), np.concatenate(expected))


def test_parts_that_do_not_match_are_refused(tmp_path: Path) -> None:
    _corpus(tmp_path / "in")
    args = dict(seq_len=12, val_fraction=0.1, chunk_bytes=1500)
    prepare([str(tmp_path / "in")], tmp_path / "out", part=0, num_parts=2, **args)
    with pytest.raises(DataError, match="missing part-0001-of-0002.json"):
        merge_parts(tmp_path / "out")
    with pytest.raises(DataError, match="part 0 of 2 is already prepared"):
        prepare([str(tmp_path / "in")], tmp_path / "out", part=0, num_parts=2, **args)
    prepare([str(tmp_path / "in")], tmp_path / "out", part=1, num_parts=2, **dict(args, seq_len=16))
    with pytest.raises(DataError, match=r"prepared with different header settings \(.*seq_len"):
        merge_parts(tmp_path / "out")
    (tmp_path / "out" / "part-0001-of-0002.json").unlink()
    prepare([str(tmp_path / "in")], tmp_path / "out", part=1, num_parts=2, **args)
    listing = sorted(p.name for p in (tmp_path / "out").iterdir())
    merge_parts(tmp_path / "out")
    with pytest.raises(DataError, match="already holds merged prepared data"):
        merge_parts(tmp_path / "out")
    with pytest.raises(DataError, match="already holds merged prepared data"):
        prepare([str(tmp_path / "in")], tmp_path / "out", part=1, num_parts=2, **args)
    assert len(listing) == len(list((tmp_path / "out").iterdir())) + 1  # two part files -> one manifest
    with pytest.raises(DataError, match=r"--part 2 with --num-parts 2: give --part in 0\.\.1"):
        prepare([str(tmp_path / "in")], tmp_path / "x", part=2, num_parts=2)


def test_parts_with_different_tokenizers_are_refused(tmp_path: Path) -> None:
    _corpus(tmp_path / "in")
    toks = []
    for vocab in (280, 300):
        toks.append(tmp_path / f"tok{vocab}.json")
        run_cli(["tokenizer", str(tmp_path / "in"), "-o", str(toks[-1]), "--vocab-size", str(vocab)])
    args = dict(seq_len=12, val_fraction=0.1, chunk_bytes=1500)
    prepare([str(tmp_path / "in")], tmp_path / "out", part=0, num_parts=2, tokenizer_file=toks[0], **args)
    with pytest.raises(DataError, match="different tokenizer than part 1's.*--tokenizer-file"):
        prepare([str(tmp_path / "in")], tmp_path / "out", part=1, num_parts=2, tokenizer_file=toks[1], **args)


def test_tokenizer_file_is_used_as_is_and_fingerprinted(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    docs = _docs(40, 11)
    _write(tmp_path / "in" / "a.jsonl", _jsonl_lines(docs))
    vocab = {w: i for i, w in enumerate(["[UNK]", "doc", "alpha", "beta", "gamma", ":", "zeta", "theta"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "wl.json"))
    m = prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer_file=str(tmp_path / "wl.json"), seq_len=6,
                val_fraction=0.0)
    info = m.info["tokenizer"]
    assert (info["name"], info["vocab_size"], info["eot_id"]) == ("file", 9, 8)
    assert info["sha256"] == hashlib.sha256((tmp_path / "wl.json").read_bytes()).hexdigest()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "wl.json").read_bytes()
    expected = _reference(docs, 6, 0.0, 0, encode=lambda d: tok.encode(d).ids, eot=8)
    np.testing.assert_array_equal(_split_rows(tmp_path / "out", "train"), _as_rows(expected["train"], 6))
    with pytest.raises(DataError, match="--tokenizer bpe and --tokenizer-file"):
        prepare([str(tmp_path / "in")], tmp_path / "o2", tokenizer="bpe", tokenizer_file=str(tmp_path / "wl.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad\.json is not a valid tokenizers tokenizer.json.*check --tokenizer-file"):
        prepare([str(tmp_path / "in")], tmp_path / "o2", tokenizer_file=str(tmp_path / "bad.json"))


def test_tokenizer_sample_is_bounded_and_seeded(tmp_path: Path) -> None:
    docs = _corpus(tmp_path / "in")
    options = ReadOptions()
    plan = plan_corpus([str(tmp_path / "in")], [], 1500, None, options)
    sizes = {d: len(d.encode()) for d in docs}
    a = list(tokenizer_sample(plan.chunks, 2000, 0, options))
    b = list(tokenizer_sample(plan.chunks, 2000, 0, options))
    c = list(tokenizer_sample(plan.chunks, 2000, 1, options))
    assert a == b and a != c and set(a) <= set(docs)
    assert 2000 <= sum(sizes[d] for d in a) < 2000 + max(sizes.values())
    everything = list(tokenizer_sample(plan.chunks, 10 ** 9, 0, options))
    assert sorted(everything) == sorted(docs)  # a sample larger than the corpus is the corpus


# ---------------------------------------------------------------------------- verify


def test_verify_cli_finds_truncated_and_corrupted_shards(tmp_path: Path) -> None:
    _corpus(tmp_path / "in")
    proc = run_cli(["prepare", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--seq-len", "12",
                    "--samples-per-shard", "16", "--no-progress"])
    assert "prepared" in proc.stdout
    ok = run_cli(["verify", str(tmp_path / "out"), "--no-progress"])
    assert ok.stdout.startswith(f"verified {tmp_path / 'out'}")
    shards = Manifest.load(tmp_path / "out").shards("train")
    first, second = tmp_path / "out" / shards[0].file, tmp_path / "out" / shards[1].file
    first.write_bytes(first.read_bytes()[:-512])
    data = bytearray(second.read_bytes())
    data[700] ^= 1
    second.write_bytes(bytes(data))
    bad = run_cli(["verify", str(tmp_path / "out"), "--no-progress"], check=False)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peer-dist verify: error: ")
    assert f"2 of {len(shards) + len(Manifest.load(tmp_path / 'out').shards('val'))} shard(s) fail" in lines[0]
    assert f"train shard {first} has {shards[0].bytes - 512} bytes, the manifest says {shards[0].bytes}" in lines[0]
    assert f"train shard {second} fails its sha256 check" in lines[0]


def test_prepare_cli_user_error_is_one_line(tmp_path: Path) -> None:
    _write(tmp_path / "x.jsonl", [b'{"text": "fine"}\n', b'oops\n'])
    proc = run_cli(["prepare", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "out"), "--no-progress"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"peer-dist prepare: error: {tmp_path / 'x.jsonl'} line 2 "
                                                           "is not valid JSON")
    proc = run_cli(["prepare-merge", str(tmp_path / "nothing")], check=False)
    assert proc.returncode == 2 and "holds no part files" in proc.stderr


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.peer.num_experts=256",
        "model.peer.heads=2", "model.peer.topk=4", "model.peer.d_key=16", "train.max_steps=1",
        "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=1",
        "train.progress=false", "train.micro_batch_size=4"]


@pytest.mark.timeout(300)
def test_upfront_verify_stops_training_before_step_1(tmp_path: Path) -> None:
    _corpus(tmp_path / "in")
    data = tmp_path / "data"
    prepare([str(tmp_path / "in")], data, seq_len=16, samples_per_shard=8, val_fraction=0.1)
    m = Manifest.load(data)
    from peer_dist.data import SampleOrder, micro_batch_sample_ids

    order = SampleOrder([s.samples for s in m.shards("train")], 0)
    step_1 = {order.locate(g)[0] for g in micro_batch_sample_ids(0, 0, 0, 1, 4, 1)}
    victim_index = next(i for i in range(len(m.shards("train"))) if i not in step_1)
    victim = m.shards("train")[victim_index]  # a shard step 1 does not read: only upfront can catch it first
    (data / victim.file).write_bytes((data / victim.file).read_bytes()[:-512])
    args = ["train", *TINY, f"data.path={data}", f"run.dir={tmp_path}"]
    proc = run_cli([*args, "run.name=upfront", "data.verify=upfront"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train shard {data / victim.file} has" in proc.stderr and "data.verify=upfront" in proc.stderr
    metrics = tmp_path / "upfront" / "metrics.jsonl"
    assert not metrics.exists() or not [r for r in read_metrics(tmp_path / "upfront") if "train/loss" in r]
