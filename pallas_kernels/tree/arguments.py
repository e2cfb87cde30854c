"""Validation of tree-attention arguments, shared by the kernel wrapper and the reference.

Every check runs on static shapes, dtypes and Python values before anything is traced into a kernel,
and raises a `ValueError` naming the offending value (a `TypeError` for a traced sm_scale or
softcap, which the kernels are specialised on). The tree mask's contents and the cache lengths are
checked too when they are concrete (NumPy arrays, or jax.Arrays outside `jit`); traced ones cannot be
read at trace time, so `check_inputs` below offers the same checks through `jax.experimental.checkify`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from pallas_kernels.common.checks import (
    check_finite, check_heads_and_dtypes, check_nonempty, check_rank, static_float)

MAX_NODES = 128  # 4 uint32 bit words per node in the kernel's packed mask


@dataclasses.dataclass(frozen=True)
class TreeProblem:
    """Static description of one tree-attention call after validation."""

    batch: int  # B
    num_nodes: int  # N, tree nodes (queries) per row
    num_heads: int  # H, query heads
    num_kv_heads: int  # K, KV heads
    head_dim: int  # D
    cache_size: int  # S, slots per cache row
    dtype: jnp.dtype
    sm_scale: float
    softcap: float

    @property
    def group_size(self) -> int:
        """G: query heads per KV head. K/V are indexed as head // G, never repeated."""
        return self.num_heads // self.num_kv_heads


def validate(q, k_cache, v_cache, cache_lengths, tree_mask, *, sm_scale, softcap, num_splits=None):
    """Checks every argument (shapes, dtypes, Python values, a concrete mask's contents).

    Returns the `TreeProblem`; raises `ValueError` naming the offending value.
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_rank(name, x.shape, 4)
    batch, num_nodes, num_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {k_cache.shape=} and {v_cache.shape=}")
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be [B, S, K, D] with q's B and D, got {q.shape=} and {k_cache.shape=}")
    cache_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if not 1 <= num_nodes <= MAX_NODES:
        raise ValueError(f"the tree must have 1 to {MAX_NODES} nodes, got {num_nodes=} (q.shape[1])")
    if cache_size < num_nodes:
        raise ValueError(f"the cache must hold the tree: need S >= N, got {cache_size=} and {num_nodes=}")
    check_heads_and_dtypes({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    for name, x in (("q", q), ("k_cache", k_cache)):  # B = 0 or H = 0: no grid to launch
        check_nonempty(name, x.shape)

    if tuple(cache_lengths.shape) != (batch,):
        raise ValueError(f"cache_lengths must be [B]={(batch,)}, got {cache_lengths.shape=}")
    if not jnp.issubdtype(cache_lengths.dtype, jnp.integer):
        raise ValueError(f"cache_lengths must be integers, got {cache_lengths.dtype=}")
    lengths = _concrete_value(cache_lengths)
    if lengths is not None:
        check_cache_lengths(lengths, cache_size, num_nodes)

    if tree_mask.dtype != jnp.bool_:
        raise ValueError(f"tree_mask must be boolean, got {tree_mask.dtype=}")
    if tuple(tree_mask.shape) not in ((num_nodes, num_nodes), (batch, num_nodes, num_nodes)):
        raise ValueError(
            f"tree_mask must be [N, N] or [B, N, N] with B={batch}, N={num_nodes}, got {tree_mask.shape=}")
    concrete = _concrete_value(tree_mask)
    if concrete is not None:
        check_tree_closure(concrete)

    if sm_scale is None:
        sm_scale = head_dim ** -0.5
    sm_scale = static_float("sm_scale", sm_scale)
    check_finite("sm_scale", sm_scale)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale=}")
    softcap = static_float("softcap", softcap)
    check_finite("softcap", softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap=}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits=}")

    return TreeProblem(
        batch=batch,
        num_nodes=num_nodes,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        cache_size=cache_size,
        dtype=jnp.dtype(q.dtype),
        sm_scale=sm_scale,
        softcap=softcap,
    )


def _concrete_value(x) -> np.ndarray | None:
    """x as a NumPy array, or None when its values are unknown at trace time (a tracer, a shape)."""
    if not isinstance(x, (np.ndarray, jax.Array)):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_cache_lengths(lengths: np.ndarray, cache_size: int, num_nodes: int) -> None:
    """Raises ValueError unless 0 <= lengths[b] <= S - N: the tree's N keys go to slots
    [lengths[b], lengths[b] + N), which must lie inside the cache."""
    bad = (lengths < 0) | (lengths > cache_size - num_nodes)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(
            f"cache_lengths must lie in [0, S - N] = [0, {cache_size - num_nodes}] (S={cache_size} slots, N={num_nodes} "
            f"tree nodes), got cache_lengths[{b}]={int(lengths[b])} (cache_lengths={lengths.tolist()})")


def check_tree_closure(tree_mask: np.ndarray) -> None:
    """Raises ValueError unless every [N, N] slice is the ancestor-or-self relation of a forest.

    With A = tree_mask and depth(i) = |A[i]|: every node sees itself; no two distinct nodes see each
    other (a cycle); and every non-root i sees exactly {i} and what its parent p sees, p being the
    deepest other node that i sees. The last condition makes A[i] the chain i, p(i), p(p(i)), ...
    (depth strictly decreases along it), i.e. a forest. O(B * N^2).
    """
    masks = tree_mask.reshape((-1,) + tree_mask.shape[-2:])  # [B|1, N, N]
    num_nodes = masks.shape[-1]
    diagonal = np.diagonal(masks, axis1=1, axis2=2)
    if not diagonal.all():
        b, i = (int(x) for x in np.argwhere(~diagonal)[0])
        raise ValueError(f"tree_mask is not a tree closure: node {i=} does not see itself (batch row {b=})")
    eye = np.eye(num_nodes, dtype=bool)[None]
    cycle = masks & np.swapaxes(masks, 1, 2) & ~eye
    if cycle.any():
        b, i, j = (int(x) for x in np.argwhere(cycle)[0])
        raise ValueError(f"tree_mask is not a tree closure: nodes {i=} and {j=} see each other (batch row {b=})")
    depth = masks.sum(axis=-1)  # [B, N]
    proper = masks & ~eye
    parent = np.argmax(np.where(proper, depth[:, None, :], -1), axis=-1)  # [B, N]
    expected = np.take_along_axis(masks, parent[:, :, None], axis=1) | eye  # what i sees if p is its parent
    has_parent = proper.any(axis=-1)
    missing = has_parent[:, :, None] & expected & ~masks
    if missing.any():
        b, i, k = (int(x) for x in np.argwhere(missing)[0])
        raise ValueError(
            f"tree_mask is not a tree closure: node {i=} does not see {k=}, an ancestor of its parent "
            f"{int(parent[b, i])} (not transitive, batch row {b=})")
    extra = has_parent[:, :, None] & masks & ~expected
    if extra.any():
        b, i, k = (int(x) for x in np.argwhere(extra)[0])
        raise ValueError(
            f"tree_mask is not a tree closure: node {i=} sees {k=}, which is not on the ancestor chain of its "
            f"parent {int(parent[b, i])} (two parents, batch row {b=})")


def check_inputs(cache_lengths: jax.Array, tree_mask: jax.Array, cache_size: int) -> None:
    """`checkify.check`s on traced values that the trace-time validation cannot read.

    Checks 0 <= cache_lengths[b] and cache_lengths[b] + N <= S, and that the mask is a tree closure
    (the conditions of `check_tree_closure`, in jnp). Use it under
    `jax.experimental.checkify.checkify` (see `checked_tree_attention` in the api module).
    """
    num_nodes = tree_mask.shape[-1]
    lengths = cache_lengths.astype(jnp.int32)
    checkify.check(jnp.all(lengths >= 0), "cache_lengths must be >= 0, got {lengths}", lengths=lengths)
    checkify.check(
        jnp.all(lengths + num_nodes <= cache_size),
        "cache_lengths + N must be <= S={S} (the tree's keys must fit in the cache), got cache_lengths={lengths}",
        S=jnp.int32(cache_size), lengths=lengths)
    check_tree_mask(tree_mask)


def check_tree_mask(tree_mask: jax.Array, check=checkify.check) -> None:
    """The conditions of `check_tree_closure` on a traced [N, N] or [B, N, N] mask, as `check`s
    (`checkify.check`, or `checkify.debug_check` for checks that are no-ops outside checkify)."""
    num_nodes = tree_mask.shape[-1]
    masks = jnp.asarray(tree_mask, bool).reshape((-1, num_nodes, num_nodes))  # [B|1, N, N]
    eye = jnp.eye(num_nodes, dtype=bool)[None]
    sees_itself = jnp.diagonal(masks, axis1=1, axis2=2)  # [B|1, N]
    check(jnp.all(sees_itself), "tree_mask is not a tree closure: node {i} does not see itself",
          i=_first_node(~sees_itself))
    cycle = jnp.any(masks & jnp.swapaxes(masks, 1, 2) & ~eye, axis=-1)
    check(~jnp.any(cycle), "tree_mask is not a tree closure: node {i} and another node see each other",
          i=_first_node(cycle))
    # Every node with a proper ancestor sees exactly itself and what its parent (its deepest proper
    # ancestor) sees: then each row is one ancestor chain.
    depth = masks.sum(axis=-1, dtype=jnp.int32)  # [B|1, N]
    proper = masks & ~eye
    parent = jnp.argmax(jnp.where(proper, depth[:, None, :], -1), axis=-1)  # [B|1, N]
    expected = jnp.take_along_axis(masks, parent[:, :, None], axis=1) | eye
    has_parent = proper.any(axis=-1)
    wrong = has_parent & jnp.any(masks != expected, axis=-1)
    check(~jnp.any(wrong), "tree_mask is not a tree closure: node {i} does not see exactly its parent's "
          "ancestors and itself (not transitive, or two parents)", i=_first_node(wrong))


def _first_node(bad: jax.Array) -> jax.Array:
    """The node index of the first True of a bool [B|1, N], as int32 (0 when none is)."""
    return jnp.argmax(jnp.any(bad, axis=0)).astype(jnp.int32)
