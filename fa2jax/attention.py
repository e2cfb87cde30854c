"""`dot_product_attention` and the cache attentions, dispatched to Pallas, XLA or cuDNN.

`dot_product_attention` keeps `jax.nn.dot_product_attention`'s argument names and [B, T, H, D]
layout and adds what FlashAttention-2 supports besides: a (left, right) window, packed-sequence
segment ids, logit softcapping and attention dropout. `tree_attention` and `decode_attention`
attend new tokens to a `KVCache` row (see `pallas_kernels`).

Implementations:
    "pallas": `pallas_kernels` (FlashAttention-2 kernels; interpreted on CPU, so slow there).
    "xla":    plain jnp, materialising the [T, S] scores; f32 softmax, matmuls in the input dtype.
    "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")`; CUDA GPUs, fp16/bf16 only.
None picks, per call, the first of pallas > cudnn > xla that supports the arguments on the current
platform (on CPU always xla) and logs the choice once; where `measured_fastest.json` records cuDNN
as faster on this GPU for the call's dtype, head dim and features, cuDNN comes first. An implementation asked for by name is never
swapped for another: arguments it cannot honour raise a ValueError that says why.

Conventions shared by every implementation (and by `pallas_kernels`):
    * causal masking is aligned bottom-right when T != S (query i sits at key i + S - T), as in FA2;
      `jax.nn.dot_product_attention` aligns top-left, so the two differ only when T != S.
    * a query that may see no key at all gets a zero output (jax.nn and Flax give the mean of V).
    * dropout keeps a pair with a counter-based hash of (seed, batch, head, query, key), so every
      implementation drops the same pairs for the same `dropout_rng`.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib

import jax
import jax.numpy as jnp

from fa2jax import parallel_attention
from pallas_kernels.common.device import device_kind
from pallas_kernels.fa2 import masking
from pallas_kernels.fa2.block_sizes import cache_key, feature_names
from pallas_kernels.fa2.arguments import validate

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("pallas", "xla", "cudnn")
MEASURED_FASTEST = pathlib.Path(__file__).with_name("measured_fastest.json")
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# Padding ids for folded sequence lengths: a padded query matches no key, a padded key no query.
_PAD_QUERY_ID = jnp.iinfo(jnp.int32).min
_PAD_KEY_ID = jnp.iinfo(jnp.int32).min + 1


@functools.cache
def _log_choice(op: str, implementation: str, reason: str) -> None:
    """Logs each distinct automatic choice once per process (functools.cache remembers it)."""
    logger.info("fa2jax %s: implementation=None chose %r (%s)", op, implementation, reason)


def _check_implementation(implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{implementation=} is not one of {IMPLEMENTATIONS} or None")


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _measured_cudnn_faster(query, **features) -> bool:
    """Whether fa2jax/measured_fastest.json records cuDNN as faster (fwd + bwd) than our kernels for
    this device, dtype, head dim and feature set (exact key: an unmeasured call keeps the Pallas kernels)."""
    key = cache_key(device_kind(), query.dtype, query.shape[-1], feature_names(**features))
    return _measured_fastest().get(key, {}).get("fastest") == "cudnn"


@functools.cache
def _measured_fastest() -> dict:
    return json.loads(MEASURED_FASTEST.read_text())


def _dropout_seed(dropout_rate: float, dropout_rng) -> jax.Array | None:
    """A uint32 seed for the dropout hash from a PRNG key (raw uint32[2] or typed)."""
    if dropout_rate <= 0:
        return None
    if dropout_rng is None:
        raise ValueError(f"dropout needs a key: got {dropout_rate=} and dropout_rng=None")
    return jax.random.bits(dropout_rng, (), jnp.uint32)


def _window(local_window_size) -> tuple[int, int]:
    if local_window_size is None:
        return (-1, -1)
    if isinstance(local_window_size, int):
        return (local_window_size, local_window_size)
    left, right = local_window_size
    return (int(left), int(right))


def _fold_lengths(segment_ids, query_seq_lengths, key_value_seq_lengths, batch, q_len, kv_len):
    """Turns per-row valid lengths into segment ids (combined with any given), or returns them as is."""
    if query_seq_lengths is None and key_value_seq_lengths is None:
        return segment_ids
    for name, lengths in (("query_seq_lengths", query_seq_lengths), ("key_value_seq_lengths", key_value_seq_lengths)):
        if lengths is None:
            continue
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer [B]={(batch,)} array of valid lengths, got "
                             f"{lengths.shape=} {lengths.dtype=}")
    if segment_ids is None:
        q_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
    elif isinstance(segment_ids, (tuple, list)):
        q_ids, kv_ids = (jnp.asarray(s, jnp.int32) for s in segment_ids)
    else:
        q_ids = kv_ids = jnp.asarray(segment_ids, jnp.int32)
    if query_seq_lengths is not None:
        valid = jnp.arange(q_len)[None, :] < jnp.asarray(query_seq_lengths)[:, None]  # [B, T]
        q_ids = jnp.where(valid, q_ids, _PAD_QUERY_ID)
    if key_value_seq_lengths is not None:
        valid = jnp.arange(kv_len)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]  # [B, S]
        kv_ids = jnp.where(valid, kv_ids, _PAD_KEY_ID)
    return (q_ids, kv_ids)


def _xla_attention(q, k, v, *, bias, allowed, scale, softcap, dropout_rate, dropout_seed):
    """Dense attention: scores in f32 from input-dtype matmuls, masked softmax, optional dropout.

    Args:
        q [B, T, H, D]; k, v [B, S, K, D]; bias float [B|1, H|1, T, S] or None; allowed bool
        broadcastable to [B, H, T, S]; scale, softcap: floats; dropout_seed: uint32 or None.

    Returns:
        [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    # Keys no query may see (padding) can hold anything, NaN included: zero them, since a zero
    # probability times NaN is still NaN in the matmuls (forward and backward).
    seen = jnp.any(allowed, axis=(1, 2))[:, :, None, None]  # [B|1, S, 1, 1]
    k, v = jnp.where(seen, k, 0).astype(k.dtype), jnp.where(seen, v, 0).astype(v.dtype)
    # GQA by grouping query heads over their shared KV head: K/V are never repeated in memory.
    qg = q.reshape(B, T, K, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, H, T, S) * scale  # head h = kv_head * G + g
    if softcap > 0:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    # A fully masked row ends with all-zero probabilities, hence a zero output.
    probs, _ = masking.dense_softmax(scores, allowed)
    if dropout_rate > 0:
        probs = masking.dense_dropout(probs, dropout_seed, dropout_rate)
    probs = probs.reshape(B, K, G, T, S).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)


def _cudnn_unsupported(q, *, softcap: float, dropout_rate: float) -> str | None:
    """Why cuDNN cannot run these arguments, or None when it can (masks all become one dense mask)."""
    if not _on_gpu():
        return f"needs a CUDA GPU, but {jax.default_backend()=}"
    if jnp.dtype(q.dtype) not in _CUDNN_DTYPES:
        return f"supports float16/bfloat16 only, got {q.dtype=}"
    if softcap > 0:
        return f"has no softcap, got {softcap=}"
    if dropout_rate > 0:
        return f"has no dropout through jax.nn, got {dropout_rate=}"
    return None


def dot_product_attention(
    query: jax.Array,  # [B, T, H, D]
    key: jax.Array,  # [B, S, K, D]
    value: jax.Array,  # [B, S, K, D]
    bias: jax.Array | None = None,  # [B|1, H|1, T, S]
    mask: jax.Array | None = None,  # bool [B|1, H|1, T, S]
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids=None,
    softcap: float = 0.0,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention with GQA, masks, windows, segments, softcap and dropout.

    Args:
        query: [B, T, H, D]. key, value: [B, S, K, D] with H % K == 0 (GQA/MQA).
        bias: additive float bias [B|1, H|1, T, S] (xla and cudnn only).
        mask: bool [B|1, H|1, T, S], True where a query may attend to a key.
        scale: score scale, default D ** -0.5.
        is_causal: query i sees keys j <= i + S - T (bottom-right aligned).
        query_seq_lengths, key_value_seq_lengths: [B] int valid lengths of right-padded rows, as in
            `jax.nn.dot_product_attention`: padded queries output zeros, padded keys are never seen
            (a query left with no key outputs zeros too, where jax.nn gives the mean of V).
        local_window_size: w or (left, right): query i sees keys within [i - left, i + right]
            (shifted by S - T); as in `jax.nn.dot_product_attention`.
        segment_ids: one [B, T] array (T == S) or a (q_ids [B, T], kv_ids [B, S]) pair; a query
            sees only keys of its own segment.
        softcap: > 0 replaces a score s by softcap * tanh(s / softcap) (after scaling).
        dropout_rate: probability of dropping an attention weight; needs `dropout_rng`.
        dropout_rng: PRNG key for dropout.
        implementation: "pallas", "xla", "cudnn" or None (automatic; see the module docstring).

    Returns:
        [B, T, H, D] in query's dtype.
    """
    _check_implementation(implementation)
    window = _window(local_window_size)
    B, T = query.shape[:2]
    S = key.shape[1]
    segment_ids = _fold_lengths(segment_ids, query_seq_lengths, key_value_seq_lengths, B, T, S)
    dropout_seed = _dropout_seed(dropout_rate, dropout_rng)
    # One validation for every implementation, shared with the kernels (shapes, dtypes, window...).
    problem, segment_ids, _, mask = validate(
        query, key, value, causal=is_causal, sm_scale=scale, window_size=window, segment_ids=segment_ids,
        softcap=softcap, alibi_slopes=None, mask=mask, dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.ndim != 4 or not all(b in (1, n) for b, n in zip(bias.shape, (B, problem.num_heads, T, S))):
            raise ValueError(f"bias must be broadcastable to [B, H, T, S]={(B, problem.num_heads, T, S)}, "
                             f"got {bias.shape=}")
    config = problem.mask_config
    cudnn_args = dict(softcap=config.softcap, dropout_rate=problem.dropout_rate)

    if implementation is None:
        pallas_ok = _on_gpu() and bias is None
        if pallas_ok and _cudnn_unsupported(query, **cudnn_args) is None and _measured_cudnn_faster(
                query, causal=is_causal, window_size=window, segment_ids=segment_ids, mask=mask):
            implementation, reason = "cudnn", "measured faster than the Pallas kernels for these arguments"
        elif pallas_ok:
            implementation, reason = "pallas", "GPU with the FlashAttention-2 kernel"
        elif _on_gpu() and _cudnn_unsupported(query, **cudnn_args) is None:
            implementation, reason = "cudnn", "GPU, arguments outside the Pallas kernel"
        else:
            implementation, reason = "xla", f"backend {jax.default_backend()}"
        _log_choice("dot_product_attention", implementation, reason)

    if implementation == "pallas":
        if bias is not None:
            raise ValueError(f"implementation='pallas' takes no additive bias, got {bias.shape=}: use mask")
        # Per shard of rows and heads when the operands are sharded (fa2jax.parallel_attention).
        return parallel_attention.flash_attention(query, key, value, causal=is_causal, sm_scale=problem.sm_scale,
                                                  window_size=window, segment_ids=segment_ids,
                                                  softcap=config.softcap, mask=mask,
                                                  dropout_rate=problem.dropout_rate, dropout_seed=dropout_seed)

    allowed = masking.position_mask(jnp.arange(T, dtype=jnp.int32)[:, None],
                                    jnp.arange(S, dtype=jnp.int32)[None, :], config)[None, None]  # [1, 1, T, S]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        allowed = allowed & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    if mask is not None:
        allowed = allowed & mask

    if implementation == "cudnn":
        why = _cudnn_unsupported(query, **cudnn_args)
        if why is not None:
            raise ValueError(f"implementation='cudnn' {why}")
        plain = segment_ids is None and mask is None and config.left_limit is None
        if plain and (config.right_limit is None or (config.right_limit == 0 and T == S)):
            # No mask, or causal self-attention (where top-left and bottom-right alignment coincide):
            # cuDNN's own flag skips the masked tiles instead of reading a dense [T, S] mask.
            return jax.nn.dot_product_attention(query, key, value, bias, scale=problem.sm_scale,
                                                is_causal=config.right_limit == 0, implementation="cudnn")
        # Every other mask folded into one dense boolean: jax.nn's own causal/window flags align top-left.
        allowed = jnp.broadcast_to(allowed, (allowed.shape[0], allowed.shape[1], T, S))
        return jax.nn.dot_product_attention(query, key, value, bias, allowed, scale=problem.sm_scale,
                                            implementation="cudnn")

    return _xla_attention(query, key, value, bias=bias, allowed=allowed, scale=problem.sm_scale,
                          softcap=config.softcap, dropout_rate=problem.dropout_rate, dropout_seed=dropout_seed)


def _cache_visibility(lengths: jax.Array, tree_mask: jax.Array, cache_size: int, window: int = -1) -> jax.Array:
    """bool [B, N, S]: node i sees slots < lengths[b] and slots lengths[b] + j where tree_mask[b, i, j].

    lengths [B] int32; tree_mask [B, N, N] bool. With window >= 0 a node also sees only keys at
    most `window` positions before its own: slot s < lengths[b] holds position s, and node j sits
    at position lengths[b] + depth(j), depth(j) = tree_mask[b, j].sum() - 1.
    """
    N = tree_mask.shape[-1]
    slot = jnp.arange(cache_size, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    start = lengths.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
    node = slot - start  # which tree node a slot holds, when in [0, N)
    in_tree = (node >= 0) & (node < N)
    index = jnp.broadcast_to(jnp.clip(node, 0, N - 1), tree_mask.shape[:2] + (cache_size,))
    visible = (slot < start) | (in_tree & jnp.take_along_axis(tree_mask, index, axis=2))
    if window < 0:
        return visible
    depth = tree_mask.sum(-1, dtype=jnp.int32) - 1  # [B, N]
    key_depth = jnp.take_along_axis(depth, index[:, 0], axis=1)[:, None, :]  # [B, 1, S], for tree slots
    key_position = jnp.where(slot < start, slot, start + key_depth)  # [B, 1, S]
    query_position = start + depth[:, :, None]  # [B, N, 1]
    return visible & (query_position - key_position <= window)


def _binding_window(window: int, cache_size: int) -> int:
    """The window, or -1 where it hides nothing: a query sits at slot <= S - 1 and a key at >= 0."""
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= 0, or -1 for none, got {window=}")
    return -1 if window >= cache_size - 1 else window


def _dense_cache_attention(q, k_cache, v_cache, lengths, tree_mask, *, scale, softcap, window, implementation):
    """Tree/decode attention as one masked dense attention over the whole cache (xla or cudnn)."""
    visible = _cache_visibility(lengths, tree_mask, k_cache.shape[1], window)  # [B, N, S]
    # Slots no node reads may hold stale or non-finite values: zero them so 0 * NaN cannot leak.
    read = jnp.any(visible, axis=1)[:, :, None, None]  # [B, S, 1, 1]
    k_cache = jnp.where(read, k_cache, 0).astype(q.dtype)
    v_cache = jnp.where(read, v_cache, 0).astype(q.dtype)
    return dot_product_attention(q, k_cache, v_cache, mask=visible[:, None], scale=scale, softcap=softcap,
                                 implementation=implementation)


def _check_cache_args(q, k_cache, v_cache, lengths):
    if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [B, N, H, D] and caches [B, S, K, D], got {q.shape=} {k_cache.shape=} "
                         f"{v_cache.shape=}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths must be [B]={(q.shape[0],)}, got {lengths.shape=}")


def _choose_cache_impl(op: str, implementation: str | None, window: int = -1) -> str:
    _check_implementation(implementation)
    if implementation is None:
        if _on_gpu() and window < 0:
            implementation, reason = "pallas", f"GPU with the {op} kernel"
        elif _on_gpu():
            implementation, reason = "xla", f"a local window, which the {op} kernel lacks"
        else:
            implementation, reason = "xla", f"backend {jax.default_backend()}"
        _log_choice(op, implementation, reason)
    elif implementation == "pallas" and window >= 0:
        raise ValueError(f"implementation='pallas' has no local window in {op}, got {window=} for a cache with "
                         f"more slots than window + 1: use implementation=None or 'xla' (masked dense attention)")
    return implementation


def tree_attention(
    q: jax.Array,  # [B, N, H, D]
    k_cache: jax.Array,  # [B, S, K, D]
    v_cache: jax.Array,  # [B, S, K, D]
    lengths: jax.Array,  # [B] int32
    tree_mask: jax.Array,  # bool [N, N] or [B, N, N]
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    window: int = -1,
    implementation: str | None = None,
    batch_invariant: bool = False,
) -> jax.Array:
    """Attention of N speculative tree nodes to a cache row.

    The nodes' own K/V must already sit at slots lengths[b] + [0, N). Node i sees the committed
    prefix (slots < lengths[b]) and slot lengths[b] + j for every j with tree_mask[i, j] (itself and
    its ancestors).

    window: >= 0 limits a node to keys at most `window` positions before its own (a sliding
    window of window + 1 tokens, Mistral's and Gemma's local layers): slot s < lengths[b] holds
    position s, node j position lengths[b] + depth(j). The Pallas kernels have no window, so a window
    shorter than the cache runs as masked dense attention (None picks "xla"; "pallas" raises).

    batch_invariant: a node's result must not depend on lengths beyond the slots it sees (see
    `pallas_kernels.tree_attention`); the dense implementations attend the whole cache in one
    masked pass whatever the lengths, so they need no other walk.

    Returns:
        [B, N, H, D] in q's dtype.
    """
    _check_cache_args(q, k_cache, v_cache, lengths)
    B, N = q.shape[:2]
    if tree_mask.shape not in ((N, N), (B, N, N)) or tree_mask.dtype != jnp.bool_:
        raise ValueError(f"tree_mask must be bool [N, N] or [B, N, N] with {N=} {B=}, got {tree_mask.shape=} "
                         f"{tree_mask.dtype=}")
    window = _binding_window(window, k_cache.shape[1])
    implementation = _choose_cache_impl("tree_attention", implementation, window)
    if implementation == "pallas":
        return parallel_attention.tree_attention(q, k_cache, v_cache, lengths, tree_mask, sm_scale=scale,
                                                 softcap=softcap, batch_invariant=batch_invariant)
    tree_mask = jnp.broadcast_to(tree_mask, (B, N, N))
    return _dense_cache_attention(q, k_cache, v_cache, lengths, tree_mask, scale=scale, softcap=softcap,
                                  window=window, implementation=implementation)


def decode_attention(
    q: jax.Array,  # [B, T, H, D]
    k_cache: jax.Array,  # [B, S, K, D]
    v_cache: jax.Array,  # [B, S, K, D]
    lengths: jax.Array,  # [B] int32
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    window: int = -1,
    implementation: str | None = None,
) -> jax.Array:
    """Attention of T new tokens, already written at slots lengths[b] + [0, T), to a cache row.

    Token i sees the committed prefix and new tokens 0..i (causal among themselves); with
    window >= 0 only the keys at most `window` positions back (see `tree_attention`).

    Returns:
        [B, T, H, D] in q's dtype.
    """
    _check_cache_args(q, k_cache, v_cache, lengths)
    B, T = q.shape[:2]
    window = _binding_window(window, k_cache.shape[1])
    implementation = _choose_cache_impl("decode_attention", implementation, window)
    if implementation == "pallas":
        return parallel_attention.decode_attention(q, k_cache, v_cache, lengths, sm_scale=scale, softcap=softcap)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), jnp.bool_)), (B, T, T))  # a chain is a tree
    return _dense_cache_attention(q, k_cache, v_cache, lengths, causal, scale=scale, softcap=softcap,
                                  window=window, implementation=implementation)
