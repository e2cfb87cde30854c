"""Flax NNX layers: RMSNorm, RoPE, the gated MLP, `MultiHeadAttention`, and `attention_fn` for stock Flax layers.

`MultiHeadAttention` mirrors `flax.nnx.MultiHeadAttention` (same parameter names `query`, `key`,
`value`, `out` with the same shapes, same call signature) and adds GQA, RoPE, windows, segment ids
and calls that read and write a `KVCache`. `attention_fn` plugs our attention into
`nnx.MultiHeadAttention(attention_fn=...)` and `linen.MultiHeadDotProductAttention(attention_fn=...)`.

RoPE follows the Llama / Hugging Face "rotate half" layout: feature i pairs with i + D/2 (not with
i + 1), so Llama checkpoints load without permuting their projection weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import attention, parallel_attention, sharding
from fa2jax.config import RopeScalingConfig
from fa2jax.kv_cache import KVCache


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale), with the statistics in float32 whatever the input dtype.

    offset 0 is Llama's norm (the normalised x is rounded to the compute dtype, then scaled); a
    nonzero offset is Gemma's (1 + w) norm, which multiplies in float32 and rounds once, as Gemma does.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, offset: float = 0.0, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; the argument keeps the usual nnx constructor shape
        self.epsilon = epsilon
        self.offset = offset
        self.dtype = dtype
        # Initialised to a gain of one whatever the offset.
        self.scale = nnx.Param(jnp.full((num_features,), 1.0 - offset, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., num_features]
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(dtype)
        return normed.astype(dtype) * self.scale[...].astype(dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None,
                     seq_len: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies [D/2] float32: theta ** (-2i / D), optionally rescaled for long contexts.

    Args:
        seq_len: "dynamic" scaling only: the call's longest position + 1 (a traced int is fine).
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [D/2]
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "dynamic":
        # NTK-aware scaling: past original_max_len the base grows so that the lowest frequency
        # stretches over the longer context, recomputed from the current length on every call.
        length = jnp.maximum(jnp.asarray(scaling.original_max_len if seq_len is None else seq_len, jnp.float32),
                             scaling.original_max_len)
        base = theta * (scaling.factor * length / scaling.original_max_len - (scaling.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents)
    if scaling.kind == "yarn":
        # YaRN (Peng et al. 2023, §3.2 "NTK-by-parts"): dimensions that turn fewer than beta_slow
        # times over the original context are interpolated, those turning more than beta_fast
        # times kept, with a linear ramp between.
        def dimension(rotations):
            return head_dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # a one-dimension ramp, not a division by zero
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)
    # "llama3": long wavelengths (beyond original_len / low_freq_factor) are slowed by `factor`, short
    # ones (below original_len / high_freq_factor) kept, and the band between interpolated linearly.
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = scaling.original_max_len / scaling.low_freq_factor
    high_wavelength = scaling.original_max_len / scaling.high_freq_factor
    smooth = (scaling.original_max_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelength > low_wavelength, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength <= low_wavelength) & (wavelength >= high_wavelength)
    return jnp.where(in_band, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotates feature pairs (i, i + D/2) of x by positions * inv_freq[i].

    Args:
        x: [B, T, H, D].
        positions: [B, T] integer positions.
        inv_freq: [D/2] float32 from `rope_frequencies`.
        scale: multiplies cos and sin (YaRN's attention factor; 1 otherwise).

    Returns:
        [B, T, H, D] in x's dtype (the rotation itself is computed in float32).
    """
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :] * scale  # [B, T, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :] * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its packed segment: [B, T] ids -> [B, T] int32, 0 at each start.

    A segment starts wherever the id differs from the previous token's.
    """
    T = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - last_start


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with act = silu (Llama), GeGLU with the tanh GELU (Gemma).

    Parameters: `gate`, `up` [d_model, d_ff] and `down` [d_ff, d_model]; with `fused` one `gate_up`
    [d_model, 2 * d_ff] (gate's columns, then up's) replaces gate and up: one matmul instead of two.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "silu", use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, fused: bool = False, rngs: nnx.Rngs):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{activation=} is not one of {tuple(_ACTIVATIONS)}")
        kwargs = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.d_ff = d_ff
        if fused:
            self.gate_up = nnx.Linear(d_model, 2 * d_ff, **kwargs)
            self.gate = self.up = nnx.data(None)
        else:
            self.gate_up = nnx.data(None)
            self.gate = nnx.Linear(d_model, d_ff, **kwargs)
            self.up = nnx.Linear(d_model, d_ff, **kwargs)
        self.down = nnx.Linear(d_ff, d_model, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, d_model]
        if self.gate_up is None:
            gate, up = self.gate(x), self.up(x)
        else:
            both = self.gate_up(x)  # [B, T, 2 * d_ff]
            gate, up = both[..., :self.d_ff], both[..., self.d_ff:]
        return self.down(_ACTIVATIONS[self.activation](gate) * up)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with GQA, RoPE, causal/window masks, segments, dropout and KV-cache calls.

    Parameters match `flax.nnx.MultiHeadAttention`: `query` [F, H, D], `key` / `value` [F, K, D],
    `out` [H, D, F_out] (LinearGeneral kernels, biases when `use_bias`). With `fused_qkv` one `qkv`
    [F, H + 2K, D] (query heads, then key heads, then value heads) replaces query, key and value:
    one matmul instead of three, for self-attention only.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        head_dim: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        kernel_init=nnx.initializers.lecun_normal(),
        out_kernel_init=None,
        bias_init=nnx.initializers.zeros_init(),
        use_bias: bool = True,
        is_causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        scale: float | None = None,
        rope_theta: float | None = None,
        rope_scaling: RopeScalingConfig | None = None,
        qk_norm: bool = False,
        norm_epsilon: float = 1e-6,
        norm_offset: float = 0.0,
        out_bias: bool | None = None,
        implementation: str | None = None,
        fused_qkv: bool = False,
        rngs: nnx.Rngs,
    ):
        """Args (beyond nnx.MultiHeadAttention's):
            head_dim: D, when it is not qkv_features // num_heads (qkv_features is then ignored).
            is_causal: default causality of __call__ (the call's `is_causal` overrides it).
            window_size: (left, right) local window, -1 = unbounded.
            softcap: logit softcap, 0 = off.
            scale: softmax scale of the scores, default head_dim ** -0.5.
            rope_theta: apply RoPE with this base to queries and keys; None = no RoPE.
            rope_scaling: optional RoPE rescaling.
            qk_norm: RMSNorm (`q_norm`, `k_norm`, over D) on queries and keys before RoPE.
            norm_epsilon / norm_offset: of those norms (see `RMSNorm`).
            out_bias: bias on the output projection; None = use_bias (Qwen2 has q/k/v biases only).
            implementation: "pallas" | "xla" | "cudnn" | None, see `fa2jax.dot_product_attention`.
            fused_qkv: one `qkv` projection instead of query/key/value (needs in_kv_features ==
                in_features; calls then take one input, self-attention).
        """
        num_kv_heads = num_kv_heads or num_heads
        if head_dim is None:
            qkv_features = qkv_features or in_features
            if qkv_features % num_heads:
                raise ValueError(f"qkv_features must be divisible by num_heads, got {qkv_features=} {num_heads=}")
            head_dim = qkv_features // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads, got {num_heads=} {num_kv_heads=}")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim=}")
        attention._check_implementation(implementation)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.is_causal = is_causal
        self.window_size = tuple(window_size)
        self.softcap = softcap
        self.scale = scale
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.implementation = implementation
        self.dtype = dtype

        def proj(in_f, heads):
            return nnx.LinearGeneral(in_f, (heads, head_dim), use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                                     rngs=rngs)

        in_kv_features = in_kv_features or in_features
        if fused_qkv:
            if in_kv_features != in_features:
                raise ValueError(f"fused_qkv projects one input, so in_kv_features must equal in_features, got "
                                 f"{in_kv_features=} {in_features=}")
            self.qkv = proj(in_features, num_heads + 2 * num_kv_heads)
            self.query = self.key = self.value = nnx.data(None)
        else:
            self.qkv = nnx.data(None)
            self.query = proj(in_features, num_heads)
            self.key = proj(in_kv_features, num_kv_heads)
            self.value = proj(in_kv_features, num_kv_heads)
        if qk_norm:
            norm = dict(epsilon=norm_epsilon, offset=norm_offset, dtype=dtype, param_dtype=param_dtype)
            self.q_norm = RMSNorm(head_dim, **norm)
            self.k_norm = RMSNorm(head_dim, **norm)
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        out_bias = use_bias if out_bias is None else out_bias
        self.out = nnx.LinearGeneral((num_heads, head_dim), self.out_features, axis=(-2, -1), use_bias=out_bias,
                                     dtype=dtype, param_dtype=param_dtype, kernel_init=out_kernel_init or kernel_init,
                                     bias_init=bias_init, rngs=rngs)
        self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None

    def _rope(self, x: jax.Array, positions: jax.Array | None, norm: RMSNorm | None) -> jax.Array:
        """The optional per-head norm, then RoPE: [B, T, heads, D] -> the same."""
        if norm is not None:
            x = norm(x)
        if self.rope_theta is None:
            return x
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        scaling = self.rope_scaling
        # "dynamic" scaling follows the longest position of the call, over the batch (as transformers does).
        seq_len = jnp.max(positions) + 1 if scaling is not None and scaling.kind == "dynamic" else None
        inv_freq = rope_frequencies(self.head_dim, self.rope_theta, scaling, seq_len)
        return apply_rope(x, positions, inv_freq, 1.0 if scaling is None else scaling.cos_sin_scale)

    def _linear_qkv(self, inputs_q, inputs_k, inputs_v):
        """The projections alone: queries [B, T, H, D], keys and values [B, S, K, D]."""
        if self.qkv is None:
            return self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
        if inputs_k is not inputs_q or inputs_v is not inputs_q:
            raise ValueError("a fused_qkv layer projects one input (self-attention): pass inputs_k=None and "
                             "inputs_v=None, or build the layer with fused_qkv=False")
        H, K = self.num_heads, self.num_kv_heads
        qkv = self.qkv(inputs_q)  # [B, T, H + 2K, D]
        return qkv[..., :H, :], qkv[..., H:H + K, :], qkv[..., H + K:, :]

    def project(self, inputs_q, inputs_kv, positions_q=None, positions_kv=None):
        """Queries [B, T, H, D] and keys/values [B, S, K, D], qk-norm and RoPE applied to queries and keys."""
        q, k, v = self._linear_qkv(inputs_q, inputs_kv, inputs_kv)
        return self._rope(q, positions_q, self.q_norm), self._rope(k, positions_kv, self.k_norm), v

    def __call__(
        self,
        inputs_q: jax.Array,  # [B, T, F]
        inputs_k: jax.Array | None = None,  # [B, S, F_kv]
        inputs_v: jax.Array | None = None,  # [B, S, F_kv]
        *,
        mask: jax.Array | None = None,  # [B|1, H|1, T, S], bool or nonzero = attend
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        is_causal: bool | None = None,
        segment_ids=None,
        positions: jax.Array | None = None,  # [B, T]
        kv_positions: jax.Array | None = None,  # [B, S]
        zigzag: bool = False,
    ) -> jax.Array:
        """Attention of inputs_q to inputs_k / inputs_v (self-attention when both are None).

        Args:
            mask: True where a query may attend to a key.
            deterministic: no dropout when True; defaults to the constructor's value.
            rngs: dropout randomness (else the stream forked at construction).
            is_causal: overrides the constructor's default.
            segment_ids: [B, T] (self-attention) or (q_ids [B, T], kv_ids [B, S]).
            positions / kv_positions: RoPE positions, default 0..T-1 / 0..S-1.
            zigzag: the sequence is in the zig-zag order of the context mesh's "context" axis
                (`pallas_kernels.fa2.ring.zigzag`; pass the positions of that order): with that
                axis of n > 1 devices, self-attention runs as ring attention over it
                (`fa2jax.parallel_attention.ring_self_attention`). `Transformer` sets it.

        Returns:
            [B, T, F_out].
        """
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_v needs inputs_k: pass the shared array as inputs_k alone")
            inputs_k = inputs_q
            if kv_positions is None:
                kv_positions = positions
        inputs_v = inputs_k if inputs_v is None else inputs_v
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"inputs_q must end in in_features={self.in_features}, got {inputs_q.shape=}")
        if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
            mask = jnp.asarray(mask) != 0  # Flax's mask helpers build float 0/1 masks
        q, k, v = self._linear_qkv(inputs_q, inputs_k, inputs_v)
        q = self._rope(q, positions, self.q_norm)
        k = self._rope(k, kv_positions, self.k_norm)
        dropout_rate, dropout_rng = 0.0, None
        if self.dropout_rate > 0:
            deterministic = self.deterministic if deterministic is None else deterministic
            if deterministic is None:
                raise ValueError("dropout_rate > 0 needs `deterministic` in the call or the constructor")
            if not deterministic:
                stream = self.rngs if rngs is None else rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
                if stream is None:
                    raise ValueError("dropout needs rngs: pass rngs= to the call")
                dropout_rate, dropout_rng = self.dropout_rate, stream()
        common = dict(mask=mask, is_causal=self.is_causal if is_causal is None else is_causal, scale=self.scale,
                      segment_ids=segment_ids, softcap=self.softcap, dropout_rate=dropout_rate,
                      implementation=self.implementation)
        if zigzag and sharding.context_shards() > 1:
            out = parallel_attention.ring_self_attention(q, k, v, window_size=self.window_size, **common)
        else:
            out = attention.dot_product_attention(q, k, v, local_window_size=self.window_size,
                                                  dropout_rng=dropout_rng, **common)
        return self.out(out)

    def prefill(self, inputs: jax.Array, cache: KVCache, layer: int) -> tuple[jax.Array, KVCache]:
        """Causal self-attention over right-padded rows that start at position 0; K/V written to slots [0, T).

        Padding after a row's true length is written too; it lies past the row's length, where later
        calls overwrite it and nothing reads it as context.

        Args:
            inputs: [B, T, F].
            cache: its `layer` is overwritten from slot 0; lengths are left to the caller.
            layer: static layer index.

        Returns:
            ([B, T, F_out], updated cache).
        """
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape[:2])
        q, k, v = self.project(inputs, inputs, positions, positions)
        cache = cache.write(layer, k, v, jnp.zeros_like(cache.lengths))
        out = attention.dot_product_attention(q, k, v, is_causal=True, local_window_size=self.window_size,
                                              scale=self.scale, softcap=self.softcap,
                                              implementation=self.implementation)
        return self.out(out), cache

    def extend(
        self,
        inputs: jax.Array,  # [B, T, F]
        positions: jax.Array,  # [B, T]
        cache: KVCache,
        layer: int,
        tree_mask: jax.Array | None = None,  # bool [T, T] or [B, T, T]
        batch_invariant: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Attends T new tokens to the cache after writing their K/V at slots cache.lengths + [0, T).

        Without `tree_mask` the tokens form a chain (decode: causal among themselves); with it they are
        tree nodes and node i sees node j only where tree_mask[i, j]. Lengths are not advanced.
        `batch_invariant` asks the tree attention for results independent of the prefix length
        (see `TransformerConfig.invariant_rows`). A layer with window_size (left, 0) lets a token
        see only keys at most `left` positions back (`fa2jax.tree_attention`'s `window`).

        Returns:
            ([B, T, F_out], cache with this layer's slots written).
        """
        left, right = self.window_size
        if right > 0:
            raise ValueError(f"cached attention is causal, so its window looks back only, got {self.window_size=}")
        q, k, v = self.project(inputs, inputs, positions, positions)
        cache = cache.write(layer, k, v, cache.lengths)
        keys, values = cache.layer_keys[layer], cache.layer_values[layer]  # [B, S, K, D]
        if tree_mask is None and batch_invariant:  # a chain, through the invariant tree walk
            tree_mask = np.tril(np.ones((q.shape[1],) * 2, bool))
        common = dict(scale=self.scale, softcap=self.softcap, window=left, implementation=self.implementation)
        if tree_mask is None:
            out = attention.decode_attention(q, keys, values, cache.lengths, **common)
        else:
            out = attention.tree_attention(q, keys, values, cache.lengths, tree_mask, batch_invariant=batch_invariant,
                                           **common)
        return self.out(out), cache


def attention_fn(
    query: jax.Array,  # [batch..., T, H, D]
    key: jax.Array,  # [batch..., S, K, D]
    value: jax.Array,  # [batch..., S, K, D]
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,  # bool, broadcastable to [batch..., H, T, S]
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Drop-in `attention_fn` for `nnx.MultiHeadAttention` and `linen.MultiHeadDotProductAttention`.

    Takes the arguments those layers pass (Flax's `dot_product_attention` signature). Choose an
    implementation with `functools.partial(attention_fn, implementation="pallas")`.

    Our dropout draws an independent pattern per batch row and head, so active dropout needs the layer
    built with `broadcast_dropout=False` (Flax's default, True, shares one pattern across batch and
    heads, which the kernels cannot reproduce). Attention weights cannot be sown (`sow_weights`), and
    `precision` is left to JAX's default matmul precision.

    Returns:
        [batch..., T, H, D].
    """
    del precision  # matmul precision follows jax_default_matmul_precision
    if module is not None:
        raise ValueError("fa2jax.attention_fn never materialises attention weights: call without sow_weights")
    dropping = dropout_rate > 0 and not deterministic
    if dropping and broadcast_dropout:
        raise ValueError(f"fa2jax.attention_fn drops weights per batch row and head; build the layer with "
                         f"broadcast_dropout=False (got {broadcast_dropout=}, {dropout_rate=})")
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    batch_shape = query.shape[:-3]
    T, H, D = query.shape[-3:]
    S, K = key.shape[-3], key.shape[-2]
    B = math.prod(batch_shape)

    def to_4d(x):  # broadcastable to [batch..., h, T, S] -> [B|1, h, T, S]
        x = jnp.asarray(x)
        rank = len(batch_shape) + 3
        x = x.reshape((1,) * (rank - x.ndim) + x.shape)
        if all(d == 1 for d in x.shape[:-3]):
            return x.reshape((1,) + x.shape[-3:])
        return jnp.broadcast_to(x, batch_shape + x.shape[-3:]).reshape((B,) + x.shape[-3:])

    out = attention.dot_product_attention(
        query.reshape(B, T, H, D), key.reshape(B, S, K, D), value.reshape(B, S, K, value.shape[-1]),
        bias=None if bias is None else to_4d(bias),
        mask=None if mask is None else to_4d(mask) != 0,
        is_causal=is_causal, dropout_rate=dropout_rate if dropping else 0.0,
        dropout_rng=dropout_rng if dropping else None, implementation=implementation)
    return out.reshape(batch_shape + (T, H, value.shape[-1]))
