"""Tokenizers: byte-level (no files), byte-level BPE trained locally, or any `tokenizers` file.

A ``tokenizer.json`` given with ``--tokenizer-file`` (any Hugging Face ``tokenizers``
file, read locally) is used as is, without its special-token post-processing (no
BOS/EOS added per document: documents are separated by our end-of-text id only).

Both reserve one end-of-text id (``eot_id``) that separates documents in the
token stream. It sits OUTSIDE the text vocabulary: encoding never produces it,
not even for the literal text ``<|endoftext|>``, so a document cannot forge a
document boundary. ``decode`` renders it as :data:`EOT_TEXT`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from peer_dist.errors import DataError

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZERS = ("byte", "bpe")
FILE_TOKENIZER = "file"  # manifest name of a tokenizer given as a file
# Byte-level BPE starts from the 256 byte symbols; one merge and the EOT id make 258.
MIN_BPE_VOCAB = 258


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # text ids + the end-of-text id
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _decode_with_eot(ids: Iterable[int], eot_id: int, decode_text: Callable[[list[int]], str]) -> str:
    parts, current = [], []
    for i in ids:
        if i == eot_id:
            parts.append(decode_text(current))
            current = []
        else:
            current.append(int(i))
    parts.append(decode_text(current))
    return EOT_TEXT.join(parts)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; end-of-text is 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_with_eot(ids, self.eot_id, lambda part: bytes(part).decode("utf-8", errors="replace"))


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, lossless on any text)."""

    def __init__(self, tokenizer: Any, name: str = "bpe") -> None:  # a tokenizers.Tokenizer
        self._tok = tokenizer
        self.name = name
        self.eot_id = tokenizer.get_vocab_size()  # first id after the learned vocabulary
        self.vocab_size = self.eot_id + 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_with_eot(ids, self.eot_id, lambda part: self._tok.decode(part, skip_special_tokens=False))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn ``vocab_size - 1`` text ids (256 bytes + merges) from ``texts``."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1, show_progress=False, special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path, name: str = "bpe", given: str = "") -> BPETokenizer:
        """The tokenizer in ``path``; ``given`` names the flag it came from, for messages."""
        from tokenizers import Tokenizer as HFTokenizer

        fix = f"check {given}" if given else "re-run `peer-dist prepare` for this folder"
        if not path.is_file():
            raise DataError(f"tokenizer file {path} is missing; {fix}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise DataError(f"{path} is not a valid tokenizers {TOKENIZER_FILE} ({' '.join(str(exc).split())[:200]}); "
                            f"{fix}") from None
        return cls(tok, name)


def check_tokenizer_args(tokenizer: str, vocab_size: int) -> None:
    if tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer={tokenizer!r} is not known; allowed: {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe" and not MIN_BPE_VOCAB <= vocab_size <= 65535:
        raise DataError(f"vocab_size={vocab_size} is out of range for the BPE tokenizer; "
                        f"allowed: {MIN_BPE_VOCAB}..65535")


def build_tokenizer(kind: str, vocab_size: int, texts: Iterable[str]) -> ByteTokenizer | BPETokenizer:
    return ByteTokenizer() if kind == "byte" else BPETokenizer.train(texts, vocab_size)


def load_tokenizer(data_dir: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a prepared folder was made with (checked against its manifest)."""
    from peer_dist.data.manifest import Manifest

    manifest = Manifest.load(data_dir)
    if manifest.tokenizer == "byte":
        return ByteTokenizer()
    path = Path(data_dir) / TOKENIZER_FILE
    tok = BPETokenizer.load(path, manifest.tokenizer)
    if tok.vocab_size != manifest.vocab_size:
        raise DataError(f"{path} has {tok.vocab_size} ids but manifest.json says {manifest.vocab_size}; "
                        "the tokenizer file was replaced after prepare")
    return tok
