"""Token-tree configurations for SpecInfer-style speculative decoding, with static shapes.

A token tree has a fixed number of node slots N. Node 0 is the root: the last token emitted, not yet
in any KV cache. Every other node is a speculated token whose parent has a smaller index, so a single
pass over the slots in index order visits parents before children (verification relies on it).

Three configurations (SpecInfer, Miao et al. ASPLOS'24, section 3 and 4):

* `ExpansionTree(widths)`: one draft; each node at depth i gets `widths[i]` children.
* `MergedTree(trees)`: one expansion tree per draft, hung under a shared root, padded to a node
  budget. Merging "identical prefixes into one node" can only happen at run time, since the tokens
  are run-time values. We keep the static topology as the union of the per-draft trees and do not
  dedup at run time: two nodes holding the same token under the same parent are each verified
  on their own. This stays lossless: greedy verification takes the deepest node whose whole path
  matches the target, whichever copy it is in; stochastic verification treats every node as its
  own proposal, drawn from its own draft's distribution, which is exactly what multi-step
  speculative sampling needs (a merged node would need a proposal distribution that is a mixture
  over which drafts happened to agree, which we cannot evaluate). Greedy acceptance is even the
  same as with merging: every root path of the merged tree lies entirely inside one draft's
  subtree, so the deepest matching path exists unmerged too. The price is node slots spent on
  copies when drafts agree, and for stochastic verification a merged node's children would have
  been tried together.
* `DynamicTree(num_nodes, depth, top_k)`: per level a fixed number of slots is filled with the
  (parent, token) pairs of highest cumulative draft probability among the top-k children of the
  previous level (plus the draft's greedy chain); the slot depths are static, the parents are
  chosen at run time.

`TreeTopology` turns a static parent array into the arrays the decoder needs: depth [N],
ancestor mask [N, N] (mask[i, j]: j is i or an ancestor of i, the `tree_attention` convention)
and root-to-leaf paths.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class TreeTopology:
    """A static token tree: who is whose parent, which draft proposes each node, and how.

    Attributes:
      parents: parent index of every node; -1 for the root (node 0). parents[i] < i.
      source: index of the draft that proposes each node; -1 for the root and padding nodes.
      rank: for a node proposed by top-k, which of its parent's top-k tokens it takes (0 = best);
        for sampled nodes it only tells siblings apart.
      valid: False for padding nodes that fill the node budget; they are never accepted.
    """

    parents: tuple[int, ...]
    source: tuple[int, ...]
    rank: tuple[int, ...]
    valid: tuple[bool, ...]

    def __post_init__(self):
        n = len(self.parents)
        if n < 1 or self.parents[0] != -1:
            raise ValueError(f"node 0 must be the root with parent -1: {self.parents=}")
        if not len(self.source) == len(self.rank) == len(self.valid) == n:
            raise ValueError(
                f"per-node tuples differ in length: {len(self.parents)=} {len(self.source)=} "
                f"{len(self.rank)=} {len(self.valid)=}")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"parents must precede children: parents[{i}]={p}, {self.parents=}")
            if self.valid[i] and not self.valid[p]:
                raise ValueError(f"valid node {i} has a padding parent {p}: {self.valid=}")

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> np.ndarray:
        """Depth of every node, root 0.  # [N] int32"""
        d = np.zeros(self.num_nodes, np.int32)
        for i, p in enumerate(self.parents[1:], start=1):
            d[i] = d[p] + 1
        return d

    @property
    def max_depth(self) -> int:
        """Depth of the deepest valid node (the most tokens one step can accept, minus the bonus)."""
        return int(self.depth[np.asarray(self.valid)].max())

    @property
    def ancestor_mask(self) -> np.ndarray:
        """mask[i, j] = node j is node i or one of its ancestors.  # [N, N] bool"""
        n = self.num_nodes
        mask = np.eye(n, dtype=bool)
        for i, p in enumerate(self.parents[1:], start=1):
            mask[i] |= mask[p]
        return mask

    @property
    def paths(self) -> np.ndarray:
        """Root-to-leaf node paths of the valid leaves, padded with -1.  # [num_leaves, max_depth + 1]"""
        valid = np.asarray(self.valid)
        has_child = np.zeros(self.num_nodes, bool)
        for i, p in enumerate(self.parents[1:], start=1):
            if valid[i]:
                has_child[p] = True
        leaves = [i for i in range(self.num_nodes) if valid[i] and not has_child[i]]
        out = np.full((len(leaves), self.max_depth + 1), -1, np.int32)
        for row, leaf in enumerate(leaves):
            path = []
            node = leaf
            while node != -1:
                path.append(node)
                node = self.parents[node]
            out[row, : len(path)] = path[::-1]
        return out


def _expansion_topology(widths: tuple[int, ...], source: int) -> TreeTopology:
    parents, ranks = [-1], [0]
    frontier = [0]
    for w in widths:
        nxt = []
        for p in frontier:
            for r in range(w):
                nxt.append(len(parents))
                parents.append(p)
                ranks.append(r)
        frontier = nxt
    n = len(parents)
    return TreeTopology(
        parents=tuple(parents), source=(-1,) + (source,) * (n - 1), rank=tuple(ranks),
        valid=(True,) * n)


@dataclasses.dataclass(frozen=True)
class ExpansionTree:
    """SpecInfer's expansion configuration: the nodes at depth i get `widths[i]` children each.

    Attributes:
      widths: children per node, per depth; (1,) * d is a chain of d speculated tokens.
      sample_children: with stochastic verification, draw the children i.i.d. from the draft
        (multi-step speculative sampling); if False, take the draft's top-k tokens and verify them
        as point-mass proposals. Greedy verification always takes the top-k.
    """

    widths: tuple[int, ...]
    sample_children: bool = True

    def __post_init__(self):
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints: {self.widths=}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    @classmethod
    def chain(cls, depth: int) -> ExpansionTree:
        """A sequence of `depth` speculated tokens (classic speculative decoding)."""
        return cls((1,) * depth)

    @classmethod
    def specinfer(cls) -> ExpansionTree:
        """The expansion configuration SpecInfer evaluates by default, <1, 1, 3, 1, 1, 1, 1, 1>."""
        return cls((1, 1, 3, 1, 1, 1, 1, 1))

    @classmethod
    def parse(cls, widths: str) -> ExpansionTree:
        """From comma-separated widths, e.g. "1,1,3,1" (a command-line flag)."""
        try:
            return cls(tuple(int(w) for w in widths.split(",")))
        except ValueError:
            raise ValueError(f"expansion widths are comma-separated positive ints, e.g. 1,1,3,1: {widths=}") from None

    @property
    def num_drafts(self) -> int:
        return 1

    def topology(self) -> TreeTopology:
        return _expansion_topology(self.widths, source=0)

    def sampled_nodes(self) -> np.ndarray:
        """Which nodes are i.i.d. draft samples under stochastic verification.  # [N] bool"""
        out = np.full(self.num_nodes, self.sample_children)
        out[0] = False
        return out

    @property
    def num_nodes(self) -> int:
        return 1 + sum(math.prod(self.widths[: i + 1]) for i in range(len(self.widths)))

    @property
    def depth(self) -> int:
        return len(self.widths)


@dataclasses.dataclass(frozen=True)
class MergedTree:
    """Several drafts' expansion trees under one root, padded to a node budget.

    Draft i expands `trees[i]`. Nodes are laid out level by level (all drafts' depth-1 nodes, then
    depth 2, ...), so every level is a contiguous run of slots.

    Attributes:
      trees: one expansion tree per draft, in the order the drafts are given to the decoder.
      num_nodes: node budget N (root included); the slots past the union of the trees are padding
        nodes that are never accepted. None (the default) is replaced by exactly the union.
    """

    trees: tuple[ExpansionTree, ...]
    num_nodes: int | None = None

    def __post_init__(self):
        if not self.trees or not all(isinstance(t, ExpansionTree) for t in self.trees):
            raise ValueError(f"trees must be a non-empty tuple of ExpansionTree: {self.trees=}")
        object.__setattr__(self, "trees", tuple(self.trees))
        union = 1 + sum(t.num_nodes - 1 for t in self.trees)
        if self.num_nodes is None:
            object.__setattr__(self, "num_nodes", union)
        elif self.num_nodes < union:
            raise ValueError(
                f"node budget below the union of the draft trees ({union} nodes): {self.num_nodes=}")

    @property
    def num_drafts(self) -> int:
        return len(self.trees)

    @property
    def depth(self) -> int:
        return max(t.depth for t in self.trees)

    def topology(self) -> TreeTopology:
        subs = [t.topology() for t in self.trees]
        sub_depth = [s.depth for s in subs]
        parents, source, rank = [-1], [-1], [0]
        new_index = [{0: 0} for _ in subs]
        for d in range(1, self.depth + 1):
            for s, sub in enumerate(subs):
                for i in np.nonzero(sub_depth[s] == d)[0]:
                    new_index[s][int(i)] = len(parents)
                    parents.append(new_index[s][sub.parents[i]])
                    source.append(s)
                    rank.append(sub.rank[i])
        n_real = len(parents)
        n = self.num_nodes
        pad = n - n_real
        return TreeTopology(
            parents=tuple(parents) + (0,) * pad, source=tuple(source) + (-1,) * pad,
            rank=tuple(rank) + (0,) * pad, valid=(True,) * n_real + (False,) * pad)

    def sampled_nodes(self) -> np.ndarray:
        """Which nodes are i.i.d. draft samples under stochastic verification.  # [N] bool"""
        topo = self.topology()
        per_draft = np.array([t.sample_children for t in self.trees] + [False])
        # source -1 (root, padding) indexes the trailing False.
        return per_draft[np.asarray(topo.source)]


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """A tree regrown every step toward the nodes of highest cumulative draft probability.

    The slots of each depth are fixed (`level_sizes`), which parent each slot hangs under is
    chosen at run time: level d+1 takes the `level_sizes[d+1]` best (parent, token) pairs among
    the top-k children of the level-d nodes, scored by the product of draft probabilities along
    the path (EAGLE-2's expansion score, with a per-level budget so shapes stay static), except
    that the draft's greedy chain is always kept, so the tree never does worse than a chain of
    the same depth. The children are deterministic, so stochastic verification uses the
    point-mass rule.

    Attributes:
      num_nodes: node budget N, root included.
      depth: number of speculated levels.
      top_k: candidate children per node; also caps a level at top_k times the previous one.
    """

    num_nodes: int
    depth: int
    top_k: int

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1:
            raise ValueError(f"depth and top_k must be positive: {self.depth=} {self.top_k=}")
        if self.num_nodes < 1 + self.depth:
            raise ValueError(f"num_nodes must leave one slot per level: {self.num_nodes=} {self.depth=}")
        if self.num_nodes > 1 + sum(self.top_k ** (d + 1) for d in range(self.depth)):
            raise ValueError(
                f"num_nodes exceeds the full top_k-ary tree of this depth: {self.num_nodes=} "
                f"{self.depth=} {self.top_k=}")

    @property
    def num_drafts(self) -> int:
        return 1

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Slots per depth, root level first. Spread evenly, earlier levels first, capped by top_k."""
        sizes = [1]
        left = self.num_nodes - 1
        for d in range(self.depth):
            levels_left = self.depth - d
            cap = sizes[-1] * self.top_k
            size = min(cap, -(-left // levels_left))
            # Later levels are capped by this one; give it enough that the rest still fits.
            while size < cap and sum(size * self.top_k ** (k + 1) for k in range(levels_left - 1)) < left - size:
                size += 1
            sizes.append(size)
            left -= size
        return tuple(sizes)

    @property
    def slot_depth(self) -> np.ndarray:
        """Static depth of every slot.  # [N] int32"""
        return np.repeat(np.arange(self.depth + 1, dtype=np.int32), self.level_sizes)

    def sampled_nodes(self) -> np.ndarray:
        """No node is an i.i.d. sample: the children are the draft's best.  # [N] bool"""
        return np.zeros(self.num_nodes, bool)

    def level_start(self, depth: int) -> int:
        """First slot of `depth`; its slots are level_start(depth) .. + level_sizes[depth]."""
        return sum(self.level_sizes[:depth])


def ancestor_mask_from_parents(parents: jnp.ndarray, max_depth: int) -> jnp.ndarray:
    """Ancestor masks of run-time trees.

    Args:
      parents: parent slot of every node, -1 for the root.  # [B, N] int32
      max_depth: an upper bound on the depth of any node.

    Returns:
      mask[b, i, j] = node j is node i or an ancestor of i in tree b.  # [B, N, N] bool
    """
    n = parents.shape[-1]
    eye = jnp.eye(n, dtype=bool)
    # One-hot parent matrix: step[b, i, j] = (parents[b, i] == j); the root's row is empty.
    step = parents[..., :, None] == jnp.arange(n)[None, None, :]  # [B, N, N]
    mask = jnp.broadcast_to(eye, step.shape)
    # mask(i) = {i} | mask(parent(i)); a depth-d node is complete after d rounds.
    for _ in range(max_depth):
        via_parent = jnp.einsum("bij,bjk->bik", step.astype(jnp.int32), mask.astype(jnp.int32)) > 0
        mask = eye | via_parent
    return mask


def tree_depth_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Depth of every node from an ancestor mask: its number of proper ancestors.

    Args:
      mask: ancestor mask.  # [..., N, N] bool

    Returns:
      depth of each node, root 0.  # [..., N] int32
    """
    return mask.sum(-1).astype(jnp.int32) - 1


@struct.dataclass
class TokenTree:
    """One step's speculated tree, as run-time arrays (the output of drafting, input of verifying).

    Slot depths are static for every tree configuration, parents are run-time (dynamic trees).
    """

    # Node tokens; slot 0 is the root, the last emitted token.  # [B, N] int32
    tokens: jax.Array
    # Parent slot of each node, -1 for the root; padding nodes point at the root.  # [B, N] int32
    parents: jax.Array
    # mask[b, i, j]: node j is node i or an ancestor of i.  # [B, N, N] bool
    mask: jax.Array
    # Depth of each node, root 0.  # [B, N] int32
    depth: jax.Array
    # False for padding nodes, which are never accepted.  # [B, N] bool
    valid: jax.Array
    # Draft distribution each sampled node was drawn from (at its parent); None when no node is
    # sampled (greedy, top-k and dynamic trees).  # [B, N, V] f32
    proposal: jax.Array | None = None
