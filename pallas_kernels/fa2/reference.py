"""Pure-jnp attention with f32 accumulation: the oracle every kernel is tested against.

Same signature and semantics as `flash_attention`; it materialises the [T, S] score matrix per head,
so use it on small shapes. GQA is computed by grouping query heads, without repeating K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fa2 import masking
from pallas_kernels.fa2.arguments import validate


def attention_reference(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    segment_ids=None,
    softcap: float = 0.0,
    alibi_slopes: jax.Array | None = None,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_seed=None,
    return_lse: bool = False,
    block_sizes=None,
    interpret: bool | None = None,
    precision=jax.lax.Precision.HIGHEST,
    compute_dtype=jnp.float32,
):
    """Attention computed densely in float32.

    Args: as `pallas_kernels.flash_attention`; `block_sizes` and `interpret` are accepted and ignored.
      `precision` sets the matmul precision (HIGHEST by default: this is the oracle).
      `compute_dtype` is the dtype of the matmul operands (f32 accumulation either way). Passing the
      inputs' own dtype gives "the same computation done by XLA in the input dtype", the baseline
      that kernel tolerances are stated against.

    Returns:
      out [B, T, H, D] in q's dtype, and lse [B, H, T] float32 (natural log, -inf for a fully masked
      row) when `return_lse`.
    """
    del block_sizes, interpret
    problem, segment_ids, alibi_slopes, mask = validate(
        q, k, v, causal=causal, sm_scale=sm_scale, window_size=window_size,
        segment_ids=segment_ids, softcap=softcap, alibi_slopes=alibi_slopes, mask=mask,
        dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = problem.group_size
    config = problem.mask_config

    qg = q.astype(compute_dtype).reshape(B, T, K, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(compute_dtype), precision=precision,
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(B, H, T, S) * problem.sm_scale  # head h = kv_head * G + g

    q_idx = jnp.arange(T, dtype=jnp.int32)[:, None]
    k_idx = jnp.arange(S, dtype=jnp.int32)[None, :]
    slope = None if alibi_slopes is None else alibi_slopes[:, :, None, None]
    scores = masking.modify_scores(scores, q_idx, k_idx, config, slope)

    allowed = masking.position_mask(q_idx, k_idx, config)[None, None]  # [1, 1, T, S]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        allowed = allowed & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    if mask is not None:
        allowed = allowed & mask
    probs, lse = masking.dense_softmax(scores, allowed)
    if problem.dropout_rate > 0:
        probs = masking.dense_dropout(probs, dropout_seed, problem.dropout_rate)

    probs = probs.reshape(B, K, G, T, S).astype(compute_dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(compute_dtype), precision=precision,
                     preferred_element_type=jnp.float32)
    out = out.reshape(B, T, H, D).astype(q.dtype)
    return (out, lse) if return_lse else out
