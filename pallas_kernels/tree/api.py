"""Public tree and decode attention: validation, layout, split choice, kernel dispatch.

`tree_attention` computes, for every node of a token tree (SpecInfer's verifier step), attention
over the committed prefix of its cache row plus its own ancestors in the tree, in one fused Pallas
kernel (see triton_kernel.py for the algorithm). On Hopper GPUs the calls it covers run the Mosaic
GPU kernel instead (mosaic_kernel.py: TMA + wgmma). `decode_attention` is the chain-tree case.

Out-of-range lengths: concrete cache_lengths outside [0, S - N] raise a ValueError, but traced
values cannot raise. When a traced cache_lengths[b] < 0 it is treated as 0; when cache_lengths[b] +
N > S, the kernel clamps every load to [0, S) and reads no memory outside the cache, but nodes whose
slot would lie past S are not found, so the rows of that batch element are meaningless (a node that
sees no key at all gives zeros and lse -inf). `checked_tree_attention` returns a checkify error for
these cases and for a traced mask that is not a tree; use it while debugging.

Inference only: there is no VJP (SpecInfer's verification does not train).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import checkify

from pallas_kernels.common.device import on_hopper, resolve_interpret
from pallas_kernels.common.numerics import next_power_of_two
from pallas_kernels.tree import arguments, mosaic_kernel
from pallas_kernels.tree.triton_kernel import tree_attention_call
from pallas_kernels.tree.tuning import TreeAttentionConfig, num_splits_heuristic, row_tiling


def tree_attention(
    q: jax.Array,  # [B, N, H, D]
    k_cache: jax.Array,  # [B, S, K, D]
    v_cache: jax.Array,  # [B, S, K, D]
    cache_lengths: jax.Array,  # [B] int32
    tree_mask: jax.Array,  # [N, N] or [B, N, N] bool
    *,
    sm_scale: float | None = None,
    softcap: float = 0.0,
    num_splits: int | None = None,
    return_lse: bool = False,
    interpret: bool | None = None,
    config: TreeAttentionConfig | None = None,
    backend: str | None = None,
    batch_invariant: bool = False,
):
    """Attention of every tree node over the committed prefix and its own ancestors.

    Args:
      q: [B, N, H, D] queries of the N <= 128 tree nodes.
      k_cache, v_cache: [B, S, K, D]. Row b holds the committed prefix at [0, cache_lengths[b]) and
        the tree nodes' keys/values at [cache_lengths[b], cache_lengths[b] + N). Other slots are
        never read into the result (they may hold garbage or NaN). H % K == 0 (GQA/MQA).
      cache_lengths: [B] int32, committed tokens per row; needs 0 <= cache_lengths[b] <= S - N
        (see the module docstring for what happens otherwise).
      tree_mask: bool [N, N] or [B, N, N]; [i, j] True iff node j is node i or an ancestor of i.
        A node whose row is only itself (padding of a smaller tree) is a valid query.
      sm_scale: score scale, D ** -0.5 by default.
      softcap: > 0 applies softcap * tanh(s / softcap) to the scaled scores.
      num_splits: prefix splits (flash-decoding); None picks by `num_splits_heuristic`.
      return_lse: also return the log-sum-exp of the scores.
      interpret: run the Pallas interpreter; None means "unless the default backend is a GPU".
      config: tile sizes and launch parameters; None picks `TreeAttentionConfig.heuristic`.
      backend: "portable" (Triton / interpret kernel), "mosaic" (the Hopper kernel: bf16/f16, head
        dim 64 or 128, an even query-head group, no softcap; anything else raises ValueError), or
        None: "mosaic" on Hopper GPUs where it covers the call, N >= 32 and S is a multiple of 8
        (else its caches would be copied with padding), otherwise "portable".
      batch_invariant: walk the keys in tiles and splits fixed by cache position (portable kernel
        only), so that a node's result depends on the slots it sees and the static shapes, never on
        cache_lengths: verifying a chain then gives, bit for bit, what one-token decoding steps give
        with the same shapes (same N, S, splits and config). Costs speed when the prefix is much
        shorter than the cache.

    Returns:
      out [B, N, H, D] in q's dtype, and lse [B, H, N] float32 (natural log) if `return_lse`.

    Raises:
      ValueError at trace time for wrong ranks or dims (a zero-size one included), N > 128,
      H % K != 0, a non-finite sm_scale or softcap, a mask that is not boolean or not [N, N] /
      [B, N, N], or, when they are concrete, a mask that is not a tree closure or cache_lengths
      outside [0, S - N].
      TypeError for a traced sm_scale or softcap (the kernels are specialised on them: pass them
      as static values, e.g. through functools.partial).

    Not differentiable: verification is inference only, and no VJP is defined.
    """
    cache_lengths, tree_mask = _as_array(cache_lengths), _as_array(tree_mask)
    problem = arguments.validate(q, k_cache, v_cache, cache_lengths, tree_mask, sm_scale=sm_scale,
                                 softcap=softcap, num_splits=num_splits)
    interpret = resolve_interpret(interpret)
    if batch_invariant and backend == "mosaic":
        raise ValueError(f"batch_invariant=True runs on the portable kernel only, got {backend=}")
    if _use_mosaic(backend, problem, interpret) and not batch_invariant:
        if num_splits is None:
            num_splits = mosaic_kernel.num_splits_for(
                batch=problem.batch, num_kv_heads=problem.num_kv_heads, group_size=problem.group_size,
                num_nodes=problem.num_nodes, cache_size=problem.cache_size,
                block_kv=mosaic_kernel.MosaicTreeConfig().block_kv)
        words = mosaic_kernel.node_words(tree_mask)
        out, lse = _tree_attention_mosaic(q, k_cache, v_cache, cache_lengths, words,
                                          sm_scale=problem.sm_scale, num_splits=num_splits,
                                          config=mosaic_kernel.MosaicTreeConfig.for_splits(num_splits),
                                          interpret=interpret)
        return (out, lse) if return_lse else out
    if config is None:
        config = TreeAttentionConfig.heuristic(next_power_of_two(problem.head_dim), problem.dtype,
                                               problem.num_nodes * next_power_of_two(problem.group_size))
    if num_splits is None:
        tiling = row_tiling(problem.num_nodes, problem.group_size, config.block_rows)
        num_splits = num_splits_heuristic(batch=problem.batch, num_kv_heads=problem.num_kv_heads,
                                          row_blocks=tiling.node_blocks, cache_size=problem.cache_size,
                                          block_k=config.block_k, block_rows=tiling.block_rows)
    out, lse = _tree_attention(q, k_cache, v_cache, cache_lengths, tree_mask, sm_scale=problem.sm_scale,
                               softcap=problem.softcap, num_splits=num_splits, config=config,
                               interpret=interpret, batch_invariant=bool(batch_invariant))
    return (out, lse) if return_lse else out


BACKENDS = ("portable", "mosaic")


def _use_mosaic(backend, problem, interpret: bool) -> bool:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend=}")
    covered = mosaic_kernel.supports(dtype=problem.dtype, head_dim=problem.head_dim,
                                     group_size=problem.group_size, softcap=problem.softcap)
    if backend == "mosaic" and not covered:
        raise ValueError(
            "backend='mosaic' covers bf16/f16, head dim 64 or 128, an even number of query heads per "
            f"KV head and no softcap; got dtype={problem.dtype}, head_dim={problem.head_dim}, "
            f"group_size={problem.group_size}, softcap={problem.softcap}")
    if backend is None:
        # A cache that would need a padded copy stays on the portable kernel unless asked for, and so
        # do small trees and decoding: each consumer computes 64 node rows, and the Hopper kernel was
        # measured faster only for full tiles (N = 64, BENCHMARKS.md).
        return (covered and on_hopper() and not interpret
                and problem.num_nodes >= mosaic_kernel.MIN_AUTO_NODES
                and mosaic_kernel.runs_in_place(problem.cache_size))
    return backend == "mosaic"


def _as_array(x):
    """Lists become NumPy arrays (a concrete mask keeps its trace-time checks); arrays pass through."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


_tree_attention = jax.jit(tree_attention_call,
                          static_argnames=("sm_scale", "softcap", "num_splits", "config", "interpret",
                                           "batch_invariant"))
_tree_attention_mosaic = jax.jit(mosaic_kernel.tree_attention_mosaic,
                                 static_argnames=("sm_scale", "num_splits", "config", "interpret"))


def decode_attention(
    q: jax.Array,  # [B, T, H, D]
    k_cache: jax.Array,  # [B, S, K, D]
    v_cache: jax.Array,  # [B, S, K, D]
    cache_lengths: jax.Array,  # [B] int32
    *,
    sm_scale: float | None = None,
    softcap: float = 0.0,
    num_splits: int | None = None,
    return_lse: bool = False,
    interpret: bool | None = None,
    config: TreeAttentionConfig | None = None,
    backend: str | None = None,
    batch_invariant: bool = False,
):
    """Attention of the T newest tokens of each cache row (T <= 128, usually 1).

    `cache_lengths[b]` counts the committed tokens BEFORE the T new ones, exactly as in
    `tree_attention`: the new tokens' keys/values sit at [cache_lengths[b], cache_lengths[b] + T) and
    token t sees the prefix and new tokens 0..t (a chain tree, i.e. bottom-right causal). This is
    `tree_attention` with a lower-triangular mask; arguments and returns are the same.
    """
    T = q.shape[1] if q.ndim == 4 else 0  # a wrong rank is reported by tree_attention's validation
    chain = np.tril(np.ones((T, T), dtype=bool))
    return tree_attention(q, k_cache, v_cache, cache_lengths, chain, sm_scale=sm_scale, softcap=softcap,
                          num_splits=num_splits, return_lse=return_lse, interpret=interpret, config=config,
                          backend=backend, batch_invariant=batch_invariant)


def checked_tree_attention(q, k_cache, v_cache, cache_lengths, tree_mask, **kwargs):
    """`tree_attention` plus run-time checks of the traced inputs, for debugging.

    Returns (error, result), result as `tree_attention(..., **kwargs)` returns it; `error.throw()`
    raises if some cache_lengths[b] is outside [0, S - N] or the mask is not a tree closure (the
    conditions `check_tree_closure` checks on a concrete mask). Only the checks run under
    checkify; the kernel runs as usual. Works inside `jit`.
    """
    cache_size = k_cache.shape[1]
    error, _ = checkify.checkify(lambda lengths, mask: arguments.check_inputs(lengths, mask, cache_size))(
        cache_lengths, tree_mask)
    return error, tree_attention(q, k_cache, v_cache, cache_lengths, tree_mask, **kwargs)
