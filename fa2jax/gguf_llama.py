"""`load_gguf`: a llama.cpp GGUF file of a Llama model -> (TransformerConfig, Transformer).

`fa2jax.gguf_file.GGUFFile` reads the file (`read_metadata` its key-value pairs) and each tensor is
dequantised by the `gguf` package (llama.cpp's own, numpy, no torch: F32, F16, BF16, Q8_0, Q4_0/1,
Q5_0/1, the K-quants Q2_K..Q6_K, and the rest that it knows), one at a time, into the target
dtype, so no float32 copy of the whole model is held. `llama.*` metadata
maps onto `TransformerConfig` (`config_from_gguf`); an unknown `llama.*` key or tensor is a
ValueError naming it. The tokenizer is in the same file (`fa2jax.tokenizer.HFTokenizer.from_gguf`).

llama.cpp's converter (convert_hf_to_gguf.py) reorders the rows of each head of the query and key
projections: Hugging Face's RoPE rotates feature i with i + D/2 (as ours does), llama.cpp's
rotates adjacent pairs (2i, 2i + 1), so it interleaves the two halves of every head. Loading puts
them back (`unpermute_rows`). Tensors are stored row-major as [out, in] like torch's Linear, so
kernels are transposed into our [in, out] layouts as for Hugging Face folders.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax.config import RopeScalingConfig, TransformerConfig
from fa2jax.gguf_file import GGUFFile
from fa2jax.model import Transformer

ARCHITECTURES = ("llama",)
# `llama.*` keys that the mapping reads; any other is a setting the model may not express.
_READ_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "expert_count", "expert_used_count",
})
# llama.cpp tensor name -> our parameter path (as in `nnx.to_flat_state`); "{i}" is the layer.
TENSORS: dict[str, str] = {
    "token_embd.weight": "embed.embedding",
    "output_norm.weight": "final_norm.scale",
    "output.weight": "lm_head.kernel",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.scale",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.scale",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.query.kernel",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.key.kernel",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.value.kernel",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.out.kernel",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate.kernel",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up.kernel",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down.kernel",
}
# Tensors the model recomputes rather than reads.
_IGNORED = frozenset({"rope_freqs.weight"})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key-value pairs of a GGUF file (`general.*`, `llama.*`, `tokenizer.*`), as Python values."""
    return GGUFFile(path).metadata


def read_config(path: str | os.PathLike, **kwargs) -> TransformerConfig:
    """The TransformerConfig of a GGUF file (no tensor data read); kwargs as `config_from_gguf`."""
    file = GGUFFile(path)
    return config_from_gguf(file.metadata, set(file.tensors), **kwargs)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order: per head, rows (0, D/2, 1, D/2 + 1, ...) -> (0, 1, ..., D - 1).

    Args:
      weight: [heads * D, d_in] as stored in the GGUF (rows interleaved per head).
      heads: the projection's heads (query heads for attn_q, KV heads for attn_k).

    Returns:
      [heads * D, d_in] in Hugging Face's order (each head's first half, then its second).
    """
    rows, cols = weight.shape
    if rows % (2 * heads):
        raise ValueError(f"{weight.shape=} does not split into {heads=} heads of an even width")
    return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def config_from_gguf(metadata: dict[str, Any], tensor_names: set[str] | None = None, *, dtype=None,
                     param_dtype=None, attention_impl: str | None = None) -> TransformerConfig:
    """Maps GGUF metadata to a TransformerConfig, rejecting what the model cannot express.

    Args:
      metadata: from `read_metadata`.
      tensor_names: the file's tensors; an `output.weight` among them unties the embeddings
        (llama.cpp omits it for tied models). None: tied unless `llama.vocab_size` says otherwise.
      dtype: compute dtype; default the parameter dtype.
      param_dtype: parameter dtype; default float32 (what the quantised values dequantise to).
      attention_impl: as `TransformerConfig.attention_impl`.
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture={arch!r} is not mapped; mapped: {ARCHITECTURES}")
    unknown = sorted(k for k in metadata if k.startswith(f"{arch}.") and k.removeprefix(f"{arch}.") not in _READ_KEYS)
    if unknown:
        raise ValueError(f"GGUF metadata key {unknown[0]!r} is a setting this model does not map ({unknown=})")

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):  # per-layer values: the model has one setting for all layers
            if len(set(value)) != 1:
                raise ValueError(f"per-layer {arch}.{key}={value[:8]}... differ; the model has one value")
            value = value[0]
        return value

    if get("expert_count", 0):
        raise ValueError(f"mixture-of-experts models are not mapped: {arch}.expert_count={get('expert_count')}")
    num_heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", d_model // num_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{arch}.attention.value_length={get('attention.value_length')} differs from "
                         f"key_length={head_dim}; the model has one head width")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"partial rotary embeddings are not mapped: {arch}.rope.dimension_count="
                         f"{get('rope.dimension_count')} < head width {head_dim}")
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError(f"GGUF metadata gives no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    tied = "output.weight" not in tensor_names if tensor_names is not None else True
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    return TransformerConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        d_ff=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_len=int(get("context_length", 2048)),
        tie_embeddings=tied,
        dtype=dtype or param_dtype,
        param_dtype=param_dtype,
        attention_impl=attention_impl,
        rope_scaling=_rope_scaling(metadata, arch, tensor_names or set()),
    )


def _rope_scaling(metadata: dict, arch: str, tensor_names: set[str]) -> RopeScalingConfig | None:
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1's scaling is stored as a tensor of per-frequency factors, not as its parameters.
        raise ValueError("the GGUF holds rope_freqs.weight (Llama 3.1-style RoPE scaling as a factor tensor), "
                         "which is not mapped; load the Hugging Face folder instead")
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScalingConfig("linear", float(metadata[f"{arch}.rope.scaling.factor"]))
    raise ValueError(f"GGUF {arch}.rope.scaling.type={kind!r} is not mapped; mapped: 'none', 'linear'")


def _our_layout(name: str, value: np.ndarray, config: TransformerConfig) -> np.ndarray:
    """A dequantised GGUF tensor ([out, in] for matrices) in our parameter's layout."""
    H, K, D, d = config.num_heads, config.num_kv_heads, config.head_dim, config.d_model
    kind = name.split(".")[-2]
    if kind == "attn_q":
        return unpermute_rows(value, H).T.reshape(d, H, D)
    if kind == "attn_k":
        return unpermute_rows(value, K).T.reshape(d, K, D)
    if kind == "attn_v":
        return value.T.reshape(d, K, D)
    if kind == "attn_output":
        return value.T.reshape(H, D, d)
    if kind in ("ffn_gate", "ffn_up", "ffn_down", "output"):
        return value.T
    return value  # token_embd [V, d_model], norms [d_model]


def load_gguf(path: str | os.PathLike, *, dtype=None, param_dtype=None,
              attention_impl: str | None = None) -> tuple[TransformerConfig, Transformer]:
    """Loads a Llama model from a GGUF file, dequantising every tensor.

    Args:
      path: the .gguf file.
      dtype: compute dtype; default the parameter dtype.
      param_dtype: parameter dtype; default float32.
      attention_impl: "pallas" | "xla" | "cudnn" | None, see `TransformerConfig`.

    Returns:
      (config, model) with every parameter taken from the file.

    Raises:
      ValueError: the file is no GGUF, its architecture or a setting is not mapped, or a tensor is
        missing, unknown or of the wrong shape.
    """
    file = GGUFFile(path)
    tensors = file.tensors
    config = config_from_gguf(file.metadata, set(tensors), dtype=dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl)
    ours = {}
    for theirs, path_template in TENSORS.items():
        for i in range(config.num_layers) if "{i}" in theirs else [None]:
            ours[theirs.format(i=i)] = tuple(int(p) if p.isdigit() else p
                                             for p in path_template.format(i=i).split("."))
    unknown = sorted(set(tensors) - set(ours) - _IGNORED)
    if unknown:
        raise ValueError(f"the GGUF has tensors this architecture does not use: {unknown[:5]=}")
    by_path = {path: name for name, path in ours.items()}

    # Build the module abstractly (no random init of a possibly large model), then fill in its leaves.
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    filled = []
    for param_path, variable in nnx.to_flat_state(state):
        name = by_path.get(param_path)
        if name not in tensors:
            raise ValueError(f"the GGUF lacks a tensor the config needs: {name=} for {param_path=}")
        value = _our_layout(name, tensors[name].dequantize(), config)
        if value.shape != variable.shape:
            raise ValueError(f"shape mismatch for {name=}: stored {value.shape=}, model {variable.shape=}")
        filled.append((param_path, nnx.Param(jnp.asarray(value, config.param_dtype))))
    return config, nnx.merge(graphdef, nnx.from_flat_state(filled), rest)
