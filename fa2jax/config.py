"""`TransformerConfig`: the static shape and numerics of a Llama-style decoder.

A frozen (hashable) dataclass, so a config can be a static argument of `jax.jit`. Presets are
classmethods that take field overrides: `TransformerConfig.tiny(vocab_size=128)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from fa2jax._deprecation import renamed_attributes

ATTENTION_IMPLEMENTATIONS = ("pallas", "xla", "cudnn")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency rescaling for long contexts (the two schemes Llama checkpoints use).

    Attributes:
        kind: "linear" divides every frequency by `factor` (position interpolation); "llama3"
            divides only the low frequencies, blending smoothly between `low_freq_factor` and
            `high_freq_factor` wavelength bands (Llama 3.1's scheme).
        factor: how much longer the context is than the one the model was pre-trained on.
        low_freq_factor / high_freq_factor / original_max_len: "llama3" only.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"unsupported RoPE scaling, {self.kind=} is not one of {ROPE_SCALING_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor=}")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"llama3 RoPE scaling needs 0 < low < high, got {self.low_freq_factor=} {self.high_freq_factor=}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer: RMSNorm, RoPE, SwiGLU MLP, GQA attention.

    Attributes:
        vocab_size: V, number of token ids.
        d_model: width of the residual stream.
        num_layers: number of decoder blocks.
        num_heads: H, query heads.
        num_kv_heads: K, key/value heads; H % K == 0 (K == H is plain multi-head, K == 1 is MQA).
        head_dim: D, width of one head (need not equal d_model // H).
        d_ff: hidden width of the SwiGLU MLP.
        rope_theta: RoPE base; frequencies are theta ** (-2i / D).
        norm_eps: RMSNorm epsilon.
        max_len: longest sequence the model is meant for (default KV cache size).
        tie_embeddings: logits reuse the input embedding matrix instead of a separate head.
        dtype: compute dtype of activations (logits are always float32).
        param_dtype: storage dtype of parameters.
        attention_impl: "pallas", "xla" or "cudnn"; None picks per call the best implementation
            that supports it on the current platform (see `fa2jax.dot_product_attention`).
        rope_scaling: optional long-context RoPE rescaling.
        invariant_rows: 0, or R > 0 to make cached calls batch-invariant: `decode` and `score_tree`
            then always run R token rows per sequence (the rest padding) and the cache attention
            walks fixed tiles, so a token's logits are bit for bit the same whether it is decoded
            alone or verified inside a chain of up to R nodes. On GPUs, matmul algorithms and
            attention splits depend on the row count and the prefix length, so without this greedy
            speculative decoding in bf16 can part from incremental decoding at near-ties. Caches
            then need R spare slots (the generate functions size them so).
        tokenizer_vocab_size: None, or the tokenizer's vocabulary when `vocab_size` was padded past
            it (examples/train.py rounds it up to a multiple for speed): the cached calls (prefill,
            decode, score_tree) give the padding rows [tokenizer_vocab_size, vocab_size) logit
            -inf, so no sampler picks an id no tokenizer can decode. `load_pretrained` sets it from
            a fa2jax checkpoint's tokenizer.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_len: int = 2048
    tie_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    rope_scaling: RopeScalingConfig | None = None
    invariant_rows: int = 0
    tokenizer_vocab_size: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                     "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got {self.num_heads=} and {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of features, so head_dim must be even, got {self.head_dim=}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta=}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps=}")
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"{self.attention_impl=} is not one of {ATTENTION_IMPLEMENTATIONS} (or None for automatic)")
        for name in ("dtype", "param_dtype"):
            dtype = jnp.dtype(getattr(self, name))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{name} must be a floating dtype, got {name}={dtype}")
        if not isinstance(self.invariant_rows, int) or self.invariant_rows < 0:
            raise ValueError(f"invariant_rows must be an int >= 0, got {self.invariant_rows=}")
        if self.tokenizer_vocab_size is not None and not (
                isinstance(self.tokenizer_vocab_size, int) and 1 <= self.tokenizer_vocab_size <= self.vocab_size):
            raise ValueError(f"tokenizer_vocab_size must be None or an int in [1, vocab_size={self.vocab_size}], got "
                             f"{self.tokenizer_vocab_size=}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScalingConfig):
            raise ValueError(f"rope_scaling must be a RopeScalingConfig or None, got {self.rope_scaling=}")

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **overrides) -> TransformerConfig:
        """A copy with some fields changed (checked again by __post_init__)."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> TransformerConfig:
        """A few-thousand-parameter model for CPU tests: compiles in seconds."""
        base = cls(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                   max_len=128)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def draft_20m(cls, **overrides) -> TransformerConfig:
        """~21M parameters with a 32k vocabulary (12M of them the tied embedding): a speculative draft.

        Four layers, not more: at batch 1 each layer's kernels take a few microseconds however
        small the matrices, so a draft pass costs about its layer count, and the draft runs once
        per tree level. The width goes into the MLP instead.
        """
        base = cls(vocab_size=32000, d_model=384, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=64,
                   d_ff=1536, max_len=2048, dtype=jnp.bfloat16)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def target_1b(cls, **overrides) -> TransformerConfig:
        """~1.1B parameters, TinyLlama-1.1B's shape (so its checkpoint fits): the speculative target."""
        base = cls(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64,
                   d_ff=5632, max_len=2048, tie_embeddings=False, dtype=jnp.bfloat16)
        return dataclasses.replace(base, **overrides)


# RopeScaling was renamed RopeScalingConfig (configs are named `...Config`).
__getattr__ = renamed_attributes(__name__, {"RopeScaling": ("RopeScalingConfig", RopeScalingConfig)})
