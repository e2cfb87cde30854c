"""`flash_attention_varlen`: packed variable-length sequences, as flash-attn's `flash_attn_varlen_func`.

The sequences arrive concatenated (`q [total_q, H, D]`, `k, v [total_k, K, D]`) with cumulative
lengths `cu_seqlens_q`, `cu_seqlens_k` ([num_seqs + 1], starting at 0). They run as one
`flash_attention` call of batch 1 on the segment-ids machinery, so the kernels, the tile skipping
(a tile whose query and key ids cannot match is never visited) and the custom VJP are the dense
ones; the forward and the backward both come from there.

Two layouts:
  * packed: without causal, window or ALiBi, rows stay where they are and each sequence is one
    segment (query ids and key ids are the sequence index); no copies beyond the ids.
  * aligned: causal masking, windows and ALiBi are per sequence and bottom-right aligned (query a
    of a sequence with T_b queries and S_b keys sits at key a + S_b - T_b, as flash-attn's varlen
    kernels do), but `flash_attention` aligns one global diagonal. So every sequence gets a slot
    of max(T_b, S_b) rows in which its queries and its keys are both right-aligned: the global
    diagonal (offset 0, the padded lengths being equal) then falls on every sequence's own. Slot
    padding gets segment ids that match nothing (queries 3b, keys 3b + 1, real rows 3b + 2 in
    slot b), so padded queries output zeros and padded keys are never seen, and whole padded
    tiles are skipped. A query row that sees no key (T_b > S_b under causal) outputs zeros.
The aligned length is exact when the cumulative lengths are concrete (or q and k share them); under
`jit` with traced lengths it is the static bound min(total_q + total_k, num_seqs x max(max_seqlen_q,
max_seqlen_k)), whose unused tail is skipped tile by tile.

Validation of `cu_seqlens_*` values (start 0, non-decreasing, end = total, each length at most
`max_seqlen_*`) runs when they are concrete; traced values are trusted, as flash-attn trusts them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common.checks import check_rank
from pallas_kernels.fa2.api import flash_attention


def _concrete(x) -> np.ndarray | None:
    """x as a NumPy array, or None when it is traced."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _check_cu_seqlens(name: str, cu, total: int, max_seqlen, max_name: str) -> jax.Array:
    """Checks one cumulative-lengths array and returns it as int32 [num_seqs + 1]."""
    array = cu if hasattr(cu, "dtype") else np.asarray(cu)
    if array.ndim != 1 or array.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D [num_seqs + 1] with num_seqs >= 1, got {array.shape=}")
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got {array.dtype=}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, np.integer)) or max_seqlen < 1:
        raise ValueError(f"{max_name} must be a positive int (static), got {max_seqlen=}")
    values = _concrete(cu)
    if values is not None:
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {name}[0]={values[0]}")
        lengths = np.diff(values)
        if (lengths < 0).any():
            raise ValueError(f"{name} must be non-decreasing, got {name}={values.tolist()}")
        if values[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}, got {name}[-1]={values[-1]}")
        if lengths.max() > max_seqlen:
            raise ValueError(f"a sequence is longer than {max_name}={max_seqlen}: {name}={values.tolist()}")
    return jnp.asarray(cu, jnp.int32)


def _sequence_of(cu: jax.Array, total: int) -> jax.Array:
    """int32 [total]: the sequence each packed row belongs to (empty sequences own no row)."""
    return (jnp.searchsorted(cu, jnp.arange(total, dtype=jnp.int32), side="right") - 1).astype(jnp.int32)


def _aligned_len(cu_q, cu_k, total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Static rows of the aligned layout: sum over sequences of max(T_b, S_b), or a bound of it."""
    if cu_q is cu_k:
        return total_q
    q, k = _concrete(cu_q), _concrete(cu_k)
    if q is not None and k is not None:
        return max(int(np.maximum(np.diff(q), np.diff(k)).sum()), 1)
    num_seqs = np.shape(cu_q)[0] - 1
    return min(total_q + total_k, num_seqs * max(max_seqlen_q, max_seqlen_k))


def _aligned_layout(cu_q: jax.Array, cu_k: jax.Array, total_q: int, total_k: int, length: int):
    """Slot layout: where each query and key row goes, and the segment ids of the slot rows.

    Returns:
      (q_dst [total_q], k_dst [total_k], q_ids [length], k_ids [length]) int32.
    """
    num_seqs = cu_q.shape[0] - 1
    t, s = jnp.diff(cu_q), jnp.diff(cu_k)  # [num_seqs]
    slot = jnp.maximum(t, s)
    slot_end = jnp.cumsum(slot)
    slot_start = slot_end - slot
    # A row's place: its slot's start, the slot's padding, then its index within the sequence.
    bq = _sequence_of(cu_q, total_q)
    q_dst = slot_start[bq] + slot[bq] - t[bq] + jnp.arange(total_q, dtype=jnp.int32) - cu_q[bq]
    bk = _sequence_of(cu_k, total_k)
    k_dst = slot_start[bk] + slot[bk] - s[bk] + jnp.arange(total_k, dtype=jnp.int32) - cu_k[bk]
    pos = jnp.arange(length, dtype=jnp.int32)
    b = jnp.searchsorted(slot_end, pos, side="right").astype(jnp.int32)  # num_seqs past the last slot
    bc = jnp.minimum(b, num_seqs - 1)
    local = pos - slot_start[bc]
    tail = b >= num_seqs
    q_ids = jnp.where(tail, 3 * num_seqs, jnp.where(local >= slot[bc] - t[bc], 3 * b + 2, 3 * b))
    k_ids = jnp.where(tail, 3 * num_seqs + 1, jnp.where(local >= slot[bc] - s[bc], 3 * b + 2, 3 * b + 1))
    return q_dst, k_dst, q_ids.astype(jnp.int32), k_ids.astype(jnp.int32)


def flash_attention_varlen(
    q: jax.Array,  # [total_q, H, D]
    k: jax.Array,  # [total_k, K, D]
    v: jax.Array,  # [total_k, K, D]
    cu_seqlens_q: jax.Array,  # [num_seqs + 1] int
    cu_seqlens_k: jax.Array,  # [num_seqs + 1] int
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_seed=None,
    return_lse: bool = False,
    block_sizes=None,
    interpret: bool | None = None,
    backend: str | None = None,
):
    """FlashAttention-2 over packed sequences of different lengths, forward and backward.

    Args:
      q: [total_q, H, D], the sequences' queries one after another; k, v: [total_k, K, D] with
        H % K == 0 (GQA/MQA).
      cu_seqlens_q, cu_seqlens_k: [num_seqs + 1] int cumulative lengths, 0 first, the totals
        last; sequence b is rows cu[b] .. cu[b + 1] - 1 (empty sequences allowed).
      max_seqlen_q, max_seqlen_k: static ints, at least every sequence's length.
      causal: per sequence, query a sees keys c <= a + S_b - T_b (bottom-right aligned, as
        flash-attn's varlen functions); a query that sees no key outputs zeros.
      sm_scale: softmax scale, default 1/sqrt(D).
      window_size: (left, right) per sequence, relative to the same bottom-right diagonal.
      softcap: > 0 replaces scores s by softcap * tanh(s / softcap).
      alibi_slopes: [H] float32, -slope * |a + S_b - T_b - c| added per sequence.
      dropout_rate, dropout_seed: as `flash_attention` (the keep-mask hashes packed positions).
      return_lse: also return the logsumexp [H, total_q] float32 (-inf for a query with no key).
      block_sizes, interpret, backend: as `flash_attention`.

    Returns:
      out [total_q, H, D] in q's dtype, and lse when `return_lse`.

    Raises:
      ValueError: for malformed arguments (ranks, cumulative lengths, slopes), before any kernel.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x.shape, 3)
    total_q, total_k = q.shape[0], k.shape[0]
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"{cu_q.shape=} and {cu_k.shape=}")
    if alibi_slopes is not None and np.shape(alibi_slopes) != (q.shape[1],):
        raise ValueError(f"alibi_slopes must be [H]={(q.shape[1],)} (one slope per head for every sequence), "
                         f"got {np.shape(alibi_slopes)=}")
    kwargs = dict(sm_scale=sm_scale, softcap=softcap, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                  return_lse=True, block_sizes=block_sizes, interpret=interpret, backend=backend)
    positional = causal or tuple(window_size) != (-1, -1) or alibi_slopes is not None
    if not positional:
        ids = (_sequence_of(cu_q, total_q)[None], _sequence_of(cu_k, total_k)[None])
        out, lse = flash_attention(q[None], k[None], v[None], segment_ids=ids, **kwargs)
        out, lse = out[0], lse[0]
    else:
        length = _aligned_len(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k)
        q_dst, k_dst, q_ids, k_ids = _aligned_layout(cu_q, cu_k, total_q, total_k, length)

        def place(x, dst):  # [total, n, D] -> [1, length, n, D], zeros in the padding
            return jnp.zeros((length,) + x.shape[1:], x.dtype).at[dst].set(x)[None]

        out, lse = flash_attention(
            place(q, q_dst), place(k, k_dst), place(v, k_dst), causal=causal, window_size=window_size,
            alibi_slopes=alibi_slopes, segment_ids=(q_ids[None], k_ids[None]), **kwargs)
        out, lse = out[0, q_dst], lse[0][:, q_dst]
    return (out, lse) if return_lse else out
