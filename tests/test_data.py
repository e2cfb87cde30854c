"""Data pipeline and tokenizers: file discovery, split, packing, step-indexed batches, round trips."""
import numpy as np
import pytest

from fa2jax.data import (
    BatchSchedule,
    Document,
    PackedRows,
    eval_batches,
    find_documents,
    pack_documents,
    split_documents,
    tokenize_documents,
)
from fa2jax.tokenizer import BPETokenizer, ByteTokenizer, read_tokenizer_file

# Text that breaks naive tokenizers: leading/trailing/repeated spaces, tabs, CRLF, accents, CJK,
# an emoji (4-byte UTF-8) and a lone combining mark.
AWKWARD = "  def f(x):\r\n\treturn x  # héllo 日本語 🙂 e\u0301\n\n   "


def _random_docs(rng, n, max_len):
    return [rng.integers(1, 50, size=rng.integers(1, max_len)).astype(np.int32) for _ in range(n)]


# ---------------------------------------------------------------------------------------- packing


def test_pack_small_example_exactly():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10])]
    rows = pack_documents(docs, seq_len=4, pad_id=99)
    np.testing.assert_array_equal(rows.tokens, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 99, 99]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2], [1, 2, 2, 2], [1, 1, 0, 0]])
    # A document cut by a row boundary restarts at position 0 on the next row.
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 0, 0]])


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_pack_invariants(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = _random_docs(rng, 40, 30)
    rows = pack_documents(docs, seq_len)
    total = sum(d.size for d in docs)
    assert rows.tokens.shape == (-(-total // seq_len), seq_len)
    assert rows.tokens.dtype == rows.segment_ids.dtype == rows.positions.dtype == np.int32
    real = rows.segment_ids > 0
    # Every token kept, in order; padding only at the tail of the last row.
    np.testing.assert_array_equal(rows.tokens[real], np.concatenate(docs))
    assert real.sum() == total and real.reshape(-1)[:total].all()
    seg, pos = rows.segment_ids, rows.positions
    assert (seg[:, 0] == 1).all()
    step = np.diff(seg, axis=1)
    same = step == 0
    # Segments count up by one; positions count up by one inside a segment and restart at 0.
    assert ((step == 1) | same | ((step < 0) & (seg[:, 1:] == 0))).all()
    np.testing.assert_array_equal(pos[:, 1:][same & real[:, 1:]], pos[:, :-1][same & real[:, 1:]] + 1)
    assert (pos[:, 1:][step == 1] == 0).all()
    # A row holds each document at most once, so segment count = distinct documents touched.
    doc_of = np.repeat(np.arange(len(docs)), [d.size for d in docs])
    flat_doc = np.full(seg.size, -1)
    flat_doc[:total] = doc_of
    for r in range(seg.shape[0]):
        row_docs = flat_doc[r * seq_len : (r + 1) * seq_len]
        assert seg[r].max() == len(set(row_docs[row_docs >= 0]))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="seq_len=1"):
        pack_documents([np.array([1, 2])], seq_len=1)
    with pytest.raises(ValueError, match="nothing to pack"):
        pack_documents([np.array([], dtype=np.int32)], seq_len=4)
    with pytest.raises(ValueError, match="shape"):
        z = np.zeros((2, 3), np.int32)
        PackedRows(z, z, np.zeros((2, 4), np.int32))


def test_fingerprint_tracks_content():
    docs = [np.arange(1, 20)]
    a, b = pack_documents(docs, 8), pack_documents(docs, 8)
    c = pack_documents([np.arange(2, 21)], 8)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# ---------------------------------------------------------------------------------------- batches


def test_batch_schedule_is_a_function_of_step():
    rows = pack_documents(_random_docs(np.random.default_rng(0), 60, 40), 16)
    sched = BatchSchedule(rows, batch_size=4, seed=3)
    per_epoch = sched.batches_per_epoch
    assert per_epoch == rows.num_rows // 4
    # A fresh schedule (as after a restart) gives identical batches for the same step.
    again = BatchSchedule(rows, batch_size=4, seed=3)
    for s in (0, 1, per_epoch - 1, per_epoch, 3 * per_epoch + 2):
        a, b = sched.batch(s), again.batch(s)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert a["tokens"].shape == (4, 16)

    def row_ids(step):
        # Rows are distinct in this data, so identify each by its bytes.
        return [r.tobytes() for r in sched.batch(step)["tokens"]]

    epoch0 = [r for s in range(per_epoch) for r in row_ids(s)]
    assert len(set(epoch0)) == per_epoch * 4  # no row twice within an epoch
    epoch1 = [r for s in range(per_epoch, 2 * per_epoch) for r in row_ids(s)]
    assert epoch0 != epoch1  # reshuffled each epoch
    other_seed = BatchSchedule(rows, batch_size=4, seed=4)
    assert not np.array_equal(other_seed.batch(0)["tokens"], sched.batch(0)["tokens"])


def test_batch_schedule_rejects_too_little_data():
    rows = pack_documents([np.arange(1, 10)], 4)  # 3 rows
    with pytest.raises(ValueError, match="too little training data"):
        BatchSchedule(rows, batch_size=4)
    with pytest.raises(ValueError, match="step=-1"):
        BatchSchedule(rows, batch_size=2).batch(-1)


def test_eval_batches_pad_with_empty_rows():
    rows = pack_documents([np.arange(1, 40)], 8)  # 5 rows
    batches = list(eval_batches(rows, batch_size=2))
    assert len(batches) == 3 and all(b["tokens"].shape == (2, 8) for b in batches)
    assert (batches[-1]["segment_ids"][1] == 0).all()
    np.testing.assert_array_equal(
        np.concatenate([b["tokens"] for b in batches])[:5], rows.tokens
    )
    assert len(list(eval_batches(rows, batch_size=2, max_batches=1))) == 1


# -------------------------------------------------------------------------------- files and split


def test_find_documents_reads_text_only(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("print('b')\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: main\n")
    docs = find_documents([tmp_path])
    assert [d.name for d in docs] == ["a.txt", "pkg/b.py"]
    assert docs[1].text == "print('b')\n"
    assert [d.name for d in find_documents([tmp_path], suffixes=(".py",))] == ["pkg/b.py"]
    assert [d.name for d in find_documents([tmp_path / "a.txt"])] == ["a.txt"]
    with pytest.raises(ValueError, match="no such file"):
        find_documents([tmp_path / "missing"])


def test_find_documents_keeps_same_named_files_of_several_roots(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(f"# {folder}\n")
    docs = find_documents([tmp_path / "two", tmp_path / "one"])
    assert [(d.name, d.text) for d in docs] == [("one/__init__.py", "# one\n"), ("two/__init__.py", "# two\n")]
    with pytest.raises(ValueError, match="share"):
        find_documents([tmp_path / "one" / "__init__.py", tmp_path / "two" / "__init__.py"])


def test_default_corpus_is_the_stdlib():
    docs = find_documents()
    names = {d.name for d in docs}
    assert {"json/decoder.py", "argparse.py"} <= names
    assert not any("site-packages" in n or "__pycache__" in n for n in names)
    assert sum(len(d.text) for d in docs) > 5_000_000


def test_split_by_file_is_stable_and_disjoint():
    docs = [Document(f"dir/file_{i}.py", str(i)) for i in range(400)]
    corpus = split_documents(docs, val_fraction=0.1)
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.val}
    assert not train & val and len(train | val) == 400
    assert 15 <= len(val) <= 70  # about 40
    # The same files land in the same split whatever order they arrive in.
    shuffled = split_documents(list(reversed(docs)), val_fraction=0.1)
    assert shuffled == corpus
    # Adding files does not move existing ones.
    grown = split_documents(docs + [Document("new.py", "x")], val_fraction=0.1)
    assert val <= {d.name for d in grown.val} and train <= {d.name for d in grown.train}


def test_split_keeps_both_sides_non_empty():
    two = [Document("a", "1"), Document("b", "2")]
    for fraction in (0.001, 0.999):
        corpus = split_documents(two, fraction)
        assert len(corpus.train) == len(corpus.val) == 1
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        split_documents(two, 1.5)
    with pytest.raises(ValueError, match="two files"):
        split_documents(two[:1], 0.5)


# ------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(AWKWARD)
    assert max(ids) < 256 and tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids + [tok.eos_id]) == AWKWARD
    tok.save(tmp_path / "tok.json")
    assert isinstance(read_tokenizer_file(tmp_path / "tok.json"), ByteTokenizer)
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_bpe_tokenizer_round_trip_and_reload(tmp_path):
    corpus = [d.text for d in find_documents()[:40]]
    tok = BPETokenizer.train(corpus, vocab_size=600)
    assert tok.vocab_size == 600
    ids = tok.encode(AWKWARD)
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.eos_id not in ids
    assert tok.decode(ids) == AWKWARD
    # Merges were learned: common code compresses below one token per byte.
    code = corpus[0]
    assert len(tok.encode(code)) < 0.6 * len(code.encode("utf-8"))
    tok.save(tmp_path / "tok.json")
    loaded = read_tokenizer_file(tmp_path / "tok.json")
    assert loaded.encode(code) == tok.encode(code)
    assert loaded.eos_id == tok.eos_id and loaded.vocab_size == tok.vocab_size
    assert loaded.decode(tok.encode(code) + [tok.eos_id]) == code
    assert tok.encode_batch([code, AWKWARD]) == [tok.encode(code), ids]


def test_bpe_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        BPETokenizer.train(["abc"], vocab_size=100)
    (tmp_path / "bad.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="sentencepiece"):
        read_tokenizer_file(tmp_path / "bad.json")


def test_tokenize_documents_appends_eos():
    tok = ByteTokenizer()
    out = tokenize_documents(tok, [Document("a", "hi"), Document("b", "")])
    np.testing.assert_array_equal(out[0], [104, 105, 256])
    np.testing.assert_array_equal(out[1], [256])
    assert out[0].dtype == np.int32
