"""`save_pretrained`: a Transformer -> a Hugging Face `LlamaForCausalLM` folder that `transformers` loads.

Writes config.json, the weights as safetensors (one `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` past `max_shard_bytes`),
generation_config.json (BOS and the eos ids), and the tokenizer's tokenizer.json and
tokenizer_config.json. The mapping is the inverse of the loader's: kernels are transposed to
torch's [out, in], heads flattened; no row permutation, since Hugging Face's Llama rotates feature
i with i + D/2 (`rotate_half`) as our `apply_rope` does. A config is exported only if the Llama
`config.json` written for it reads back (through `fa2jax.hf_llama.config_from_hf`) to the same
config; anything Llama cannot express is a ValueError naming the fields.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import save_file

from fa2jax.config import TransformerConfig
from fa2jax.fusion import unfuse_projections
from fa2jax.hf_llama import config_from_hf
from fa2jax.model import Transformer
from fa2jax.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

# Fields that do not describe the model's function: how it runs here, not what it computes.
# tokenizer_vocab_size only masks the padding rows of our logits: transformers has no such switch,
# so an exported padded vocabulary gives those rows ordinary logits there.
_RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "attention_impl", "invariant_rows", "tokenizer_vocab_size"})
_DTYPE_NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16",
                jnp.dtype(jnp.float16): "float16"}
# transformers reads `format` from a shard's metadata to pick the tensor framework.
_SHARD_METADATA = {"format": "pt"}
MAX_SHARD_BYTES = 5 * 10**9


def hf_config(config: TransformerConfig, *, bos_id: int | None = None, eos_ids=()) -> dict:
    """Our config as a Hugging Face Llama config.json dict.

    Raises:
      ValueError: the config uses something a Llama config.json cannot express.
    """
    dtype = jnp.dtype(config.param_dtype)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot store {config.param_dtype=} in a Hugging Face config; use one of "
                         f"{sorted(_DTYPE_NAMES.values())}")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling(config),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    eos_ids = list(eos_ids)
    if bos_id is not None:
        hf["bos_token_id"] = int(bos_id)
    if eos_ids:
        hf["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    back = config_from_hf(hf)
    differ = [f.name for f in dataclasses.fields(config)
              if f.name not in _RUNTIME_FIELDS and getattr(back, f.name) != getattr(config, f.name)]
    if differ:
        raise ValueError(f"a Hugging Face Llama config cannot express this model: {differ=} "
                         f"(ours {[getattr(config, n) for n in differ]}, Llama's {[getattr(back, n) for n in differ]})")
    return hf


def _rope_scaling(config: TransformerConfig) -> dict | None:
    s = config.rope_scaling
    if s is None:
        return None
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    if s.kind == "llama3":
        return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_len}
    raise ValueError(f"{s.kind=} RoPE scaling is not exported; exported: 'linear', 'llama3'")


def hf_tensors(model: Transformer) -> dict[str, jax.Array]:
    """The model's parameters under Hugging Face Llama names, in torch's layouts ([out, in] kernels).

    Raises:
      ValueError: the model has a parameter a Llama checkpoint has no place for.
    """
    c = model.config
    H, K, D, d = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
    # Our path -> (their name, [our layout] -> [their layout]).
    mapping = {("embed", "embedding"): ("model.embed_tokens.weight", lambda x: x),
               ("final_norm", "scale"): ("model.norm.weight", lambda x: x),
               ("lm_head", "kernel"): ("lm_head.weight", lambda x: x.T)}
    for i in range(c.num_layers):
        ours, theirs = ("layers", i), f"model.layers.{i}."
        mapping |= {
            ours + ("attn_norm", "scale"): (theirs + "input_layernorm.weight", lambda x: x),
            ours + ("mlp_norm", "scale"): (theirs + "post_attention_layernorm.weight", lambda x: x),
            ours + ("attn", "query", "kernel"): (theirs + "self_attn.q_proj.weight", lambda x: x.reshape(d, H * D).T),
            ours + ("attn", "key", "kernel"): (theirs + "self_attn.k_proj.weight", lambda x: x.reshape(d, K * D).T),
            ours + ("attn", "value", "kernel"): (theirs + "self_attn.v_proj.weight", lambda x: x.reshape(d, K * D).T),
            ours + ("attn", "out", "kernel"): (theirs + "self_attn.o_proj.weight", lambda x: x.reshape(H * D, d).T),
            ours + ("mlp", "gate", "kernel"): (theirs + "mlp.gate_proj.weight", lambda x: x.T),
            ours + ("mlp", "up", "kernel"): (theirs + "mlp.up_proj.weight", lambda x: x.T),
            ours + ("mlp", "down", "kernel"): (theirs + "mlp.down_proj.weight", lambda x: x.T),
        }
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path not in mapping:
            raise ValueError(f"a Hugging Face Llama checkpoint has no tensor for our parameter {path=}")
        name, to_theirs = mapping[path]
        tensors[name] = to_theirs(variable[...])
    return tensors


def _shards(tensors: dict[str, jax.Array], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for name, x in tensors.items():
        nbytes = x.size * x.dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _hf_tokenizer(tokenizer) -> HFTokenizer:
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.to_hf()
    raise TypeError(f"cannot write {type(tokenizer)=} as a Hugging Face tokenizer: expected an HFTokenizer "
                    f"(fa2jax.load_tokenizer, BPETokenizer) or a ByteTokenizer")


def save_pretrained(model: Transformer, folder: str | os.PathLike, tokenizer: Tokenizer | None = None, *,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes `model` (and `tokenizer`) as a Hugging Face Llama folder.

    `transformers.AutoModelForCausalLM.from_pretrained(folder)` then computes the same logits, and
    `AutoTokenizer.from_pretrained(folder)` the same token ids; `fa2jax.load_pretrained(folder)`
    reads it back too. Parameters keep their dtype (float32 training masters stay float32).

    Args:
      model: a `Transformer` whose config a Llama config.json can express.
      folder: created if missing; files of the same names are overwritten.
      tokenizer: an `HFTokenizer` (e.g. a trained `BPETokenizer`) or a `ByteTokenizer`; its eos
        and BOS ids go into config.json and generation_config.json. None: no tokenizer files.
      max_shard_bytes: the largest safetensors file; a larger model is split into shards with an index.

    Returns:
      The folder.

    Raises:
      ValueError: the model uses something Llama cannot express, or `max_shard_bytes` < 1.
      TypeError: `model` is no Transformer, or `tokenizer` is of a kind that has no tokenizer.json.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a fa2jax Transformer, got {type(model)=}")
    # Hugging Face stores separate projections; a model fused for decoding is split back.
    model = unfuse_projections(model)
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"{max_shard_bytes=} must be a positive int")
    hf_tok = None if tokenizer is None else _hf_tokenizer(tokenizer)
    bos = None if hf_tok is None else hf_tok.bos_id
    eos = [] if hf_tok is None else hf_tok.eos_ids
    config = hf_config(model.config, bos_id=bos, eos_ids=eos)
    if hf_tok is not None and hf_tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has more ids than the model: {hf_tok.vocab_size=} > "
                         f"{model.config.vocab_size=}")
    tensors = hf_tensors(model)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # shards of an earlier, differently split save
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file({n: jnp.asarray(tensors[n]) for n in shards[0]}, folder / "model.safetensors",
                  metadata=_SHARD_METADATA)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: jnp.asarray(tensors[n]) for n in names}, folder / file, metadata=_SHARD_METADATA)
            weight_map |= {n: file for n in names}
        total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1), encoding="utf-8")
    if hf_tok is not None:
        hf_tok.save_pretrained(folder)
    return folder
