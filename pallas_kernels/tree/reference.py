"""Pure-jnp tree attention: the oracle for the tree and decode kernels.

Node i of row b sees every committed prefix position j < cache_lengths[b], plus the tree positions
cache_lengths[b] + n where tree_mask[i, n] (n is i itself or one of its ancestors). Nothing else in
the cache is read into the result: unused slots may hold garbage or NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tree.arguments import validate


def tree_visibility(cache_lengths: jax.Array, tree_mask: jax.Array, cache_size: int) -> jax.Array:
    """bool [B, N, S]: which cache slots each tree node attends to.

    cache_lengths [B] int32; tree_mask [N, N] or [B, N, N] bool.
    """
    batch = cache_lengths.shape[0]
    if tree_mask.ndim == 2:
        tree_mask = jnp.broadcast_to(tree_mask[None], (batch,) + tree_mask.shape)
    num_nodes = tree_mask.shape[-1]
    slot = jnp.arange(cache_size, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    start = cache_lengths.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
    in_prefix = slot < start
    tree_slot = slot - start  # node index of the slot, when inside [0, N)
    in_tree = (tree_slot >= 0) & (tree_slot < num_nodes)
    node_visible = jnp.take_along_axis(
        tree_mask, jnp.broadcast_to(jnp.clip(tree_slot, 0, num_nodes - 1), (batch, num_nodes, cache_size)),
        axis=2)
    return in_prefix | (in_tree & node_visible)


def tree_attention_reference(
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
):
    """Dense f32 tree attention. Returns out [B, N, H, D] (q's dtype) and, if asked, lse [B, H, N].

    Validates its arguments like `tree_attention` (same ValueErrors); num_splits and interpret are
    accepted and ignored.
    """
    del interpret
    cache_lengths, tree_mask = jnp.asarray(cache_lengths), jnp.asarray(tree_mask)
    problem = validate(q, k_cache, v_cache, cache_lengths, tree_mask, sm_scale=sm_scale, softcap=softcap,
                       num_splits=num_splits)
    B, N, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = problem.group_size
    sm_scale, softcap = problem.sm_scale, problem.softcap
    visible = tree_visibility(cache_lengths, tree_mask, S)  # [B, N, S]

    # Unread slots may hold NaN: zero them before they meet a matmul (0 * NaN would leak).
    slot_used = jnp.any(visible, axis=1)  # [B, S]
    k = jnp.where(slot_used[:, :, None, None], k_cache.astype(jnp.float32), 0.0)
    v = jnp.where(slot_used[:, :, None, None], v_cache.astype(jnp.float32), 0.0)

    qg = q.astype(jnp.float32).reshape(B, N, K, G, D)
    scores = jnp.einsum("bnkgd,bskd->bkgns", qg, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    if softcap > 0:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, N]; every node sees itself, so finite
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bkgns,bskd->bnkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(B, N, H, D).astype(q.dtype)
    return (out, lse.reshape(B, H, N)) if return_lse else out
