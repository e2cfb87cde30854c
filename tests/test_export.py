"""save_pretrained -> transformers: a Hugging Face Llama folder with the same logits and tokens."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

import fa2jax
from fa2jax import RopeScalingConfig, Transformer, TransformerConfig
from fa2jax.tokenizer import BPETokenizer

EXAMPLE_RUN = Path(__file__).parent.parent / "examples" / "checkpoints" / "draft"


def _transformers_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_trained_example_model_round_trip(tmp_path):
    """The committed examples/train.py run (ByteTokenizer, vocab padded to 384): transformers computes
    its logits and tokenises as it does, and fa2jax reads the folder back to the same model."""
    model, tok = fa2jax.load_pretrained(EXAMPLE_RUN), fa2jax.load_tokenizer(EXAMPLE_RUN)
    folder = fa2jax.save_pretrained(model, tmp_path / "hf", tok)
    assert {p.name for p in folder.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"}
    text = "import os\ndef main():\n    return 0  # é"
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert ids == tok.encode(text)
    tokens = np.array([ids, ids[::-1]])
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(_transformers_logits(folder, tokens), ours, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(fa2jax.load_pretrained(folder)(jnp.asarray(tokens))), ours)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 256


@pytest.mark.parametrize("tied,scaling", [(False, RopeScalingConfig("llama3", 4.0, original_max_len=32)),
                                          (True, RopeScalingConfig("linear", 2.0))])
def test_sharded_untied_and_rope_scaled_round_trip(tmp_path, tied, scaling):
    """GQA, untied head, RoPE scaling, bf16 parameters and several shards with an index."""
    config = TransformerConfig.tiny(vocab_size=300, tie_embeddings=tied, rope_scaling=scaling, max_len=64,
                                    param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    model = Transformer(config, rngs=nnx.Rngs(3))
    tok = BPETokenizer.train(["some text to learn merges from, some text"] * 5, 280)
    folder = fa2jax.save_pretrained(model, tmp_path, tok, max_shard_bytes=10_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and ("lm_head.weight" in index["weight_map"]) != tied
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tokens = np.random.default_rng(0).integers(0, 300, (2, 40))
    # Compare in float32: the same bf16 weights, computed without bf16 rounding on either side.
    ours = np.asarray(fa2jax.load_pretrained(folder, dtype=jnp.float32)(jnp.asarray(tokens)))
    model32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        theirs = model32(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    back = fa2jax.load_pretrained(folder)
    read = back.config.rope_scaling  # a linear scaling reads no original_max_len: the loader may fill in any
    assert (read.kind, read.factor) == (scaling.kind, scaling.factor) and back.config.param_dtype == jnp.bfloat16
    assert scaling.kind != "llama3" or read == scaling


def test_resave_replaces_the_old_shards(tmp_path):
    model = Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))
    fa2jax.save_pretrained(model, tmp_path, max_shard_bytes=10_000)
    fa2jax.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_save_pretrained_misuse(tmp_path):
    model = Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="Transformer"):
        fa2jax.save_pretrained({"params": 1}, tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):
        fa2jax.save_pretrained(model, tmp_path, tokenizer="gpt2")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        fa2jax.save_pretrained(model, tmp_path, max_shard_bytes=0)
    with pytest.raises(ValueError, match="vocab_size"):  # 257 byte ids do not fit 128 rows
        fa2jax.save_pretrained(model, tmp_path, tokenizer=fa2jax.tokenizer.ByteTokenizer())
