"""The Hopper backward (`backend="mosaic"`) against the pure-jnp reference, value and gradients.

`gpu` tests run the wgmma kernels on an H100/H200 over the argument grid of the portable tests (odd
lengths, T != S, GQA/MQA, causal bottom-right, windows, segment ids with fully masked rows, softcap,
bf16 and f16, head dims 64, 128 and 256), in both dQ modes (D=256 has the deterministic one alone). `simulator` tests run the deterministic kernels in Mosaic GPU's CPU simulator (opt-in, see
conftest). Tolerance basis as in test_flash_attention: 2x the error of XLA in the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash_attention
from pallas_kernels.fa2 import mosaic_bwd
from pallas_kernels.fa2.mosaic_bwd import MosaicBwdConfig
from pallas_kernels.testing import attention_inputs
from test_flash_attention import _output_and_grads, assert_within_xla_error
from test_mosaic_forward import Packed, empty_rows, resolve_segments, simulator_segment_ids

GRID = [
    # B, T, S, H, K, D, kwargs
    (2, 256, 256, 4, 4, 128, {}),
    (1, 333, 517, 4, 2, 128, {"causal": True}),  # bottom-right causal, padded rows and keys
    (2, 512, 512, 4, 1, 64, {"causal": True}),  # MQA: the group loop of the dK/dV kernel
    (1, 700, 300, 2, 2, 64, {"causal": True}),  # T > S: rows that see no key
    (1, 600, 900, 4, 2, 128, {"window_size": (100, 20)}),
    (1, 77, 1, 2, 1, 64, {}),  # one key
    (1, 1, 129, 2, 2, 128, {"causal": True}),  # one query
    # segment ids (packed documents, one fully masked row): every step masked by id
    (2, 1000, 1000, 8, 2, 128, {"causal": True, "segment_ids": Packed(6)}),
    (1, 333, 517, 4, 1, 64, {"segment_ids": Packed(4)}),  # padded rows and keys, MQA
    (1, 600, 900, 4, 2, 128, {"window_size": (100, 20), "segment_ids": Packed(5)}),
    # logit softcapping, q and k scaled by 2 so that the cap bites (scores of std ~4 against 5 or 30)
    (2, 512, 512, 4, 1, 64, {"causal": True, "softcap": 5.0, "input_scale": 2.0}),
    (1, 333, 517, 4, 2, 128, {"softcap": 30.0, "input_scale": 2.0}),
    (1, 600, 900, 4, 2, 128, {"window_size": (100, 20), "segment_ids": Packed(5), "softcap": 5.0,
                              "input_scale": 2.0}),
    # D=256: the head dim split between the consumers (`split_head_dim`)
    (1, 333, 517, 4, 2, 256, {"causal": True}),
    (2, 512, 512, 4, 1, 256, {}),
    (1, 600, 900, 4, 2, 256, {"window_size": (100, 20), "segment_ids": Packed(5)}),
]


def _check(B, T, S, H, K, D, *, dtype=jnp.bfloat16, interpret=False, deterministic=True, seed=0,
           input_scale=1.0, **kwargs):
    """input_scale multiplies q and k (before the cast to dtype): large scores make a softcap bite."""
    kwargs = resolve_segments(kwargs, seed, B, T, S)
    q, k, v, do = attention_inputs(seed, B, T, S, H, K, D, jnp.float32)
    q, k, v, do = (x.astype(dtype) for x in (q * input_scale, k * input_scale, v, do))
    attention = functools.partial(flash_attention, backend=("portable", "mosaic"), interpret=interpret,
                                  deterministic=deterministic)
    ours = jax.jit(lambda *a: _output_and_grads(attention, *a, **kwargs))(q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    exact = _output_and_grads(attention_reference, *f32, **kwargs)
    same_dtype = _output_and_grads(functools.partial(
        attention_reference, compute_dtype=dtype, precision=jax.lax.Precision.DEFAULT), q, k, v, do, **kwargs)
    for name, a, e, s in zip(("out", "dq", "dk", "dv"), ours, exact, same_dtype):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_within_xla_error(a, e, s, dtype, name)
    if kwargs.get("segment_ids") is not None:  # rows that see no key: zero output and dQ, never NaN
        empty = empty_rows(kwargs["segment_ids"], T, S, kwargs.get("causal", False))
        assert empty.any(), "the case should hold a fully masked row"
        for name, a in zip(("out", "dq"), ours[:2]):
            np.testing.assert_array_equal(np.asarray(a, np.float32)[empty], 0.0, err_msg=name)
    return ours


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("B,T,S,H,K,D,kwargs", GRID)
def test_mosaic_backward_on_gpu(B, T, S, H, K, D, kwargs, deterministic):
    _check(B, T, S, H, K, D, deterministic=deterministic, **kwargs)


@pytest.mark.gpu
def test_mosaic_backward_float16_on_gpu():
    _check(2, 300, 300, 4, 2, 128, dtype=jnp.float16, causal=True)


@pytest.mark.gpu
def test_mosaic_backward_float16_d256_on_gpu():
    _check(2, 300, 300, 4, 2, 256, dtype=jnp.float16, causal=True)


@pytest.mark.gpu
def test_mosaic_backward_deterministic_mode_is_bitwise_reproducible():
    first = _check(1, 1000, 1000, 4, 2, 128, causal=True, seed=3)
    second = _check(1, 1000, 1000, 4, 2, 128, causal=True, seed=3)
    for a, b in zip(first, second):
        assert bool(jnp.all(a == b))


@pytest.mark.simulator
@pytest.mark.parametrize("T,S,kwargs", [
    (128, 128, {}),
    (77, 129, {"causal": True}),
    (130, 200, {"window_size": (40, 8)}),
])
def test_mosaic_backward_in_simulator(T, S, kwargs):
    _check(1, T, S, 2, 1, 64, interpret=True, **kwargs)


@pytest.mark.simulator
@pytest.mark.parametrize("T,S,H,K,kwargs", [
    pytest.param(128, 128, 2, 1, {}, marks=pytest.mark.simulator_smoke),
    (77, 129, 2, 1, {"causal": True}),  # padded rows and keys
    (130, 200, 2, 1, {"window_size": (40, 8), "dtype": jnp.float16}),
    (200, 150, 4, 2, {"causal": True}),  # T > S: rows that see no key; two KV heads
])
def test_mosaic_backward_d256_in_simulator(T, S, H, K, kwargs):
    """The split-head-dim kernels (D=256): Pᵀ/dSᵀ and P/dS hand-offs between the consumers, each
    accumulating half of dK, dV or dQ's columns."""
    _check(1, T, S, H, K, 256, interpret=True, **kwargs)


@pytest.mark.simulator
def test_mosaic_backward_d256_segments_in_simulator():
    _check(2, 256, 256, 2, 1, 256, interpret=True, causal=True, segment_ids=simulator_segment_ids(256, 256))


@pytest.mark.simulator
def test_mosaic_backward_segments_in_simulator():
    """Both kernels (deterministic dQ) with segment ids under a causal band: query and key tiles
    skipped by id range, tiles masked by id alone, fully masked rows (see simulator_segment_ids).
    The atomic dQ mode is left to the lowering guard and the `gpu` grid: in the simulator (jax 0.10.2)
    its dK/dV kernel, with or without segments, stops on the mutable dQ ref argument (a KeyError in
    the simulator's memory-space lookup)."""
    _check(2, 256, 256, 2, 1, 64, interpret=True, causal=True, segment_ids=simulator_segment_ids(256, 256))


@pytest.mark.simulator
def test_mosaic_backward_tile_aligned_documents_in_simulator():
    """Documents that start and end on tile boundaries, as the packed train step lays them out (a
    GPU run of it stalled): row 0 holds two 128-token documents shared by queries and keys, row 1 a
    query tile whose id no key has and a key tile whose id no query has, so a forward CTA and a dK/dV
    CTA visit no tile at all (zero-step producer and consumer loops) in a GQA group of 4."""
    kv_ids = np.repeat([[1, 2], [1, 2]], 128, axis=1)
    q_ids = np.repeat([[1, 2], [1, 3]], 128, axis=1)
    _check(2, 256, 256, 4, 1, 64, interpret=True, causal=True,
           segment_ids=(jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)))


def test_split_head_dim_config():
    """D=256's config: 64-row CTAs (padding multiples of 64), 209 KB of shared memory with two ring
    slots and too much with three, deterministic 64-row tiles only; softcap left to the portable backward."""
    config = MosaicBwdConfig.for_head_dim(256)
    assert config.split_head_dim and (config.q_multiple, config.kv_multiple) == (64, 64)
    assert MosaicBwdConfig.for_head_dim(128).q_multiple == 128  # unchanged: two consumers of 64 rows
    smem = mosaic_bwd.dkdv_smem_bytes(config, head_dim=256, itemsize=2, segments=False)
    assert smem == 2 * 64 * 256 * 2 + 2 * 2 * 64 * 256 * 2 + 2 * 64 * 64 * 2 + 2 * 2 * 64 * 4 <= mosaic_bwd.SMEM_LIMIT_BYTES
    three = dataclasses.replace(config, num_stages=3)
    assert mosaic_bwd.dkdv_smem_bytes(three, head_dim=256, itemsize=2, segments=False) > mosaic_bwd.SMEM_LIMIT_BYTES
    with pytest.raises(ValueError, match="split_head_dim"):
        dataclasses.replace(config, block_q_dq=128)
    with pytest.raises(ValueError, match="split_head_dim"):
        dataclasses.replace(config, deterministic=False)
    with pytest.raises(TypeError, match="split_head_dim"):
        MosaicBwdConfig(split_head_dim=1)
    assert mosaic_bwd.supports(dtype=jnp.bfloat16, head_dim=256, features=("causal", "segments"))
    assert not mosaic_bwd.supports(dtype=jnp.bfloat16, head_dim=256, features=("softcap",))
    assert not mosaic_bwd.supports(dtype=jnp.float32, head_dim=256, features=())


def test_mosaic_backward_rejects_calls_it_does_not_cover():
    q, k, v, _ = attention_inputs(0, 1, 64, 64, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="backward"):
        flash_attention(q, k, v, alibi_slopes=jnp.ones((2,), jnp.float32), backend=("portable", "mosaic"))
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, backend=("mosaic", "fast"))
    with pytest.raises(TypeError, match="deterministic"):
        flash_attention(q, k, v, deterministic="no")
    q, k, v, _ = attention_inputs(0, 1, 64, 64, 2, 2, 256, jnp.bfloat16)
    with pytest.raises(ValueError, match="backward"):  # D=256 with softcap, the backward's kernel named
        flash_attention(q, k, v, softcap=5.0, backend=("portable", "mosaic"))
