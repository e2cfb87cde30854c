"""Token-tree topologies: parent arrays, depths, ancestor masks, paths, merged and dynamic trees."""
import os

import numpy as np
import jax.numpy as jnp
import pytest

from spec.trees import (
    DynamicTree, ExpansionTree, MergedTree, TreeTopology, ancestor_mask_from_parents,
    tree_depth_from_mask)

# Fixed so that CI is reproducible; FA2JAX_TEST_SEED=<n> draws other random inputs.
TEST_SEED = int(os.environ.get("FA2JAX_TEST_SEED", "0"))


def _brute_ancestors(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        node = i
        while node != -1:
            mask[i, node] = True
            node = parents[node]
    return mask


@pytest.mark.parametrize("widths", [(1,), (1, 1, 1, 1), (1, 1, 3, 1, 1, 1, 1, 1), (4, 2), (3, 1, 2)])
def test_expansion_topology(widths):
    tree = ExpansionTree(widths)
    topo = tree.topology()
    assert topo.num_nodes == tree.num_nodes == 1 + sum(np.cumprod(widths))
    assert topo.max_depth == tree.depth == len(widths)
    depth = topo.depth
    parents = np.asarray(topo.parents)
    # Each node at depth i has exactly widths[i] children.
    for i in range(topo.num_nodes):
        kids = np.nonzero(parents == i)[0]
        assert len(kids) == (widths[depth[i]] if depth[i] < len(widths) else 0)
        # Ranks tell siblings apart and count from 0.
        assert sorted(topo.rank[k] for k in kids) == list(range(len(kids)))
    np.testing.assert_array_equal(topo.ancestor_mask, _brute_ancestors(topo.parents))
    np.testing.assert_array_equal(np.asarray(tree_depth_from_mask(jnp.asarray(topo.ancestor_mask))), depth)
    # Levels are contiguous runs (drafting fills one level per forward).
    assert np.all(np.diff(depth) >= 0)


def test_paths_cover_leaves():
    topo = ExpansionTree.specinfer().topology()
    paths = topo.paths
    assert paths.shape == (3, 9)
    for path in paths:
        assert path[0] == 0
        for parent, child in zip(path[:-1], path[1:]):
            assert topo.parents[child] == parent
    # Every node lies on some root-to-leaf path.
    assert set(paths.ravel()) == set(range(topo.num_nodes))


def test_merged_tree_union_and_padding():
    a, b = ExpansionTree((2, 1)), ExpansionTree((1, 1, 1))
    merged = MergedTree((a, b), num_nodes=12)
    topo = merged.topology()
    assert topo.num_nodes == 12
    assert sum(topo.valid) == 1 + (a.num_nodes - 1) + (b.num_nodes - 1)
    assert merged.depth == 3 and topo.max_depth == 3
    # Each draft's nodes form a copy of its own expansion tree under the shared root.
    for s, sub in enumerate((a, b)):
        nodes = [i for i in range(12) if topo.source[i] == s]
        assert len(nodes) == sub.num_nodes - 1
        assert all(topo.source[topo.parents[i]] in (s, -1) for i in nodes)
        depths = sorted(topo.depth[nodes])
        assert depths == sorted(sub.topology().depth[1:])
    # Padding never has valid children and is not a leaf of any path.
    assert not any(topo.valid[8:])
    assert set(topo.paths.ravel()) - {-1} == set(range(8))
    np.testing.assert_array_equal(merged.sampled_nodes(), [False] + [True] * 7 + [False] * 4)


def test_merged_sampled_nodes_follow_their_draft():
    merged = MergedTree((ExpansionTree((2,), sample_children=False), ExpansionTree((1, 1))))
    topo = merged.topology()
    assert merged.num_nodes == topo.num_nodes == 5 and all(topo.valid)
    expected = [topo.source[i] == 1 for i in range(topo.num_nodes)]
    np.testing.assert_array_equal(merged.sampled_nodes(), expected)


@pytest.mark.parametrize("num_nodes,depth,top_k", [(16, 5, 4), (8, 3, 2), (4, 3, 1), (40, 4, 3), (7, 2, 3)])
def test_dynamic_level_sizes(num_nodes, depth, top_k):
    tree = DynamicTree(num_nodes, depth, top_k)
    sizes = tree.level_sizes
    assert len(sizes) == depth + 1 and sizes[0] == 1 and sum(sizes) == num_nodes
    for prev, cur in zip(sizes[:-1], sizes[1:]):
        assert 1 <= cur <= prev * top_k
    assert list(tree.slot_depth) == [d for d, s in enumerate(sizes) for _ in range(s)]
    assert tree.level_start(depth) == num_nodes - sizes[-1]


def test_runtime_ancestor_mask_matches_static():
    rng = np.random.default_rng(TEST_SEED)
    rows = []
    for _ in range(3):
        # Random parent arrays with parents[i] < i.
        rows.append([-1] + [int(rng.integers(0, i)) for i in range(1, 9)])
    parents = jnp.asarray(rows, jnp.int32)
    max_depth = max(int(TreeTopology(tuple(r), (-1,) * 9, (0,) * 9, (True,) * 9).max_depth) for r in rows)
    mask = np.asarray(ancestor_mask_from_parents(parents, max_depth))
    for b, row in enumerate(rows):
        np.testing.assert_array_equal(mask[b], _brute_ancestors(row))
    # Too few rounds leave deep ancestors out, so the bound matters.
    if max_depth > 1:
        short = np.asarray(ancestor_mask_from_parents(parents, max_depth - 1))
        assert not np.array_equal(short, mask)


@pytest.mark.parametrize("bad", [
    lambda: ExpansionTree(()),
    lambda: ExpansionTree((1, 0)),
    lambda: MergedTree(()),
    lambda: MergedTree((ExpansionTree((2,)), ExpansionTree((1,))), num_nodes=3),
    lambda: MergedTree(((1, 2),)),
    lambda: DynamicTree(3, 3, 2),
    lambda: DynamicTree(8, 2, 2),
    lambda: DynamicTree(8, 0, 2),
    lambda: TreeTopology((0, 0), (-1, 0), (0, 0), (True, True)),
    lambda: TreeTopology((-1, 1), (-1, 0), (0, 0), (True, True)),
    lambda: TreeTopology((-1, 0), (-1,), (0, 0), (True, True)),
    lambda: TreeTopology((-1, 0, 1), (-1, 0, 0), (0, 0, 0), (True, False, True)),
])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        bad()
