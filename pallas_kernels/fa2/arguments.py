"""Validation and normalisation of `flash_attention` arguments, shared by the kernels and the reference.

Every check runs on static shapes and Python values before any kernel is built, and raises a
`ValueError` that names the offending value (a `TypeError` for a value of the wrong kind: a float
window, or a traced scalar that the kernels must be specialised on).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common.checks import (
    check_finite, check_heads_and_dtypes, check_nonempty, check_rank, static_float, static_int)
from pallas_kernels.fa2.masking import MaskConfig


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
    """Static description of one attention call after validation.

    Arrays are normalised: segment ids become a (q_ids [B, T], kv_ids [B, S]) int32 pair, ALiBi
    slopes become [B, H] float32, the dense mask stays [B|1, H|1, T, S] bool.
    """

    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype
    sm_scale: float
    mask_config: MaskConfig
    dropout_rate: float

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA/MQA); K/V are indexed as head // group_size, never repeated."""
        return self.num_heads // self.num_kv_heads


def validate(
    q,
    k,
    v,
    *,
    causal,
    sm_scale,
    window_size,
    segment_ids,
    softcap,
    alibi_slopes,
    mask,
    dropout_rate,
    dropout_seed,
):
    """Checks every argument and returns (problem, segment_ids, alibi_slopes, mask) normalised."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x.shape, 4)
    batch, q_len, num_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape=} and {v.shape=}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k must be [B, S, K, D] with q's B and D, got {q.shape=} and {k.shape=}")
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"sequence lengths must be >= 1, got {q_len=} and {kv_len=}")
    check_heads_and_dtypes({"q": q, "k": k, "v": v})
    for name, x in (("q", q), ("k", k)):  # B = 0 or H = 0: no grid to launch
        check_nonempty(name, x.shape)

    if sm_scale is None:
        sm_scale = head_dim ** -0.5
    sm_scale = static_float("sm_scale", sm_scale)
    check_finite("sm_scale", sm_scale)

    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size=}")
    # Ints only: a float such as 1.5 is a mistake, not a window to truncate.
    try:
        window_left, window_right = (static_int(f"window_size[{i}]", w) for i, w in enumerate(window_size))
    except TypeError as error:
        raise TypeError(f"window_size must be a (left, right) pair of ints, -1 = unbounded, got {window_size=}: "
                        f"{error}") from None
    if window_left < -1 or window_right < -1:
        raise ValueError(f"window_size entries must be >= 0 or -1 (unbounded), got {window_size=}")

    softcap = static_float("softcap", softcap)
    check_finite("softcap", softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap=}")

    dropout_rate = static_float("dropout_rate", dropout_rate)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")
    if dropout_rate > 0 and dropout_seed is None:
        raise ValueError(f"dropout needs a seed: got {dropout_rate=} and dropout_seed=None")

    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(f"segment_ids must be (q_ids, kv_ids), got {len(segment_ids)=}")
            q_ids, kv_ids = (jnp.asarray(s) for s in segment_ids)
        else:
            q_ids = kv_ids = jnp.asarray(segment_ids)
            if q_len != kv_len:
                raise ValueError(
                    f"a single segment_ids array needs T == S, got {q_len=} and {kv_len=}: pass (q_ids, kv_ids)")
        if q_ids.shape != (batch, q_len):
            raise ValueError(f"query segment ids must be [B, T]={(batch, q_len)}, got {q_ids.shape=}")
        if kv_ids.shape != (batch, kv_len):
            raise ValueError(f"key segment ids must be [B, S]={(batch, kv_len)}, got {kv_ids.shape=}")
        for name, ids in (("q segment ids", q_ids), ("kv segment ids", kv_ids)):
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"{name} must be integers, got dtype={ids.dtype}")
        segment_ids = (q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32))

    if alibi_slopes is not None:
        alibi_slopes = jnp.asarray(alibi_slopes)
        if alibi_slopes.shape == (num_heads,):
            alibi_slopes = jnp.broadcast_to(alibi_slopes[None], (batch, num_heads))
        elif alibi_slopes.shape != (batch, num_heads):
            raise ValueError(
                f"alibi_slopes must be [H]={(num_heads,)} or [B, H]={(batch, num_heads)}, got {alibi_slopes.shape=}")
        alibi_slopes = alibi_slopes.astype(jnp.float32)

    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean, got {mask.dtype=}")
        if (mask.ndim != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, num_heads)
                or mask.shape[2:] != (q_len, kv_len)):
            raise ValueError(
                f"mask must be [B|1, H|1, T, S] with B={batch}, H={num_heads}, T={q_len}, S={kv_len}, "
                f"got {mask.shape=}")

    problem = AttentionProblem(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=jnp.dtype(q.dtype),
        sm_scale=sm_scale,
        mask_config=MaskConfig(
            q_len=q_len,
            kv_len=kv_len,
            causal=bool(causal),
            window_left=window_left,
            window_right=window_right,
            softcap=softcap,
        ),
        dropout_rate=dropout_rate,
    )
    return problem, segment_ids, alibi_slopes, mask
