"""Which (query, key) pairs attend, and how a raw score is modified: one source for every backend.

The reference applies these functions to whole [T, S] index grids; the kernels apply the very same
functions to one [block_q, block_k] tile. Indices are absolute positions in the unpadded sequences:
query `i` in [0, T), key `j` in [0, S). Queries are aligned to the end of the keys ("bottom-right"),
so query `i` sits at key position `i + S - T` (FA2's convention for T != S).

Order of operations on a score (FA2 / Gemma-2 convention):
    s = (q . k) * sm_scale
    s = softcap * tanh(s / softcap)          if softcap > 0
    s = s - slope * |i + S - T - j|          if ALiBi
    s = -inf where the pair is masked        (causal, window, segments, dense mask, key padding)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """The static (compile-time) description of the attention pattern.

    Attributes:
        q_len: T, the unpadded query length.
        kv_len: S, the unpadded key length. Keys at j >= S (kernel padding) are always masked.
        causal: query i sees keys j <= i + S - T.
        window_left / window_right: FA2 local window, -1 = unbounded on that side.
        softcap: > 0 applies softcap * tanh(s / softcap).
    """

    q_len: int
    kv_len: int
    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0

    @property
    def diagonal_offset(self) -> int:
        """Key position of query 0: queries are aligned to the end of the keys."""
        return self.kv_len - self.q_len

    @property
    def right_limit(self) -> int | None:
        """Largest j - (i + offset) allowed, or None when unbounded."""
        limits = [w for w in (0 if self.causal else -1, self.window_right) if w >= 0]
        return min(limits) if limits else None

    @property
    def left_limit(self) -> int | None:
        """Largest (i + offset) - j allowed, or None when unbounded."""
        return self.window_left if self.window_left >= 0 else None

    def key_range(self, q_start, q_stop):
        """Keys [lo, hi) that queries [q_start, q_stop) may see by position alone.

        Works on Python ints and traced int32 scalars alike; used to bound the kernels' KV loops so
        that tiles wholly outside the causal/window band are never visited (FA2 §3.1: block skipping).
        """
        lo, hi = 0, self.kv_len
        if self.left_limit is not None:
            lo = jnp.maximum(q_start + self.diagonal_offset - self.left_limit, 0)
        if self.right_limit is not None:
            hi = jnp.minimum(q_stop - 1 + self.diagonal_offset + self.right_limit + 1, self.kv_len)
        return lo, hi

    def full_key_range(self, q_start, q_stop):
        """Keys [lo, hi) that EVERY query in [q_start, q_stop) sees by position: tiles wholly inside
        need no mask arithmetic at all (hi may be <= lo: no such keys)."""
        lo, hi = 0, self.kv_len
        if self.left_limit is not None:
            lo = jnp.maximum(q_stop - 1 + self.diagonal_offset - self.left_limit, 0)
        if self.right_limit is not None:
            hi = jnp.minimum(q_start + self.diagonal_offset + self.right_limit + 1, self.kv_len)
        return lo, hi

    def full_query_range(self, k_start, k_stop):
        """Queries [lo, hi) that see EVERY key in [k_start, k_stop) by position (the inverse)."""
        lo, hi = 0, self.q_len
        if self.right_limit is not None:
            lo = jnp.maximum(k_stop - 1 - self.diagonal_offset - self.right_limit, 0)
        if self.left_limit is not None:
            hi = jnp.minimum(k_start + self.left_limit - self.diagonal_offset + 1, self.q_len)
        return lo, hi

    def query_range(self, k_start, k_stop):
        """Queries [lo, hi) that may see keys [k_start, k_stop) by position alone (the inverse band)."""
        lo, hi = 0, self.q_len
        if self.right_limit is not None:
            lo = jnp.maximum(k_start - self.diagonal_offset - self.right_limit, 0)
        if self.left_limit is not None:
            hi = jnp.minimum(k_stop - 1 + self.left_limit - self.diagonal_offset + 1, self.q_len)
        return lo, hi


def position_mask(q_idx: jax.Array, k_idx: jax.Array, config: MaskConfig) -> jax.Array:
    """Causal / window / key-padding mask. q_idx [Tq, 1], k_idx [1, Tk] int32 -> bool [Tq, Tk].

    Padded query rows (i >= T) are left unmasked: their outputs are sliced away and their zero
    output-gradients contribute nothing to dK/dV.
    """
    allowed = k_idx < config.kv_len
    relative = k_idx - (q_idx + config.diagonal_offset)  # > 0: key is in the query's future
    if config.right_limit is not None:
        allowed &= relative <= config.right_limit
    if config.left_limit is not None:
        allowed &= -relative <= config.left_limit
    return allowed


def apply_softcap(scores: jax.Array, config: MaskConfig) -> tuple[jax.Array, jax.Array | None]:
    """softcap * tanh(s / softcap), and its derivative 1 - tanh^2 for the backward (None if off)."""
    if config.softcap <= 0:
        return scores, None
    t = jnp.tanh(scores / config.softcap)
    return config.softcap * t, 1.0 - t * t


def apply_alibi(scores: jax.Array, q_idx: jax.Array, k_idx: jax.Array, config: MaskConfig,
                alibi_slope: jax.Array | None) -> jax.Array:
    """s - slope * |i + S - T - j|; alibi_slope broadcasts to [..., 1, 1]; None leaves s alone."""
    if alibi_slope is None:
        return scores
    distance = jnp.abs(q_idx + config.diagonal_offset - k_idx).astype(jnp.float32)
    return scores - alibi_slope * distance


def modify_scores(
    scores: jax.Array,
    q_idx: jax.Array,
    k_idx: jax.Array,
    config: MaskConfig,
    alibi_slope: jax.Array | None = None,
) -> jax.Array:
    """Softcap then ALiBi on scaled f32 scores [..., Tq, Tk]."""
    scores, _ = apply_softcap(scores, config)
    return apply_alibi(scores, q_idx, k_idx, config, alibi_slope)


# Dropout: a counter-based hash of (seed, batch, head, query, key), so the forward kernel, the backward
# kernels and the reference all rebuild the same keep-mask from indices alone, with nothing stored.
# The mixer is the murmur3 32-bit finaliser (public domain); uint32 arithmetic wraps, as intended.
_GOLDEN = 0x9E3779B9
_KEY_STRIDE = 0x632BE5AB
DROPOUT_BITS = 24  # compare the top 24 bits: exact in int32 on every backend


def _fmix32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_stream(seed: jax.Array, batch: jax.Array, head: jax.Array) -> jax.Array:
    """One uint32 per (seed, batch, head): the base of that head's dropout stream."""
    seed = jnp.asarray(seed).astype(jnp.uint32)
    bh = jnp.asarray(batch).astype(jnp.uint32) * jnp.uint32(_GOLDEN) + jnp.asarray(head).astype(jnp.uint32)
    return _fmix32(seed ^ _fmix32(bh + jnp.uint32(1)))


def dropout_keep(stream: jax.Array, q_idx: jax.Array, k_idx: jax.Array, rate: float) -> jax.Array:
    """bool keep-mask for pairs (q_idx, k_idx) [Tq, 1] x [1, Tk] of one (batch, head) stream."""
    row = _fmix32(stream ^ (q_idx.astype(jnp.uint32) * jnp.uint32(_GOLDEN)))
    bits = _fmix32(row + k_idx.astype(jnp.uint32) * jnp.uint32(_KEY_STRIDE))
    threshold = int(round(rate * (1 << DROPOUT_BITS)))
    return (bits >> (32 - DROPOUT_BITS)).astype(jnp.int32) >= threshold


def dense_softmax(scores: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked softmax over the last axis of dense f32 scores, as the dense (XLA) paths compute it.

    Returns (probs, lse): a fully masked row gets all-zero probabilities and lse = -inf, never NaN.
    Softmax is shift-invariant, so the row max carries no gradient.
    """
    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalised = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    nonempty = row_sum > 0
    safe_sum = jnp.where(nonempty, row_sum, 1.0)
    lse = jnp.where(nonempty, row_max + jnp.log(safe_sum), -jnp.inf)[..., 0]
    return unnormalised / safe_sum, lse


def dense_dropout(probs: jax.Array, seed, rate: float) -> jax.Array:
    """Dropout on dense probabilities [B, H, T, S] with the kernels' keep-mask, rescaled by 1/(1-rate)."""
    B, H, T, S = probs.shape
    streams = dropout_stream(seed, jnp.arange(B, dtype=jnp.int32)[:, None],
                             jnp.arange(H, dtype=jnp.int32)[None, :])[:, :, None, None]  # [B, H, 1, 1]
    keep = dropout_keep(streams, jnp.arange(T, dtype=jnp.int32)[:, None],
                        jnp.arange(S, dtype=jnp.int32)[None, :], rate)
    return jnp.where(keep, probs / (1.0 - rate), 0.0)
