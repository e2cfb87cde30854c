"""Every flash-attention kernel variant lowers for CUDA (Triton), checked on a CPU-only machine.

Interpret mode never runs the Triton lowering, so a construct that only fails there (an op with no
Triton rule, a dtype mismatch) would otherwise reach the GPU unnoticed. Lowering needs no GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention

B, T, S, H, K, D = 2, 333, 517, 8, 2, 80
FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(64, 3)),
    "softcap": dict(softcap=3.0),
    "dropout": dict(dropout_rate=0.1, dropout_seed=1),
    "segments+mask+alibi": dict(
        segment_ids=(jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)),
        mask=jnp.ones((B, 1, T, S), bool), alibi_slopes=jnp.ones((H,), jnp.float32)),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_forward_and_backward_lower_for_cuda(feature):
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16)

    def fwd_bwd(q, k, v, do):
        attention = functools.partial(flash_attention, interpret=False, **FEATURES[feature])
        _, vjp = jax.vjp(attention, q, k, v)
        return vjp(do)

    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3  # forward, dK/dV and dQ kernels
