"""Lossless verification of a speculated token tree against the target's logits.

Both rules return the accepted root-to-node path (the root is always accepted: it is the token
emitted last step) and a bonus token drawn from the target after the path's last node, so a step
emits between 1 and depth + 1 tokens.

* Greedy: the deepest node whose every path token equals the target's argmax at its parent,
  plus the target's argmax after it. Decoding equals greedy decoding of the target alone.
* Stochastic: SpecInfer's multi-step speculative sampling (Miao et al., ASPLOS'24, section 4.2,
  Algorithm 2), walking down from the root. At the current node with target distribution p, the
  children are tried one after another:
    - a child x drawn from draft distribution q: accept with min(1, p(x) / q(x)); on rejection
      p <- norm(max(p - q, 0));
    - a child x chosen deterministically (top-k, dynamic trees), i.e. a point-mass proposal:
      accept with p(x); on rejection p <- norm(p with x zeroed) (sampling without replacement).
  Each trial is an exact decomposition p = P(accept) * [x] + P(reject) * residual, so whatever
  the sequence of proposals, the emitted token is distributed as p; when all children fail, the
  bonus token is sampled from the last residual. On acceptance p becomes the target's
  distribution at the accepted child and the walk continues. The children are tried in slot
  order: i.i.d. draws are exchangeable, and for point-mass proposals the order does not matter
  for exactness, so no random permutation is needed.

The walk is one `lax.scan` over the node slots in index order (unrolled: no loop to wait on);
that visits every node after its parent, so the children of the current node always come after it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spec.sampling import sample_probs, warp_probs
from spec.trees import TokenTree

_TINY = 1e-30


@struct.dataclass
class VerifyResult:
    """Outcome of verifying one tree per batch row."""

    # Accepted node slots, root first; entries at or past num_accepted are 0.  # [B, max_depth + 1] int32
    path: jax.Array
    # Accepted nodes including the root (1 .. max_depth + 1); tokens emitted = num_accepted.  # [B] int32
    num_accepted: jax.Array
    # Token drawn from the target after the last accepted node.  # [B] int32
    bonus: jax.Array


def _normalize_or_keep(residual: jax.Array, fallback: jax.Array) -> jax.Array:
    """norm(residual), or `fallback` where residual has no mass.

    A residual without mass only arises where rejection had probability zero (up to rounding),
    so the fallback is never used by an exact computation.
    """
    total = residual.sum(-1, keepdims=True)
    return jnp.where(total > _TINY, residual / jnp.maximum(total, _TINY), fallback)


def mss_trial(p: jax.Array, q: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One speculative-sampling trial of a token drawn from q.

    Args:
      p: current target distribution.  # [B, V]
      q: draft distribution x was drawn from.  # [B, V]
      x: proposed token.  # [B] int32

    Returns:
      (acceptance probability min(1, p(x) / q(x)) # [B], residual norm(max(p - q, 0)) # [B, V]).
    """
    px = jnp.take_along_axis(p, x[:, None], axis=-1)[:, 0]
    qx = jnp.take_along_axis(q, x[:, None], axis=-1)[:, 0]
    accept = jnp.minimum(1.0, px / jnp.maximum(qx, _TINY))
    return accept, _normalize_or_keep(jnp.maximum(p - q, 0.0), p)


def point_mass_trial(p: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One trial of a deterministically chosen token (a point-mass proposal).

    Args:
      p: current target distribution.  # [B, V]
      x: proposed token.  # [B] int32

    Returns:
      (acceptance probability p(x) # [B], residual norm(p with x zeroed) # [B, V]).
    """
    hit = jax.nn.one_hot(x, p.shape[-1], dtype=bool)
    px = jnp.take_along_axis(p, x[:, None], axis=-1)[:, 0]
    return px, _normalize_or_keep(jnp.where(hit, 0.0, p), p)


def path_to(tree: TokenTree, last: jax.Array, max_depth: int) -> jax.Array:
    """Root-to-node slot path of node `last` in every row.

    Args:
      tree: the token tree.
      last: final node of the path.  # [B] int32
      max_depth: static length of the path minus one.

    Returns:
      slots, root first, 0 past the node's depth.  # [B, max_depth + 1] int32
    """
    ancestors = jnp.take_along_axis(tree.mask, last[:, None, None], axis=1)[:, 0]  # [B, N]
    cols = []
    for d in range(max_depth + 1):
        # A node has exactly one ancestor per depth up to its own; argmax of all-False is 0.
        cols.append(jnp.argmax(ancestors & (tree.depth == d), axis=-1))
    return jnp.stack(cols, axis=-1).astype(jnp.int32)


def verify_greedy(target_logits: jax.Array, tree: TokenTree, *, max_depth: int) -> VerifyResult:
    """Greedy verification: longest path matching the target's argmax, plus its argmax after it.

    Args:
      target_logits: the target's logits at every node.  # [B, N, V]
      tree: the speculated tree.
      max_depth: deepest node depth of the tree configuration (static).

    Returns:
      VerifyResult.
    """
    choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N]
    at_parent = jnp.take_along_axis(choice, jnp.maximum(tree.parents, 0), axis=1)
    match = (tree.tokens == at_parent) & tree.valid
    match = match.at[:, 0].set(True)
    good = jnp.all(jnp.where(tree.mask, match[:, None, :], True), axis=-1)  # [B, N]
    last = jnp.argmax(jnp.where(good, tree.depth, -1), axis=-1).astype(jnp.int32)
    bonus = jnp.take_along_axis(choice, last[:, None], axis=1)[:, 0]
    return VerifyResult(
        path=path_to(tree, last, max_depth),
        num_accepted=jnp.take_along_axis(tree.depth, last[:, None], axis=1)[:, 0] + 1,
        bonus=bonus)


def verify_stochastic(
    target_logits: jax.Array,
    tree: TokenTree,
    key: jax.Array,
    *,
    sampled: np.ndarray,
    max_depth: int,
    temperature,
    top_p,
    top_k=0,
    min_p=0.0,
) -> VerifyResult:
    """Multi-step speculative sampling over the tree; the emitted tokens follow the warped target.

    Args:
      target_logits: the target's logits at every node.  # [B, N, V]
      tree: the speculated tree; `tree.proposal` is required if any node is sampled.
      key: PRNG key.
      sampled: static; True for nodes drawn i.i.d. from `tree.proposal`, False for point-mass
        (deterministically chosen) nodes.  # [N] bool
      max_depth: deepest node depth of the tree configuration (static).
      temperature: scalar, applied to the target as it was to the drafts.
      top_p: scalar, applied to the target as it was to the drafts.
      top_k, min_p: scalars, likewise. Acceptance is exact for whatever distribution the target
        is warped to, so the emitted tokens follow the target warped by all four settings.

    Returns:
      VerifyResult.
    """
    sampled = np.asarray(sampled, bool)
    any_sampled = bool(sampled[1:].any())
    if any_sampled and tree.proposal is None:
        raise ValueError(f"sampled nodes need tree.proposal: {sampled=}")
    batch, num_nodes = tree.tokens.shape
    target_p = warp_probs(target_logits, temperature, top_p, top_k, min_p)  # [B, N, V]
    key_walk, key_bonus = jax.random.split(key)
    uniforms = jax.random.uniform(key_walk, (num_nodes, batch))

    def trial(carry, xs):
        cur, p = carry  # [B], [B, V]
        j, token, parent, valid, is_sampled, u, p_node = xs[:7]
        is_child = (parent == cur) & valid
        a_pm, res_pm = point_mass_trial(p, token)
        if any_sampled:
            a_ms, res_ms = mss_trial(p, xs[7], token)
            accept_prob = jnp.where(is_sampled, a_ms, a_pm)
            residual = jnp.where(is_sampled, res_ms, res_pm)
        else:
            accept_prob, residual = a_pm, res_pm
        accept = is_child & (u < accept_prob)
        p = jnp.where(accept[:, None], p_node, jnp.where(is_child[:, None], residual, p))
        cur = jnp.where(accept, j, cur)
        return (cur, p), None

    xs = (
        jnp.arange(num_nodes, dtype=jnp.int32),
        tree.tokens.T,
        tree.parents.T,
        tree.valid.T,
        jnp.asarray(sampled),
        uniforms,
        jnp.swapaxes(target_p, 0, 1),
    )
    if any_sampled:
        xs = xs + (jnp.swapaxes(tree.proposal, 0, 1),)
    xs = jax.tree.map(lambda a: a[1:], xs)  # the root is accepted by construction
    init = (jnp.zeros((batch,), jnp.int32), target_p[:, 0])
    # Unrolled: a rolled scan is a while loop, and on a GPU each of its N - 1 iterations waits for
    # its condition on the host; unrolled, the walk is N - 1 copies of a few small fusions.
    (last, p), _ = jax.lax.scan(trial, init, xs, unroll=True)
    bonus = sample_probs(key_bonus, p)
    return VerifyResult(
        path=path_to(tree, last, max_depth),
        num_accepted=jnp.take_along_axis(tree.depth, last[:, None], axis=1)[:, 0] + 1,
        bonus=bonus)
