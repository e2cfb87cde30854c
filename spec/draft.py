"""Drafting: the drafters grow one token tree per step, a whole level per proposal.

Every level is one `Drafter.propose` call over all N node slots (for a draft model, one
`score_tree` pass): nodes not chosen yet hold placeholder tokens, and since a node's mask row
covers only itself and its ancestors, placeholders never change the logits of chosen nodes. The
logits at the depth-d nodes give the depth-(d+1) tokens. A pass computes exact K/V for every node
whose ancestors and own token were chosen when it ran, so after the last level every node but the
deepest level's holds exact K/V in the draft's cache. `Drafter.complete` (for a model,
`complete_tree_kv`) runs the one more pass that fixes the deepest level; the decoder runs it only
in steps whose accepted path reaches a node deeper than the draft's exact depth
(`SpeculativeDecoder.exact_kv_depths`), so a draft runs `depth` tree passes in most steps and
`depth + 1` when it guessed the whole way.

How children are chosen:
  * greedy (temperature 0) and point-mass nodes: the draft's top-k tokens, node `rank` taking the
    rank-th best;
  * sampled nodes (stochastic verification of `ExpansionTree(sample_children=True)`): an i.i.d.
    draw from the draft's warped distribution q at the parent, which is recorded in
    `TokenTree.proposal` for multi-step speculative sampling.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import KVCache
from spec.generation import call_model
from spec.sampling import sample_probs, warp_probs
from spec.trees import DynamicTree, TokenTree, TreeTopology, ancestor_mask_from_parents

if TYPE_CHECKING:
    from spec.drafters import Drafter


def draft_static_tree(
    drafters: tuple[Drafter, ...],
    params: tuple[Any, ...],
    states: tuple[Any, ...],
    root: jax.Array,
    key: jax.Array,
    *,
    topology: TreeTopology,
    sampled: np.ndarray,
    vocab_size: int,
    temperature,
    top_p,
    top_k=0,
    min_p=0.0,
) -> tuple[TokenTree, tuple[Any, ...]]:
    """Grows an expansion or merged tree with a fixed topology.

    Args:
      drafters, params: the drafts and their params; draft s proposes the nodes with source s.
      states: each draft's state holding the committed context (the root excluded).
      root: last emitted token per row.  # [B] int32
      key: PRNG key.
      topology: static tree layout.
      sampled: static; nodes drawn i.i.d. from the draft rather than taken from its top-k.  # [N] bool
      vocab_size: V.
      temperature, top_p, top_k, min_p: warp applied to the drafts' distributions.

    Returns:
      (tree, states with the tree recorded (a model's K/V at lengths + slot), exact up to the
      depth `static_exact_kv_depths` gives; nothing committed).
    """
    batch = root.shape[0]
    n = topology.num_nodes
    mask = topology.ancestor_mask  # [N, N] NumPy: a constant, packed once at trace time
    depth = topology.depth
    parents = np.asarray(topology.parents)
    source = np.asarray(topology.source)
    rank = np.asarray(topology.rank)
    tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(root)  # [B, N]
    proposal = jnp.zeros((batch, n, vocab_size), jnp.float32) if sampled.any() else None  # [B, N, V]
    valid = np.asarray(topology.valid)
    for d in range(topology.max_depth):
        for s in range(len(drafters)):
            nodes = np.nonzero((depth == d + 1) & (source == s) & valid)[0]
            if nodes.size == 0:
                continue
            logits, written = drafters[s].propose(params[s], states[s], tokens, mask)
            states = states[:s] + (written,) + states[s + 1:]
            at_parent = logits[:, parents[nodes]]  # [B, n_level, V]
            level_sampled = sampled[nodes]
            chosen = jnp.zeros((batch, nodes.size), jnp.int32)  # [B, n_level]
            if not level_sampled.all():
                top = jax.lax.top_k(at_parent, int(rank[nodes].max()) + 1)[1]  # [B, n_level, k]
                chosen = jnp.take_along_axis(top, jnp.asarray(rank[nodes])[None, :, None], axis=-1)[..., 0]
            if level_sampled.any():
                key, sub = jax.random.split(key)
                q = warp_probs(at_parent, temperature, top_p, top_k, min_p)  # [B, n_level, V]
                drawn = sample_probs(sub, q)  # [B, n_level]
                chosen = jnp.where(jnp.asarray(level_sampled)[None, :], drawn, chosen)
                proposal = proposal.at[:, nodes].set(q)
            tokens = tokens.at[:, nodes].set(chosen.astype(jnp.int32))
    tree = TokenTree(
        tokens=tokens,
        parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (batch, n)),
        mask=jnp.broadcast_to(mask, (batch, n, n)),
        depth=jnp.broadcast_to(jnp.asarray(depth), (batch, n)),
        valid=jnp.broadcast_to(jnp.asarray(valid), (batch, n)),
        proposal=proposal)
    return tree, states


def draft_dynamic_tree(
    drafter: Drafter,
    params: Any,
    state: Any,
    root: jax.Array,
    *,
    tree: DynamicTree,
    temperature,
    top_p,
    top_k=0,
    min_p=0.0,
    sampling: bool = True,
) -> tuple[TokenTree, Any]:
    """Grows a dynamic tree: each level keeps the best-scoring children of the previous level,
    plus the draft's greedy chain.

    A candidate's score is the sum of draft log-probabilities along its path; the draft's
    distribution is the warped one when sampling and the plain softmax when greedy (a one-hot
    would make every score but one -inf). Within a level the slots are sorted by score, which is
    the order verification tries siblings in.

    Args:
      drafter, params: the draft and its params.
      state: its state holding the committed context (the root excluded).
      root: last emitted token per row.  # [B] int32
      tree: the dynamic tree configuration.
      temperature, top_p, top_k, min_p: warp applied to the draft's distribution.
      sampling: static; False when the loop only ever decodes greedily (temperature 0): the
        scores then come from the plain softmax without tracing the warp at all.

    Returns:
      (tree, state with the tree recorded, exact up to depth `tree.depth - 1`; nothing
      committed).
    """
    batch = root.shape[0]
    n, sizes = tree.num_nodes, tree.level_sizes
    tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(root)  # [B, N]
    # Unfilled slots hang under the root: their mask rows then see only the root and themselves.
    parents = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(-1)  # [B, N]
    score = jnp.zeros((batch, n), jnp.float32)  # [B, N] log cumulative draft probability
    temperature = jnp.asarray(temperature, jnp.float32)
    for d in range(tree.depth):
        mask = ancestor_mask_from_parents(parents, d)
        logits, state = drafter.propose(params, state, tokens, mask)
        lo, size, size_next = tree.level_start(d), sizes[d], sizes[d + 1]
        frontier = logits[:, lo: lo + size]  # [B, size, V]
        probs = jax.nn.softmax(frontier, -1)
        if sampling:
            probs = jnp.where(temperature > 0, warp_probs(frontier, temperature, top_p, top_k, min_p), probs)
        logq = jnp.log(jnp.maximum(probs, 1e-38))
        child_logq, child_tok = jax.lax.top_k(logq, tree.top_k)  # [B, size, top_k]
        cand = (score[:, lo: lo + size, None] + child_logq).reshape(batch, -1)  # [B, size * top_k]
        # The draft's own greedy chain always survives: it sits in the first slot of every level,
        # so its best child is candidate 0. Then a draft equal to the target accepts the full depth.
        rank_key = cand.at[:, 0].set(jnp.inf)
        pick = jax.lax.top_k(rank_key, size_next)[1]  # [B, size_next]
        slots = np.arange(tree.level_start(d + 1), tree.level_start(d + 1) + size_next)
        tokens = tokens.at[:, slots].set(jnp.take_along_axis(child_tok.reshape(batch, -1), pick, axis=1))
        parents = parents.at[:, slots].set(lo + pick // tree.top_k)
        score = score.at[:, slots].set(jnp.take_along_axis(cand, pick, axis=1))
    mask = ancestor_mask_from_parents(parents, tree.depth)
    out = TokenTree(
        tokens=tokens, parents=parents, mask=mask,
        depth=jnp.broadcast_to(jnp.asarray(tree.slot_depth), (batch, n)),
        valid=jnp.ones((batch, n), bool))
    return out, state


def static_exact_kv_depths(topology: TreeTopology, num_drafts: int) -> tuple[int, ...]:
    """Per draft, the deepest node depth whose K/V `draft_static_tree` leaves exact in its cache.

    A draft's last pass runs at the last level d where it proposes nodes (filling depth d + 1);
    every node of depth <= d had its token then, whichever draft proposed it.
    """
    depth, source, valid = (np.asarray(a) for a in (topology.depth, topology.source, topology.valid))
    return tuple(int(depth[(source == s) & valid].max()) - 1 for s in range(num_drafts))


def complete_tree_kv(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens: jax.Array,
                     mask) -> KVCache:
    """One pass of a draft model over the finished tree: exact K/V for every node, the deepest too
    (`ModelDrafter.complete`).

    Args:
      graphdef, params: the split draft model.
      cache: its cache with the tree written past the committed context.
      tokens: the finished tree's tokens.  # [B, N] int32
      mask: its ancestor mask.  # [N, N] or [B, N, N] bool

    Returns:
      the cache with every node's K/V exact, lengths unchanged.
    """
    return call_model(graphdef, params, "score_tree", tokens, mask, cache)[1]
