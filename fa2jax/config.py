"""`TransformerConfig`: the static shape and numerics of a Llama-style decoder and its relatives.

A frozen (hashable) dataclass, so a config can be a static argument of `jax.jit`. Presets are
classmethods that take field overrides: `TransformerConfig.tiny(vocab_size=128)`. The open-weight
families (Mistral, Qwen2/3, Gemma 2/3) are switches on the one decoder (biases, qk-norm, softcaps,
per-layer windows, norm offset, activation, post-norms, embedding scale); every switch defaults to
Llama's behaviour.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from fa2jax._deprecation import renamed_attributes

ATTENTION_IMPLEMENTATIONS = ("pallas", "xla", "cudnn")
ROPE_SCALING_TYPES = ("linear", "llama3", "yarn", "dynamic")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency rescaling for long contexts (the schemes Hugging Face checkpoints use).

    Attributes:
        kind: "linear" divides every frequency by `factor` (position interpolation); "llama3"
            divides only the low frequencies, blending smoothly between `low_freq_factor` and
            `high_freq_factor` wavelength bands (Llama 3.1's scheme); "yarn" interpolates the low
            frequencies and keeps the high ones, with a linear ramp between the dimensions that turn
            `beta_slow` and `beta_fast` times over `original_max_len`, and scales cos/sin by
            `attention_factor`; "dynamic" (NTK-aware) raises the RoPE base once a call's longest
            position passes `original_max_len`, as a function of that length (transformers'
            rule: past that length a cached call, a tree verification or a padded prefill rotates
            with the base of its own longest position, not of each token's).
        factor: how much longer the context is than the one the model was pre-trained on.
        low_freq_factor / high_freq_factor: "llama3" only.
        original_max_len: the pre-training context ("llama3", "yarn"); for "dynamic" the length
            past which the base grows (Hugging Face's max_position_embeddings).
        beta_fast / beta_slow / truncate: "yarn"'s ramp ends (in rotations) and whether they are
            rounded outwards to whole dimensions.
        attention_factor: "yarn"'s cos/sin multiplier; None = 0.1 * ln(factor) + 1 (the paper's).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"unsupported RoPE scaling, {self.kind=} is not one of {ROPE_SCALING_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor=}")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"llama3 RoPE scaling needs 0 < low < high, got {self.low_freq_factor=} {self.high_freq_factor=}")
        if not isinstance(self.original_max_len, int) or self.original_max_len < 1:
            raise ValueError(f"original_max_len must be a positive int, got {self.original_max_len=}")
        if self.kind == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError(f"yarn RoPE scaling needs beta_fast >= beta_slow, got {self.beta_fast=} {self.beta_slow=}")
        if self.attention_factor is not None and (self.kind != "yarn" or self.attention_factor <= 0):
            raise ValueError(f"attention_factor is a positive yarn setting, got {self.attention_factor=} "
                             f"with {self.kind=}")

    @property
    def cos_sin_scale(self) -> float:
        """What RoPE's cos and sin are multiplied by (1 except for "yarn")."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer: RMSNorm, RoPE, gated MLP, GQA attention.

    Attributes:
        vocab_size: V, number of token ids.
        d_model: width of the residual stream.
        num_layers: number of decoder blocks.
        num_heads: H, query heads.
        num_kv_heads: K, key/value heads; H % K == 0 (K == H is plain multi-head, K == 1 is MQA).
        head_dim: D, width of one head (need not equal d_model // H).
        d_ff: hidden width of the gated MLP.
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
        fused_projections: an inference layout with fewer, wider matmuls per layer: each block's
            query/key/value projections are one `attn.qkv` kernel [d_model, H + 2K, D] and the MLP's
            gate/up one `mlp.gate_up` kernel [d_model, 2 * d_ff] (gate columns first). Decoding at a
            small batch is bound by the number of kernels, not by the weights' bytes. Loaders,
            checkpoints, training and sharding use the separate projections: convert a loaded model
            with `fa2jax.fuse_projections` (and back with `fa2jax.unfuse_projections`).

    Family switches (the defaults are Llama's):
        qkv_bias / out_bias / mlp_bias: biases on the query/key/value projections (Qwen2), on the
            attention output, on the MLP projections.
        qk_norm: RMSNorm over each head's D features of queries and keys, before RoPE (Qwen3, Gemma 3).
        norm_offset: every RMSNorm multiplies by (norm_offset + scale), in float32 when nonzero
            (Gemma stores w for a (1 + w) gain).
        mlp_activation: gate activation of the MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
        post_norms: RMSNorm on the attention and MLP outputs before each residual add (Gemma 2/3).
        scale_embeddings: multiply embeddings by sqrt(d_model), rounded to the compute dtype (Gemma).
        attn_softcap: > 0 caps attention scores at softcap * tanh(s / softcap), after scaling.
        logit_softcap: > 0 caps the output logits likewise (Gemma 2's final_logit_softcapping).
        attn_scale: softmax scale of the scores; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5).
        layer_windows: () for full causal attention everywhere, else one entry per layer: 0 for full
            attention, W > 0 for a sliding window in which a token sees itself and the W - 1 tokens
            before it (Hugging Face's `sliding_window`). The KV cache keeps every position; cached
            calls of a windowed layer whose cache is longer than W mask it in dense attention (the
            Pallas tree kernel has no window, so attention_impl="pallas" raises there).
        local_rope_theta: when set, the layers with a window use this RoPE base without scaling
            (Gemma 3's local layers); None: every layer uses rope_theta and rope_scaling.
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
    fused_projections: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    mlp_activation: str = "silu"
    post_norms: bool = False
    scale_embeddings: bool = False
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    attn_scale: float | None = None
    layer_windows: tuple[int, ...] = ()
    local_rope_theta: float | None = None

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
        if not isinstance(self.fused_projections, bool):
            raise ValueError(f"fused_projections must be a bool, got {self.fused_projections=}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScalingConfig):
            raise ValueError(f"rope_scaling must be a RopeScalingConfig or None, got {self.rope_scaling=}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"{self.mlp_activation=} is not one of {MLP_ACTIVATIONS}")
        for name in ("attn_softcap", "logit_softcap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {name}={getattr(self, name)!r}")
        if self.attn_scale is not None and not self.attn_scale > 0:
            raise ValueError(f"attn_scale must be > 0 or None, got {self.attn_scale=}")
        if not isinstance(self.layer_windows, tuple):
            raise ValueError(f"layer_windows must be a tuple (hashable), got {self.layer_windows=}")
        if self.layer_windows and (len(self.layer_windows) != self.num_layers or not all(
                isinstance(w, int) and w >= 0 for w in self.layer_windows)):
            raise ValueError(f"layer_windows must be () or {self.num_layers} ints >= 0 (one per layer, 0 = full "
                             f"attention), got {self.layer_windows=}")
        if self.local_rope_theta is not None and self.local_rope_theta <= 0:
            raise ValueError(f"local_rope_theta must be > 0 or None, got {self.local_rope_theta=}")

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int:
        """W of layer `layer`'s sliding window (it sees itself and W - 1 earlier tokens); 0 = full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def layer_rope(self, layer: int) -> tuple[float, RopeScalingConfig | None]:
        """RoPE base and scaling of layer `layer` (local layers differ under `local_rope_theta`)."""
        if self.local_rope_theta is not None and self.layer_window(layer):
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

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
