"""Tokenizers: raw bytes or a byte-level BPE (trained here), and Hugging Face `tokenizer.json` files.

`ByteTokenizer` and `BPETokenizer` map any Unicode text to ids and back without loss (byte-level:
every string is a byte sequence, so there is no unknown token). Each carries one special token,
end-of-text, appended after every document so a model learns where files end. `HFTokenizer` wraps
the tokenizer of a Hugging Face model folder. A tokenizer saves itself as one JSON file
(`{"kind": ..., ...}`) that `read_tokenizer_file` reads back; the training script keeps it beside
the checkpoint so that resuming and later decoding use exactly the same vocabulary.
`fa2jax.load_tokenizer` opens any of these from a model folder.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from fa2jax._deprecation import renamed_attributes

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
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        min_size = 256 + 1
        if vocab_size < min_size:
            raise ValueError(f"{vocab_size=} must be at least {min_size} (bytes + end-of-text)")
        inner = RustTokenizer(models.BPE())
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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` with the end-of-text id of its model folder.

    Encoding adds the tokenizer's own special tokens (a Llama tokenizer prepends the BOS token its
    model was trained with); decoding drops them.
    """

    def __init__(self, inner, eos_id: int | None):
        """Wraps a `tokenizers.Tokenizer`; `eos_id` is the token that ends generation, or None."""
        self._inner = inner
        self._eos = eos_id

    @classmethod
    def from_folder(cls, directory: str | os.PathLike) -> HFTokenizer:
        """The tokenizer.json of a Hugging Face model folder, eos from its config.json."""
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"no tokenizer.json in the Hugging Face folder {str(directory)!r}")
        config = directory / "config.json"
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id") if config.is_file() else None
        # Llama 3 configs list several end tokens; the first is the end of text.
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(RustTokenizer.from_file(str(file)), None if eos is None else int(eos))

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._inner.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomic(Path(path), {"kind": "hf", "eos_id": self._eos,
                                        "tokenizer": json.loads(self._inner.to_str())})


def read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Reads a tokenizer written by the `save` method of any tokenizer above."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    kind = obj.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind in ("bpe", "hf"):
        from tokenizers import Tokenizer as RustTokenizer

        inner = RustTokenizer.from_str(json.dumps(obj["tokenizer"]))
        return BPETokenizer(inner) if kind == "bpe" else HFTokenizer(inner, obj["eos_id"])
    raise ValueError(f"unknown tokenizer {kind=} in {path=}")


# load_tokenizer was renamed read_tokenizer_file: `fa2jax.load_tokenizer` opens model folders too.
__getattr__ = renamed_attributes(__name__, {"load_tokenizer": ("read_tokenizer_file", read_tokenizer_file)})
