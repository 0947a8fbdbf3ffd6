"""Reading input files as documents: text files, JSON Lines (plain, gzip, zstd) and Parquet.

Which reader a file gets is decided by its name (:func:`file_kind`):

    .jsonl  .jsonl.gz  .jsonl.zst  .json.gz  .json.zst   one JSON object per line
    .parquet                                             one row per document
    anything else                                        the whole file is one document

A record's document is its ``text_field`` (a string). Every reader streams: a
compressed file is decompressed as it is read, a Parquet file is read one batch
of rows of the one column at a time, so memory holds a batch, never a file.

Records that cannot be documents are *bad records*: a line that is not JSON or not
UTF-8, a JSON value that is not an object, a missing field, a field that is not a
string (null included), text that is not valid Unicode (a lone surrogate escape).
``bad_record="error"`` stops with the file and line (or row); ``"skip"`` counts
them. Blank lines are not records. Empty documents are counted and left out. A
text file that is not UTF-8 or holds a NUL byte is skipped and counted. A file
that cannot be decompressed or parsed at all (a damaged gzip, zstd or Parquet
file) is an error under both policies: dropping the rest of a file silently
would hide data loss.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from peer_dist.errors import DataError
from peer_dist.log import get_logger

BAD_RECORD_POLICIES = ("error", "skip")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
_PARQUET_BATCH = 1024  # rows decoded at a time
_WARN_BAD = 5  # bad records logged one by one under skip; the rest are only counted


def file_kind(path: str | Path) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"text"`` from the file name (case-insensitive)."""
    name = str(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


@dataclass
class ReadCounts:
    """What reading left out, summed over files."""

    skipped_files: int = 0  # text files that are not UTF-8 text
    empty_documents: int = 0
    bad_records: int = 0
    first_bad: str = ""  # where the first bad record was, and why (for messages)

    def add(self, other: ReadCounts) -> None:
        self.skipped_files += other.skipped_files
        self.empty_documents += other.empty_documents
        self.bad_records += other.bad_records
        self.first_bad = self.first_bad or other.first_bad


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    bad_record: str = "error"


@dataclass(frozen=True)
class Limit:
    """Keep the first ``documents`` documents of a file, the last of them cut to ``last_bytes`` UTF-8 bytes."""

    documents: int
    last_bytes: int


@dataclass
class DocumentReader:
    """Iterates the documents (non-empty ``str``) of one file; ``counts`` and ``position`` follow along.

    ``position`` is how far into the file on disk reading has come (bytes), for progress.
    """

    path: str
    options: ReadOptions
    limit: Limit | None = None
    counts: ReadCounts = field(default_factory=ReadCounts)
    position: int = 0

    def __iter__(self) -> Iterator[str]:
        kind = file_kind(self.path)
        docs = self._text() if kind == "text" else self._jsonl() if kind == "jsonl" else self._parquet()
        if self.limit is None:
            yield from docs
            return
        for i, text in enumerate(docs):
            if i + 1 == self.limit.documents:
                cut = text.encode("utf-8")[: self.limit.last_bytes]
                # A cut inside a multi-byte character drops that character's head bytes.
                yield cut.decode("utf-8", errors="ignore")
                return
            yield text

    # ---- text files ---------------------------------------------------------------------

    def _text(self) -> Iterator[str]:
        data = Path(self.path).read_bytes()
        self.position = len(data)
        if b"\x00" in data:
            self.counts.skipped_files += 1
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.counts.skipped_files += 1
            return
        if text:
            yield text
        else:
            self.counts.empty_documents += 1

    # ---- JSON Lines -----------------------------------------------------------------------

    def _jsonl(self) -> Iterator[str]:
        with open(self.path, "rb") as raw:
            stream = _decompressed(raw, self.path)
            try:
                for number, line in enumerate(stream, start=1):
                    self.position = raw.tell()
                    if not line.strip():
                        continue
                    text = self._document(_parse_line(line), f"line {number}")
                    if text:
                        yield text
            except (OSError, EOFError, _zstd_error()) as exc:  # gzip.BadGzipFile, zstd errors, a cut-off stream
                raise DataError(f"{self.path} could not be decompressed ({_one_line(exc)}); the file is damaged "
                                "or not in the format its name says") from None
            self.position = raw.tell()

    # ---- Parquet ----------------------------------------------------------------------------

    def _parquet(self) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
            column = self._parquet_column(pf)
            if column is None:
                return
            row = 0
            for g in range(pf.num_row_groups):
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[g], columns=[column]):
                    for value in batch.column(0).to_pylist():
                        row += 1
                        text = self._document(_RowValue(value), f"row {row}")
                        if text:
                            yield text
                group = pf.metadata.row_group(g)
                self.position += sum(group.column(i).total_compressed_size for i in range(group.num_columns))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path} is not a readable Parquet file ({_one_line(exc)})") from None

    def _parquet_column(self, pf: Any) -> str | None:
        """The text column's name; a file without it is bad records (all its rows) or an error."""
        names = pf.schema_arrow.names
        if self.options.text_field in names:
            return self.options.text_field
        problem = (f"has no column {self.options.text_field!r} (columns: {', '.join(names)}); "
                   "set --text-field to the column that holds the text")
        self._bad(f"{self.path} {problem}", count=pf.metadata.num_rows)
        return None

    # ---- records --------------------------------------------------------------------------

    def _document(self, record: Any, where: str) -> str | None:
        """The document of one parsed record; None for a bad record (under skip) or an empty one."""
        if isinstance(record, _Bad):
            return self._bad(f"{self.path} {where} {record.why}")
        if isinstance(record, _RowValue):
            value = record.value
        elif not isinstance(record, dict):
            return self._bad(f"{self.path} {where} is a JSON {_json_type(record)}, not an object")
        elif self.options.text_field not in record:
            fields = ", ".join(sorted(record)[:8]) or "none"
            return self._bad(f"{self.path} {where} has no field {self.options.text_field!r} (fields: {fields}); "
                             "set --text-field to the field that holds the text")
        else:
            value = record[self.options.text_field]
        if isinstance(value, bytes):  # a Parquet binary column
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return self._bad(f"{self.path} {where}: field {self.options.text_field!r} is not UTF-8 text")
        if not isinstance(value, str):
            return self._bad(f"{self.path} {where}: field {self.options.text_field!r} is "
                             f"{_json_type(value)}, not a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return self._bad(f"{self.path} {where}: field {self.options.text_field!r} is not valid Unicode "
                             "(a lone surrogate escape)")
        if not value:
            self.counts.empty_documents += 1
            return None
        return value

    def _bad(self, message: str, count: int = 1) -> None:
        if self.options.bad_record == "error":
            raise DataError(f"{message} (--bad-record error; pass --bad-record skip to leave such records out)")
        if self.counts.bad_records < _WARN_BAD:
            get_logger().warning("skipping bad record: %s", message)
        self.counts.bad_records += count
        self.counts.first_bad = self.counts.first_bad or message
        return None


@dataclass(frozen=True)
class _Bad:
    why: str


@dataclass(frozen=True)
class _RowValue:
    """A Parquet cell: the document's value itself (no object around it)."""

    value: Any


def _parse_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except UnicodeDecodeError:
        return _Bad("is not UTF-8")
    except ValueError as exc:
        return _Bad(f"is not valid JSON ({_one_line(exc)})")


def _decompressed(raw: IO[bytes], path: str) -> IO[bytes]:
    """A line-iterable binary stream of ``raw``'s content, decompressed as it is read."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst"):
        import zstandard

        # max_window_size: some corpora are compressed with --long (windows up to 2 GB).
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return raw


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
