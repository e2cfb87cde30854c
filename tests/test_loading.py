"""fa2jax.load_pretrained / load_tokenizer / load_config on fa2jax run folders and checkpoints.

Hugging Face folders are covered in test_hf_llama.py (they need transformers to be written).
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import Transformer, TransformerConfig, load_pretrained, load_tokenizer, loading
from fa2jax import checkpoint as ckpt
from fa2jax.data import Document, pack_documents, split_documents, tokenize_documents
from fa2jax.loading import ModelFormat, load_config
from fa2jax.tokenizer import ByteTokenizer
from fa2jax.training import TrainConfig, train

SEQ = 16
MODEL = TransformerConfig.tiny(vocab_size=ByteTokenizer().vocab_size, max_len=SEQ)
DEMO = Path(__file__).resolve().parent.parent / "examples" / "checkpoints"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step examples/train.py-style run folder (checkpoints at steps 1 and 2)."""
    docs = [Document(f"f{i}.py", f"def f{i}(x):\n    return x + {i}\n" * 3) for i in range(20)]
    corpus, tok = split_documents(docs, 0.2), ByteTokenizer()
    rows = [pack_documents(tokenize_documents(tok, part), SEQ) for part in (corpus.train, corpus.val)]
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=SEQ, warmup_steps=0, log_every=1, eval_every=2, eval_batches=1,
                      checkpoint_every=1)
    out = tmp_path_factory.mktemp("run")
    train(MODEL, cfg, *rows, out, tok, progress=False)
    return out


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_run_folder_opens_its_newest_checkpoint(run):
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [1, 2]
    newest = run / "checkpoints" / "step_00000002"
    saved, _ = ckpt.load_checkpoint(newest, {"params": nnx.state(nnx.eval_shape(
        lambda: Transformer(MODEL, rngs=nnx.Rngs(0))), nnx.Param)}, strict=False)
    for path in (run, run / "checkpoints", newest):
        model = load_pretrained(path)
        assert isinstance(model, Transformer) and model.config == MODEL
        for got, want in zip(_params(model), jax.tree.leaves(saved["params"])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert isinstance(load_tokenizer(path), ByteTokenizer)
        assert ckpt.config_to_dict(load_config(path)) == ckpt.config_to_dict(MODEL)
    older = load_pretrained(run / "checkpoints" / "step_00000001")
    assert not all(np.array_equal(a, b) for a, b in zip(_params(older), _params(load_pretrained(run))))


def test_committed_demo_checkpoint():
    """A single checkpoint folder (params only), as examples/checkpoints holds."""
    model = load_pretrained(DEMO / "target" / "step_00003000")
    assert model.config.num_layers == 4 and model.config.vocab_size == 384
    tokenizer = load_tokenizer(DEMO / "target")
    ids = tokenizer.encode("import os\n")
    logits = model(jnp.asarray([ids], jnp.int32))
    assert logits.shape == (1, len(ids), 384) and bool(jnp.isfinite(logits).all())


def test_dtype_and_config_overrides(run):
    plain = load_pretrained(run)
    model = load_pretrained(run, dtype="bfloat16", max_len=64, invariant_rows=4, attention_impl="xla")
    c = model.config
    assert (c.dtype, c.param_dtype, c.max_len, c.invariant_rows, c.attention_impl) == (
        jnp.bfloat16, jnp.bfloat16, 64, 4, "xla")
    for got, want in zip(_params(model), _params(plain)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def test_errors_name_the_path_and_what_was_expected(run, tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty'.*expected a fa2jax checkpoint.*Hugging Face model folder"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
    ByteTokenizer().save(tmp_path / "tok.json")
    assert isinstance(load_tokenizer(tmp_path / "tok.json"), ByteTokenizer)
    with pytest.raises(ValueError, match="holds no model"):
        load_pretrained(tmp_path / "tok.json")
    with pytest.raises(ValueError, match="d_model"):
        load_pretrained(run, d_model=64)
    with pytest.raises(ValueError, match="not a TransformerConfig field"):
        load_pretrained(run, max_length=64)
    with pytest.raises(ValueError, match="pass dtype="):
        load_pretrained(run, param_dtype=jnp.float32)
    with pytest.raises(ValueError, match="floating"):
        load_pretrained(run, dtype=jnp.int32)


def test_a_new_format_is_one_table_entry(monkeypatch, tmp_path):
    """What a GGUF loader will do: add a ModelFormat; load_pretrained dispatches to it."""
    made = Transformer(MODEL, rngs=nnx.Rngs(3))
    toy = ModelFormat(name="toy", expects="a .toy file", matches=lambda path: path.suffix == ".toy",
                      load_model=lambda path, dtype: made, load_config=lambda path: MODEL,
                      load_tokenizer=lambda path: ByteTokenizer())
    monkeypatch.setattr(loading, "FORMATS", (*loading.FORMATS, toy))
    (tmp_path / "model.toy").write_text("")
    model = load_pretrained(tmp_path / "model.toy", max_len=48)
    assert model.config.max_len == 48
    for got, want in zip(_params(model), _params(made)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert isinstance(load_tokenizer(tmp_path / "model.toy"), ByteTokenizer)
    with pytest.raises(ValueError, match="a .toy file"):
        load_pretrained(tmp_path)
