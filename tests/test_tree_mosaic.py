"""The Hopper tree kernel (`backend="mosaic"`) against the pure-jnp reference.

Slots past each row's tree hold NaN (`poison`), as in test_tree_attention: the Mosaic kernel reads
up to 7 of them (a whole tile when the row is shorter than one) but takes the final tile's values
from a copy with those slots zeroed, so none may reach a result (see its docstring).

On CPU it runs in Mosaic GPU's simulator (warpgroups as threads, real barriers and TMA copies; the
two products as plain dots, since the simulator lacks wgmma with a transposed operand); the `gpu`
tests run the wgmma path at the issue's shape. Tolerance basis as in test_tree_attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tree_attention
from pallas_kernels.common.device import on_hopper
from pallas_kernels.testing import random_tree, tree_inputs
from pallas_kernels.tree import mosaic_kernel
from pallas_kernels.tree.triton_kernel import combine_splits
from test_tree_attention import check_against_reference


def _case(seed, *, B, N, H, K, D, S, dtype=jnp.bfloat16, lengths=None, batched_mask=False, poison=True,
          **kwargs):
    rng = np.random.default_rng(seed)
    q, k, v, lengths = tree_inputs(rng, B=B, N=N, H=H, K=K, D=D, S=S, dtype=dtype, lengths=lengths,
                                   poison=poison)
    mask = np.stack([random_tree(rng, N, 3) for _ in range(B)]) if batched_mask else random_tree(rng, N)
    check_against_reference(q, k, v, lengths, mask, backend="mosaic", **kwargs)


@pytest.mark.simulator
@pytest.mark.parametrize("num_splits", [pytest.param(1, marks=pytest.mark.simulator_smoke), 3])
def test_tree_mosaic_in_simulator(num_splits):
    # Row 0's tree starts mid-tile, row 1's prefix ends exactly on a tile boundary (256); the final
    # tiles read 5 and 3 NaN slots past the trees.
    _case(0, B=2, N=21, H=4, K=2, D=64, S=300, lengths=[150, 256], batched_mask=True,
          num_splits=num_splits, interpret=True)


@pytest.mark.simulator
@pytest.mark.parametrize("num_splits", [1, 2, 5, 8])
def test_tree_mosaic_balanced_splits_in_simulator(num_splits):
    # Rows of 1 to 4 tiles, so that some splits get no tile at all (8 splits of one step); every slot
    # past each row's tree is NaN.
    rng = np.random.default_rng(6)
    B, N, S = 4, 7, 400
    q, k, v, lengths = tree_inputs(rng, B=B, N=N, H=2, K=1, D=64, S=S, dtype=jnp.bfloat16,
                                   lengths=[0, 121, 256, 389])
    mask = np.stack([random_tree(rng, N) for _ in range(B)])
    check_against_reference(q, k, v, lengths, mask, backend="mosaic", num_splits=num_splits, interpret=True)


@pytest.mark.simulator
def test_tree_mosaic_two_node_blocks_and_head_dim_128_in_simulator():
    _case(1, B=1, N=100, H=4, K=1, D=128, S=400, dtype=jnp.float16, lengths=[250], num_splits=2,
          interpret=True)


@pytest.mark.simulator
def test_tree_mosaic_sequence_shorter_than_a_tile_in_simulator():
    # prefix + N < one tile: the final tile starts at 0 and reads up to 127 NaN slots past the tree.
    _case(2, B=2, N=8, H=2, K=1, D=64, S=160, lengths=[0, 30], num_splits=1, interpret=True)


@pytest.mark.simulator
@pytest.mark.simulator_smoke
def test_tree_mosaic_single_token_decode_in_simulator():
    _case(4, B=2, N=1, H=2, K=1, D=64, S=320, lengths=[130, 191], num_splits=2, interpret=True)


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8, 13, 132])
def test_split_steps_are_balanced(splits):
    num_steps = jnp.arange(0, 400, dtype=jnp.int32)
    per_split = jax.vmap(lambda n: mosaic_kernel.split_steps(n, jnp.arange(splits, dtype=jnp.int32), splits))
    first, count = map(np.asarray, per_split(num_steps))  # [T, splits]
    n = np.asarray(num_steps)
    # Contiguous shares of [0, n) in split order.
    np.testing.assert_array_equal(first[:, 0], 0)
    np.testing.assert_array_equal(first[:, 1:], first[:, :-1] + count[:, :-1])
    np.testing.assert_array_equal(first[:, -1] + count[:, -1], n)
    np.testing.assert_array_equal(count.max(axis=1), -(-n // splits))  # the fewest possible
    assert (count.max(axis=1) - count.min(axis=1) <= 1).all()


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8, 16, 64])
@pytest.mark.parametrize("num_nodes", [1, 8, 64, 100])
def test_tile_plan_visits_every_key_once(splits, num_nodes, block_kv=128):
    # Every key of [0, L + N) is owned by exactly one step of one split (an aligned tile, or the part
    # of a split's chunk of the final tile from chunk_owned_from on, as the kernel masks it), and no
    # tile reaches past max(L + N + 7, block_kv): with prefix lengths around tile and 8-row boundaries.
    prefixes = np.unique(np.concatenate([np.arange(0, 3 * block_kv + 9), [8191, 8192, 8193, 8192 + 57]]))
    ends = jnp.asarray(prefixes + num_nodes, jnp.int32)
    plan = jax.vmap(lambda end: mosaic_kernel.tile_plan(end, jnp.arange(splits, dtype=jnp.int32), splits,
                                                        block_kv))(ends)
    plan = mosaic_kernel.TilePlan(*map(np.asarray, plan))  # fields [ends, splits] or [ends]
    chunk = mosaic_kernel.final_chunk(splits, block_kv)
    assert chunk % 64 == 0 and splits * chunk >= block_kv
    for row, end in enumerate(np.asarray(ends)):
        visits = np.zeros(end + block_kv + 8, np.int32)
        for split in range(splits):
            first, num_aligned = plan.first[row, split], plan.num_aligned[row, split]
            visits[first * block_kv:(first + num_aligned) * block_kv] += 1
            has_chunk = plan.steps[row, split] - num_aligned
            assert has_chunk == (split * chunk < block_kv)
            if has_chunk:
                start = 8 * plan.chunk_start_8[row, split]
                assert start + chunk <= max(end + 7, block_kv)
                visits[max(start, plan.chunk_owned_from[row, split]):start + chunk] += 1
        np.testing.assert_array_equal(visits[:end], 1, err_msg=f"{end=}")
        assert plan.aligned[row] * block_kv < end  # aligned tiles stay below the final tile's end
        assert plan.num_aligned[row].max() - plan.num_aligned[row].min() <= 1


def test_final_values_hold_the_final_tile_with_nan_past_the_tree_zeroed(block_kv=128):
    # The copy the producer streams the final tile's V chunks from (see the kernel's docstring).
    B, S = 6, 400
    ends = jnp.array([1, 77, 128, 129, 171, 400], jnp.int32)  # shorter than a tile, on and off the 8-row grid
    v = jnp.arange(B * S, dtype=jnp.float32).reshape(B, S, 1, 1) + 1
    v = jnp.where(jnp.arange(S)[None, :, None, None] >= ends[:, None, None, None], jnp.nan, v).astype(jnp.bfloat16)
    tiles = np.asarray(mosaic_kernel.final_values(v, ends, block_kv), np.float32)[:, :, 0, 0]  # [B, block_kv]
    assert np.isfinite(tiles).all()
    for b, end in enumerate(np.asarray(ends)):
        start = int(mosaic_kernel.final_tile_start(jnp.int32(end), block_kv))
        assert start % 8 == 0 and start + block_kv >= end and start + block_kv <= max(end + 7, block_kv)
        want = np.asarray(v[b, start:start + block_kv, 0, 0], np.float32)
        np.testing.assert_array_equal(tiles[b, :end - start], want[:end - start])
        np.testing.assert_array_equal(tiles[b, end - start:], 0)


@pytest.mark.parametrize("P, rows", [(2, 4), (3, 16), (8, 4)])
def test_merge_splits_matches_the_xla_merge(P, rows):
    # Pallas interpreter on CPU; splits that saw no key of a row (lse -inf, zero parts), rows no split
    # saw, and split counts that are not powers of two (the kernel unrolls its loop over them).
    rng = np.random.default_rng(5)
    B, H, Np, D = 2, 4, 64, 128
    parts = jnp.asarray(rng.standard_normal((B, P, H, Np, D)), jnp.bfloat16)
    lse = rng.standard_normal((B, P, H, Np)).astype(np.float32) * 4
    lse[:, 1, :, :20] = -np.inf
    lse[0, :, 2, 30:33] = -np.inf
    parts = jnp.where(jnp.isinf(jnp.asarray(lse))[..., None], 0, parts)
    out, merged_lse = mosaic_kernel.merge_splits(parts, jnp.asarray(lse), interpret=True, rows=rows)
    want_out, want_lse = combine_splits(parts, jnp.asarray(lse), axis=1)  # [B, H, Np, D], [B, H, Np]
    assert out.shape == (B, Np, H, D) and out.dtype == parts.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(jnp.swapaxes(want_out, 1, 2).astype(parts.dtype), np.float32),
                               atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(merged_lse, want_lse, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out[0, 30:33, 2]) == 0) and np.all(np.isneginf(merged_lse[0, 2, 30:33]))


def test_tree_mosaic_rejects_what_it_does_not_cover():
    q = jnp.ones((1, 4, 3, 64), jnp.bfloat16)  # G = 3: odd groups stay on the portable kernel
    k = jnp.ones((1, 32, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="backend='mosaic' covers"):
        tree_attention(q, k, k, jnp.zeros((1,), jnp.int32), np.eye(4, dtype=bool), backend="mosaic")
    with pytest.raises(ValueError, match="backend must be one of"):
        tree_attention(q, k, k, jnp.zeros((1,), jnp.int32), np.eye(4, dtype=bool), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5, 8])
def test_tree_mosaic_issue_shape_on_gpu(num_splits):
    if not on_hopper():
        pytest.skip("the Mosaic GPU tree kernel needs a Hopper GPU")
    rng = np.random.default_rng(64)
    q, k, v, lengths = tree_inputs(rng, B=2, N=64, H=32, K=8, D=128, S=8192 + 64 + 37, dtype=jnp.bfloat16,
                                   lengths=[8192, 3001], poison=False)
    mask = np.stack([random_tree(rng, 64), random_tree(rng, 64, 20)])
    check_against_reference(q, k, v, lengths, mask, num_splits=num_splits, backend="mosaic")
    # Rows shorter than one tile or ending off the 8-row grid, NaN past the trees.
    _case(3, B=3, N=21, H=8, K=2, D=128, S=400, lengths=[0, 90, 301], num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_mosaic_ignores_nan_past_the_tree_on_gpu(num_splits, seed):
    """Issue 18: on an H200 a row whose slots past cache_lengths + N held NaN came back NaN (B=2,
    S=2048, N=128, GQA 16/8, D=128, lengths [1920, 1]): 0 * NaN in the final tile's P V product."""
    if not on_hopper():
        pytest.skip("the Mosaic GPU tree kernel needs a Hopper GPU")
    rng = np.random.default_rng(seed)
    q, k, v, lengths = tree_inputs(rng, B=2, N=128, H=16, K=8, D=128, S=2048, dtype=jnp.bfloat16,
                                   lengths=[1920, 1])
    mask = np.stack([random_tree(rng, 128), random_tree(rng, 128, 30)])
    out = tree_attention(q, k, v, lengths, mask, num_splits=num_splits, backend="mosaic")
    assert np.isfinite(np.asarray(out, np.float32)).all()
    check_against_reference(q, k, v, lengths, mask, num_splits=num_splits, backend="mosaic")
    # Ragged rows around tile and 8-row boundaries, random trees, NaN tails.
    lengths = [int(x) for x in rng.integers(0, 2048 - 64 + 1, size=6)] + [0, 1, 7, 127, 2048 - 64]
    _case(seed, B=len(lengths), N=64, H=16, K=8, D=128, S=2048, lengths=lengths, batched_mask=True,
          num_splits=num_splits)
