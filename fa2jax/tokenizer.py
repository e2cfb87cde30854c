"""Tokenizers for training: raw bytes, or a byte-level BPE trained with the `tokenizers` package.

Both map any Unicode text to ids and back without loss (byte-level: every string is a byte
sequence, so there is no unknown token). Each carries one special token, end-of-text, appended
after every document so a model learns where files end. A tokenizer saves itself as one JSON file
(`{"kind": ..., ...}`) that `load_tokenizer` reads back; the training script keeps it beside the
checkpoint so that resuming and later decoding use exactly the same vocabulary.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

EOS_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What training and decoding need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: str | os.PathLike) -> None: ...


def _write_json_atomic(path: Path, obj: dict) -> None:
    # Temp file + rename: a reader never sees a half-written tokenizer, even after a kill.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text as id 256."""

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= self.eos_id]
        if bad:
            raise ValueError(f"ids outside the byte vocabulary: {bad[:8]=}")
        # Model samples may split a multi-byte character; show those bytes as U+FFFD, don't fail.
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomic(Path(path), {"kind": "bytes"})


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by a `tokenizers.Tokenizer`."""

    def __init__(self, inner):
        """Wraps a trained `tokenizers.Tokenizer` that has `EOS_TOKEN` in its vocabulary."""
        self._inner = inner
        eos = inner.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN=} token")
        self._eos = int(eos)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learns merges from `texts`.

        Args:
          texts: the training documents (only the training split, so validation stays unseen).
          vocab_size: total vocabulary including the 256 byte symbols and end-of-text.

        Returns:
          The trained tokenizer.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        min_size = 256 + 1
        if vocab_size < min_size:
            raise ValueError(f"{vocab_size=} must be at least {min_size} (bytes + end-of-text)")
        inner = HFTokenizer(models.BPE())
        # No prefix space: a document must decode to exactly the text it came from.
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 byte symbols from the start, so no text is ever out of vocabulary.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(texts, trainer=trainer)
        return cls(inner)

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._inner.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomic(Path(path), {"kind": "bpe", "tokenizer": json.loads(self._inner.to_str())})


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Reads a tokenizer written by `ByteTokenizer.save` or `BPETokenizer.save`."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    kind = obj.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(obj["tokenizer"])))
    raise ValueError(f"unknown tokenizer {kind=} in {path=}")
