"""The Hopper tree kernel (`backend="mosaic"`) against the pure-jnp reference.

Slots past each row's tree hold finite values here (not NaN as in test_tree_attention): the Mosaic
kernel may read up to 7 of them, masked (see its docstring).

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
from test_tree_attention import check_against_reference, make_inputs, random_tree


def _case(seed, *, B, N, H, K, D, S, dtype=jnp.bfloat16, lengths=None, batched_mask=False, poison=False,
          **kwargs):
    rng = np.random.default_rng(seed)
    q, k, v, lengths = make_inputs(rng, B=B, N=N, H=H, K=K, D=D, S=S, dtype=dtype, lengths=lengths,
                                   poison=poison)
    mask = np.stack([random_tree(rng, N, 3) for _ in range(B)]) if batched_mask else random_tree(rng, N)
    check_against_reference(q, k, v, lengths, mask, backend="mosaic", **kwargs)


@pytest.mark.simulator
@pytest.mark.parametrize("num_splits", [1, 3])
def test_tree_mosaic_in_simulator(num_splits):
    # Row 0's tree starts mid-tile, row 1's prefix ends exactly on a tile boundary (256).
    _case(0, B=2, N=21, H=4, K=2, D=64, S=300, lengths=[150, 256], batched_mask=True,
          num_splits=num_splits, interpret=True)


@pytest.mark.simulator
def test_tree_mosaic_two_node_blocks_and_head_dim_128_in_simulator():
    _case(1, B=1, N=100, H=4, K=1, D=128, S=400, dtype=jnp.float16, lengths=[250], num_splits=2,
          interpret=True)


@pytest.mark.simulator
def test_tree_mosaic_sequence_shorter_than_a_tile_in_simulator():
    # prefix + N < one tile: the final tile starts at 0 and reads slots past the tree, which must hold
    # finite values (the kernel's documented limit), so nothing is poisoned here.
    _case(2, B=2, N=8, H=2, K=1, D=64, S=160, lengths=[0, 30], poison=False, num_splits=1, interpret=True)


@pytest.mark.simulator
def test_tree_mosaic_single_token_decode_in_simulator():
    _case(4, B=2, N=1, H=2, K=1, D=64, S=320, lengths=[130, 191], num_splits=2, interpret=True)


def test_tree_mosaic_rejects_what_it_does_not_cover():
    q = jnp.ones((1, 4, 3, 64), jnp.bfloat16)  # G = 3: odd groups stay on the portable kernel
    k = jnp.ones((1, 32, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="backend='mosaic' covers"):
        tree_attention(q, k, k, jnp.zeros((1,), jnp.int32), np.eye(4, dtype=bool), backend="mosaic")
    with pytest.raises(ValueError, match="backend must be one of"):
        tree_attention(q, k, k, jnp.zeros((1,), jnp.int32), np.eye(4, dtype=bool), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_tree_mosaic_issue_shape_on_gpu(num_splits):
    if "9." not in str(getattr(jax.devices()[0], "compute_capability", "")):
        pytest.skip("the Mosaic GPU tree kernel needs a Hopper GPU")
    rng = np.random.default_rng(64)
    q, k, v, lengths = make_inputs(rng, B=2, N=64, H=32, K=8, D=128, S=8192 + 64 + 37, dtype=jnp.bfloat16,
                                   lengths=[8192, 3001], poison=False)
    mask = np.stack([random_tree(rng, 64), random_tree(rng, 64, 20)])
    check_against_reference(q, k, v, lengths, mask, num_splits=num_splits, backend="mosaic")
    # Rows shorter than one tile or ending off the 8-row grid (finite values past the tree: see the
    # kernel's docstring).
    _case(3, B=3, N=21, H=8, K=2, D=128, S=400, lengths=[0, 90, 301], num_splits=num_splits)
