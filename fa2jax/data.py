"""Training text: find files, split by file, tokenize, pack into fixed rows, batch by step number.

The default corpus is the Python standard library of the running interpreter (about 1,800 `.py`
files, ~34 MB): real code that every machine has offline. Files go to the validation split by a
hash of their path relative to the folder they were found under, so the split is the same on
every machine and does not move when files are added elsewhere.

Packing concatenates the tokenized documents (each ending in end-of-text) into one stream and cuts
it into rows of T tokens. A document may run over a row boundary; its piece on the next row starts
again at position 0. Each row numbers its pieces 1, 2, ... in `segment_ids` (0 = padding, only
in the last row), so the attention kernel's segment mask keeps documents from seeing each other
and the loss skips targets that cross a boundary. Nothing is wasted on padding but the tail.

Batches are a pure function of the step number (epoch = step // batches_per_epoch, rows drawn
from a permutation seeded by (seed, epoch)), so resuming at step s reproduces the data order of
an uninterrupted run exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fa2jax.tokenizer import Tokenizer

# Folders inside the stdlib tree that are not the standard library itself.
_STDLIB_EXCLUDE = ("site-packages", "dist-packages", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # path relative to the folder it was found under; decides the split
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]
    val: tuple[Document, ...]


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text(path: Path) -> str | None:
    """The file's text if it is non-empty UTF-8 without NUL bytes, else None."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few stdlib test files are deliberately mis-encoded; skip rather than train on U+FFFD.
        return None


def find_documents(
    paths: Sequence[str | os.PathLike] | None = None,
    suffixes: Sequence[str] | None = None,
) -> list[Document]:
    """Reads every text file under `paths`, in a sorted, machine-independent order.

    Args:
      paths: files or folders. None means the standard library (`.py` files only, without
        site-packages).
      suffixes: keep only files whose name ends in one of these (e.g. (".py", ".md")); None keeps
        every file that decodes as UTF-8 without NUL bytes.

    Returns:
      The documents, sorted by name.
    """
    exclude: tuple[str, ...] = ()
    if paths is None:
        paths, suffixes, exclude = [stdlib_root()], (".py",), _STDLIB_EXCLUDE
    roots = [Path(p) for p in paths]
    docs: dict[str, Document] = {}
    for root in roots:
        # With several roots, names start with the root's own name so that a/x.py and b/x.py differ.
        prefix = f"{root.name}/" if len(roots) > 1 and root.is_dir() else ""
        if root.is_file():
            candidates = [(root, root.name)]
        elif root.is_dir():
            candidates = []
            for p in root.rglob("*"):
                rel = p.relative_to(root)
                if any(part in exclude or part.startswith(".") for part in rel.parts):
                    continue
                if p.is_file():
                    candidates.append((p, prefix + rel.as_posix()))
        else:
            raise ValueError(f"no such file or folder: {str(root)=}")
        for p, name in candidates:
            if suffixes is not None and not p.name.endswith(tuple(suffixes)):
                continue
            text = _read_text(p)
            if text is None:
                continue
            if name in docs:
                raise ValueError(f"two input files share the {name=}; pass their common parent folder")
            docs[name] = Document(name, text)
    return [docs[k] for k in sorted(docs)]


def _hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from a name (Python's hash() is salted per process)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], val_fraction: float) -> Corpus:
    """Puts about `val_fraction` of the files in validation, chosen by a hash of each name.

    With two or more files both splits are non-empty: if the hash picks no validation file, the
    file with the smallest hash goes there (and the reverse if it picks all of them).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{val_fraction=} must be in (0, 1)")
    if len(docs) < 2:
        raise ValueError(f"need at least two files to split by file, got {len(docs)=}")
    ranked = sorted(docs, key=lambda d: _hash_fraction(d.name))
    n_val = sum(_hash_fraction(d.name) < val_fraction for d in ranked)
    n_val = min(max(n_val, 1), len(ranked) - 1)
    by_name = lambda ds: tuple(sorted(ds, key=lambda d: d.name))  # noqa: E731
    return Corpus(train=by_name(ranked[n_val:]), val=by_name(ranked[:n_val]))


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> list[np.ndarray]:
    """Token ids of each document followed by end-of-text, as int32 arrays."""
    ids = tokenizer.encode_batch([d.text for d in docs])
    return [np.asarray(list(x) + [tokenizer.eos_id], dtype=np.int32) for x in ids]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Documents packed into N rows of T tokens (numpy, int32)."""

    tokens: np.ndarray  # [N, T]
    segment_ids: np.ndarray  # [N, T] 1..n within each row, 0 = padding
    positions: np.ndarray  # [N, T] index within the document piece, 0 on padding

    def __post_init__(self):
        shapes = {self.tokens.shape, self.segment_ids.shape, self.positions.shape}
        if len(shapes) != 1 or self.tokens.ndim != 2:
            raise ValueError(f"rows must share one [N, T] shape: {shapes=}")

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def fingerprint(self) -> str:
        """A hash of the packed data, stored in checkpoints to catch a resume on different data."""
        h = hashlib.sha256()
        for a in (self.tokens, self.segment_ids, self.positions):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, pad_id: int = 0) -> PackedRows:
    """Packs token sequences end to end into rows of `seq_len`, splitting at row boundaries.

    Args:
      docs: token ids of each document, [L_i] each, in packing order.
      seq_len: T, the row length.
      pad_id: token id written into the padding at the end of the last row.

    Returns:
      PackedRows with N = ceil(sum L_i / T) rows.
    """
    if seq_len < 2:
        raise ValueError(f"{seq_len=} must be at least 2 (a row needs an input and a target)")
    docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in docs]
    docs = [d for d in docs if d.size]
    if not docs:
        raise ValueError(f"nothing to pack: {len(docs)=} non-empty documents")
    lengths = np.array([d.size for d in docs])
    stream = np.concatenate(docs)  # [L]
    doc_of = np.repeat(np.arange(len(docs)), lengths)  # [L]
    total = stream.size
    rows = -(-total // seq_len)
    idx = np.arange(total)
    # A piece starts at every document start and at every row start.
    starts = (idx % seq_len == 0) | np.concatenate([[True], doc_of[1:] != doc_of[:-1]])
    piece = np.cumsum(starts)  # [L] global piece number, from 1
    first_piece_of_row = piece[idx - idx % seq_len]
    segment = piece - first_piece_of_row + 1
    piece_start = np.maximum.accumulate(np.where(starts, idx, 0))
    position = idx - piece_start

    def to_rows(values: np.ndarray, fill: int) -> np.ndarray:
        out = np.full(rows * seq_len, fill, dtype=np.int32)
        out[:total] = values
        return out.reshape(rows, seq_len)

    return PackedRows(
        tokens=to_rows(stream, pad_id),
        segment_ids=to_rows(segment, 0),
        positions=to_rows(position, 0),
    )


def _take(rows: PackedRows, index: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "tokens": rows.tokens[index],
        "segment_ids": rows.segment_ids[index],
        "positions": rows.positions[index],
    }


@dataclasses.dataclass(frozen=True, eq=False)
class BatchSchedule:
    """Training batches as a pure function of the step number.

    Each epoch visits every full batch of a fresh seeded permutation of the rows once (the
    remainder rows of that permutation are skipped, a different few each epoch).
    """

    rows: PackedRows
    batch_size: int  # rows per batch (all micro-batches of one optimizer step together)
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"{self.batch_size=} must be positive")
        if self.rows.num_rows < self.batch_size:
            raise ValueError(
                f"too little training data: {self.rows.num_rows=} rows < {self.batch_size=}; "
                "use more text, a shorter sequence or a smaller batch"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.rows.num_rows // self.batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """The rows of optimizer step `step` (0-based), [B] indices into `rows`."""
        if step < 0:
            raise ValueError(f"{step=} must be non-negative")
        epoch, i = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.rows.num_rows)
        return order[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of optimizer step `step` (0-based): tokens/segment_ids/positions, [B, T]."""
        return _take(self.rows, self.indices(step))


def eval_batches(
    rows: PackedRows, batch_size: int, max_batches: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """The rows in order, in batches of `batch_size`; the last batch is filled with padding rows.

    Padding rows have segment id 0 everywhere, so they add nothing to a masked loss, and every
    batch keeps the same [B, T] shape (one compilation).
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be positive")
    n = rows.num_rows if max_batches is None else min(rows.num_rows, max_batches * batch_size)
    for lo in range(0, n, batch_size):
        batch = _take(rows, np.arange(lo, min(lo + batch_size, n)))
        short = batch_size - batch["tokens"].shape[0]
        if short:
            batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
        yield batch


def pack_corpus(corpus: Corpus, tokenizer: Tokenizer, seq_len: int) -> tuple[PackedRows, PackedRows]:
    """Tokenizes and packs both splits (padding with end-of-text); returns (train, val) rows."""
    return tuple(
        pack_documents(tokenize_documents(tokenizer, docs), seq_len, pad_id=tokenizer.eos_id)
        for docs in (corpus.train, corpus.val)
    )


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a prompt file: JSON Lines with a "prompt" field per line (other fields, e.g.
    "kind", are ignored), or, for any other suffix, plain text with one prompt per non-empty line.

    Raises:
      ValueError: the file holds no prompt, or a JSONL line has no string "prompt" (line named).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{str(path)!r} line {number}: need an object with a string 'prompt', got {line=}")
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"no prompt in {str(path)=}")
    return prompts


def read_jsonl_documents(path: str | os.PathLike, field: str = "text") -> list[Document]:
    """One document per line of a JSON Lines file: the string `field` of each object, named
    <file name>/<line number> (so `split_documents` splits by line, not by file).

    Raises:
      ValueError: a line is not an object with a string `field` (line named), or the file is empty.
    """
    path = Path(path)
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{str(path)!r} line {number}: need an object with a string {field!r}")
        docs.append(Document(f"{path.name}/{number}", record[field]))
    if not docs:
        raise ValueError(f"no document in {str(path)=}")
    return docs
