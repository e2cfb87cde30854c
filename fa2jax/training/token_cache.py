"""The tokenised, packed corpus of a run, cached in the run folder so that a resume does not tokenise again.

`<run>/tokenized.npz` holds the packed training and validation rows and a key: a SHA-256 over all
they were made from (each document's name and text, the tokenizer as its `save` writes it, the row
length T, and the settings of any generated documents). A run whose inputs give the same key reads
the rows back; any other key tokenises afresh and replaces the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fa2jax.data import Corpus, Document, PackedRows, pack_documents, tokenize_documents
from fa2jax.tokenizer import Tokenizer
from fa2jax.training import progress

CACHE_FILE = "tokenized.npz"
# Documents tokenised per call: big enough for the tokenizer's own threads, small enough for the bar to move.
_CHUNK = 64


def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    """The file `tokenizer.save` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        return path.read_bytes()


def corpus_key(corpus: Corpus, tokenizer: Tokenizer, seq_len: int, extra: dict | None = None) -> str:
    """The cache key of packing `corpus` with `tokenizer` into rows of `seq_len` (hex SHA-256).

    Args:
      extra: JSON-able settings of documents added later (e.g. teacher continuations), so that
        a hit skips generating them too.
    """
    h = hashlib.sha256()

    def add(data: bytes) -> None:  # length-prefixed: no two input lists hash alike
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    add(tokenizer_bytes(tokenizer))
    add(json.dumps({"seq_len": seq_len, "extra": extra or {}}, sort_keys=True).encode())
    for split in (corpus.train, corpus.val):
        add(str(len(split)).encode())
        for doc in split:
            add(doc.name.encode("utf-8"))
            add(doc.text.encode("utf-8"))
    return h.hexdigest()


def load(run_dir: str | os.PathLike, key: str) -> tuple[PackedRows, PackedRows] | None:
    """The cached (train, val) rows of `run_dir` if they were made under `key`, else None."""
    path = Path(run_dir) / CACHE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if str(data["key"]) != key:
                return None
            return tuple(PackedRows(data[f"{split}_tokens"], data[f"{split}_segment_ids"], data[f"{split}_positions"])
                         for split in ("train", "val"))
    except (OSError, ValueError, KeyError):  # a damaged cache is only a miss
        return None


def save(run_dir: str | os.PathLike, key: str, rows: tuple[PackedRows, PackedRows]) -> Path:
    """Writes the cache of `run_dir` (temp file + rename: a killed write leaves the old one or none)."""
    path = Path(run_dir) / CACHE_FILE
    arrays = {"key": np.asarray(key)}
    for split, r in zip(("train", "val"), rows):
        arrays.update({f"{split}_tokens": r.tokens, f"{split}_segment_ids": r.segment_ids,
                       f"{split}_positions": r.positions})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CACHE_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _tokenize(tokenizer: Tokenizer, docs: tuple[Document, ...], seq_len: int, show: bool, desc: str) -> PackedRows:
    chunks = [docs[i:i + _CHUNK] for i in range(0, len(docs), _CHUNK)]
    ids = []
    for chunk in progress.iterate(chunks, len(chunks), show, desc):
        ids.extend(tokenize_documents(tokenizer, chunk))
    return pack_documents(ids, seq_len, pad_id=tokenizer.eos_id)


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, seq_len: int, show_progress: bool = False
                    ) -> tuple[PackedRows, PackedRows]:
    """`fa2jax.data.pack_corpus`, tokenising in chunks under a progress bar (batches of documents)."""
    return (_tokenize(tokenizer, corpus.train, seq_len, show_progress, "tokenising training text"),
            _tokenize(tokenizer, corpus.val, seq_len, show_progress, "tokenising validation text"))
