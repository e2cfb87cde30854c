"""The Hopper forward (`backend="mosaic"`) against the pure-jnp reference.

On CPU the kernel runs in Mosaic GPU's simulator, which executes the three warpgroups as threads with
real barriers and TMA copies: it checks the tile ranges, the producer/consumer protocol, masking and
the epilogue. The simulator lacks wgmma with a transposed operand, so there the two products are
plain dots on the shared-memory tiles; the `gpu` tests run the wgmma path itself. Tolerance basis as
in test_flash_attention: 2x the error of XLA in the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash_attention
from pallas_kernels.common.device import on_hopper
from pallas_kernels.fa2 import mosaic_fwd
from pallas_kernels.testing import attention_inputs
from test_flash_attention import _output_and_grads, assert_within_xla_error


def _check(B, T, S, H, K, D, *, dtype=jnp.bfloat16, interpret=True, grads=False, seed=0, **kwargs):
    q, k, v, do = attention_inputs(seed, B, T, S, H, K, D, dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    same_dtype_ref = lambda *a, **kw: attention_reference(
        *a, compute_dtype=dtype, precision=jax.lax.Precision.DEFAULT, **kw)
    if grads:
        ours = jax.jit(lambda *a: _output_and_grads(
            flash_attention, *a, backend="mosaic", interpret=interpret, **kwargs))(q, k, v, do)
        exact = _output_and_grads(attention_reference, *f32, **kwargs)
        same_dtype = _output_and_grads(same_dtype_ref, q, k, v, do, **kwargs)
        names = ("out", "dq", "dk", "dv")
    else:
        ours = flash_attention(q, k, v, backend="mosaic", interpret=interpret, return_lse=True, **kwargs)
        exact = attention_reference(*f32[:3], return_lse=True, **kwargs)
        same_dtype = same_dtype_ref(q, k, v, return_lse=True, **kwargs)
        names = ("out", "lse")
    for name, a, e, s in zip(names, ours, exact, same_dtype):
        if name == "lse":
            finite = np.isfinite(np.asarray(e))
            np.testing.assert_array_equal(np.isfinite(np.asarray(a)), finite, err_msg="lse -inf pattern")
            a, e, s = (jnp.where(finite, x, 0.0) for x in (a, e, s))
        assert_within_xla_error(a, e, s, dtype, name)


@pytest.mark.parametrize("T,S,kwargs", [
    pytest.param(128, 128, {}, marks=pytest.mark.simulator_smoke),
    (128, 256, {"causal": True}),  # bottom-right aligned: the CTA sees a band, the producer skips tiles
    (77, 129, {}),  # padded queries and keys past kv_len masked in the last tile
    (130, 75, {"causal": True}),  # T > S: the first rows see no key (zeros, lse -inf)
    (128, 200, {"window_size": (40, 8)}),  # both window sides: masked, unmasked and skipped tiles
])
@pytest.mark.simulator
def test_mosaic_forward_in_simulator(T, S, kwargs):
    _check(1, T, S, 2, 1, 64, **kwargs)


@pytest.mark.simulator
def test_mosaic_forward_gqa_and_head_dim_128_in_simulator():
    _check(1, 128, 128, 4, 2, 128, dtype=jnp.float16, causal=True)


@pytest.mark.simulator
def test_mosaic_forward_feeds_the_portable_backward_in_simulator():
    _check(1, 96, 160, 2, 1, 64, causal=True, grads=True)


def test_mosaic_backend_rejects_what_it_does_not_cover():
    q = jnp.ones((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="backend='mosaic' covers"):
        flash_attention(q, q, q, backend="mosaic")
    with pytest.raises(ValueError, match="softcap"):
        flash_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                        softcap=5.0, backend="mosaic")
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(q, q, q, backend="cuda")


def test_mosaic_tile_ranges_bound_the_band():
    problem = mosaic_fwd.MosaicProblem(q_len=256, kv_len=256, q_offset=0, window_left=64,
                                       window_right=0, sm_scale=1.0, group_size=1)
    lo, full_lo, full_hi, hi = (int(x) for x in mosaic_fwd._key_tile_ranges(128, 128, problem, 64, 256))
    # Rows 128..255 see keys [row - 64, row]: tiles 1..3 hold some visible key, none is visible to all rows.
    assert (lo, hi) == (1, 4)
    assert lo <= full_lo <= full_hi <= hi
    assert full_hi - full_lo == 0


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_mosaic_forward_on_gpu(causal, D):
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    _check(2, 1000, 1000, 8, 2, D, interpret=False, causal=causal, grads=True)
    _check(1, 333, 517, 4, 4, D, interpret=False, causal=causal, window_size=(100, -1) if causal else (-1, -1))
