"""The Hopper forward (`backend="mosaic"`) against the pure-jnp reference.

On CPU the kernel runs in Mosaic GPU's simulator, which executes the three warpgroups as threads with
real barriers and TMA copies: it checks the tile ranges, the producer/consumer protocol, masking and
the epilogue. The simulator lacks wgmma with a transposed operand, so there the two products are
plain dots on the shared-memory tiles; the `gpu` tests run the wgmma path itself. Tolerance basis as
in test_flash_attention: 2x the error of XLA in the input dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash_attention
from pallas_kernels.common.device import on_hopper
from pallas_kernels.fa2 import api, mosaic_fwd
from pallas_kernels.testing import attention_inputs
from test_flash_attention import _output_and_grads, _segments, assert_within_xla_error

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Packed:
    """Segment ids for a test case, drawn when its shapes are known: `num_segments` packed documents
    (ascending random ids shared by queries and keys), and query row T // 2 of batch row 0 in a
    segment that no key has, a fully masked row (which also makes that row's ids non-monotonic)."""

    num_segments: int

    def ids(self, seed, B, T, S):
        q_ids, kv_ids = _segments(seed, B, T, S, self.num_segments)
        return q_ids.at[0, T // 2].set(-1), kv_ids


def simulator_segment_ids(T, S):
    """(q_ids [2, T], kv_ids [2, S]) for T, S in (128, 256]: for 128-row query and key tiles, batch row
    0 has tiles whose id ranges do not overlap (the kernels skip them) and fully masked row 130;
    batch row 1 has three documents across the tiles (a tile visible whole by position is masked by
    id alone) and fully masked row 0."""
    q0 = np.r_[[0] * 128, [1] * (T - 128)]
    q0[130 % T] = 9
    k0 = np.r_[[0] * 128, [1] * (S - 128)]
    q1 = np.repeat([0, 1, 2], [50, 90, T - 140])
    q1[0] = 3
    k1 = np.repeat([0, 1, 2], [50, 90, S - 140])
    return jnp.asarray(np.stack([q0, q1]), jnp.int32), jnp.asarray(np.stack([k0, k1]), jnp.int32)


def resolve_segments(kwargs, seed, B, T, S):
    """kwargs with a `Packed` segment_ids drawn for these shapes."""
    if isinstance(kwargs.get("segment_ids"), Packed):
        kwargs = dict(kwargs, segment_ids=kwargs["segment_ids"].ids(seed, B, T, S))
    return kwargs


def empty_rows(segment_ids, T, S, causal=False):
    """bool [B, T]: query rows that see no key (no key of their segment, or none by position)."""
    q_ids, kv_ids = (np.asarray(x) for x in segment_ids)
    same = q_ids[:, :, None] == kv_ids[:, None, :]
    if causal:
        same &= np.arange(S)[None, None, :] <= np.arange(T)[None, :, None] + (S - T)
    return ~same.any(-1)


def _variant_forward(q, k, v, variant, *, interpret, **kwargs):
    """(O, lse) of the planned call, planned again with `variant`'s `MosaicFwdConfig` fields (whose
    CTA rows, 192 with three consumers, set the padding)."""
    launch, _ = api.plan(q, k, v, backend="mosaic", interpret=interpret, **kwargs)
    config = dataclasses.replace(launch.mosaic_config, **variant)
    launch, aux = api.plan(q, k, v, backend="mosaic", interpret=interpret, mosaic_configs=(config, None), **kwargs)
    return api.forward(q, k, v, aux, launch)


def _check(B, T, S, H, K, D, *, dtype=jnp.bfloat16, interpret=True, grads=False, seed=0, input_scale=1.0,
           variant=None, **kwargs):
    """input_scale multiplies q and k (before the cast to dtype): large scores make a softcap bite.
    variant: `MosaicFwdConfig` fields that replace the default config's (forward only)."""
    kwargs = resolve_segments(kwargs, seed, B, T, S)
    q, k, v, do = attention_inputs(seed, B, T, S, H, K, D, jnp.float32)
    q, k, v, do = (x.astype(dtype) for x in (q * input_scale, k * input_scale, v, do))
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    same_dtype_ref = lambda *a, **kw: attention_reference(
        *a, compute_dtype=dtype, precision=jax.lax.Precision.DEFAULT, **kw)
    if grads and variant is not None:
        raise ValueError(f"variants are checked forward only: {variant=}, {grads=}")
    if grads:
        ours = jax.jit(lambda *a: _output_and_grads(
            flash_attention, *a, backend="mosaic", interpret=interpret, **kwargs))(q, k, v, do)
        exact = _output_and_grads(attention_reference, *f32, **kwargs)
        same_dtype = _output_and_grads(same_dtype_ref, q, k, v, do, **kwargs)
        names = ("out", "dq", "dk", "dv")
    else:
        if variant is None:
            ours = flash_attention(q, k, v, backend="mosaic", interpret=interpret, return_lse=True, **kwargs)
        else:
            ours = _variant_forward(q, k, v, variant, interpret=interpret, **kwargs)
        exact = attention_reference(*f32[:3], return_lse=True, **kwargs)
        same_dtype = same_dtype_ref(q, k, v, return_lse=True, **kwargs)
        names = ("out", "lse")
    for name, a, e, s in zip(names, ours, exact, same_dtype):
        if name == "lse":
            finite = np.isfinite(np.asarray(e))
            np.testing.assert_array_equal(np.isfinite(np.asarray(a)), finite, err_msg="lse -inf pattern")
            a, e, s = (jnp.where(finite, x, 0.0) for x in (a, e, s))
        assert_within_xla_error(a, e, s, dtype, name)
    if kwargs.get("segment_ids") is not None:  # rows that see no key: exactly zero, never NaN
        empty = empty_rows(kwargs["segment_ids"], T, S, kwargs.get("causal", False))
        assert empty.any(), "the case should hold a fully masked row"
        for name, a in zip(names, ours):
            if name in ("out", "dq"):
                np.testing.assert_array_equal(np.asarray(a, np.float32)[empty], 0.0, err_msg=name)
    return ours


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
def test_mosaic_forward_segments_in_simulator():
    """Segment ids with a causal band: skipped tiles, tiles masked by id alone, fully masked rows."""
    _check(2, 256, 256, 2, 1, 64, causal=True, segment_ids=simulator_segment_ids(256, 256))


@pytest.mark.simulator
@pytest.mark.simulator_smoke
def test_mosaic_forward_segments_smoke_in_simulator():
    """One CTA, one key tile: the ids travel with the tile and mask it, and row 3 sees no key."""
    q_ids = jnp.asarray(np.r_[[0] * 60, [1] * 68], jnp.int32).at[3].set(5)[None]
    kv_ids = jnp.asarray(np.r_[[0] * 70, [1] * 58], jnp.int32)[None]
    _check(1, 128, 128, 1, 1, 64, segment_ids=(q_ids, kv_ids))


@pytest.mark.simulator
def test_mosaic_softcap_forward_and_backward_in_simulator():
    """Logit softcapping through both Hopper kernels (forward, then dK/dV and deterministic dQ): the
    capped scores' output and lse, and gradients through the cap's 1 - tanh^2. Scores of std ~4 (q and
    k scaled by 2, softmax scale 1/8) against a cap of 5: tanh is far from linear on many of them.
    One tile, as the smoke cases: a 77 x 129 causal case hung in the simulator here (its warpgroup
    threads waiting on barriers in the forward, the conftest's intermittent deadlock), so the masked
    tiles' cap is left to the `gpu` tests."""
    kwargs = dict(softcap=5.0, input_scale=2.0)
    _check(1, 128, 128, 2, 1, 64, **kwargs)
    _check(1, 128, 128, 2, 1, 64, grads=True, **kwargs)


@pytest.mark.simulator
def test_mosaic_forward_gqa_and_head_dim_128_in_simulator():
    _check(1, 128, 128, 4, 2, 128, dtype=jnp.float16, causal=True)


@pytest.mark.simulator
def test_mosaic_forward_feeds_the_portable_backward_in_simulator():
    _check(1, 96, 160, 2, 1, 64, causal=True, grads=True)


# The scheduling variants of `MosaicFwdConfig` (issue 17). In the simulator the products are plain
# dots, so early_k_wait only moves a barrier wait and the row_sum orders only move a sum (the fence is
# an identity): these cases check the barrier protocol and the results, not the speed. persistent
# runs its whole protocol (work items per CTA, the ring carried across them, the next queries loaded
# during the store): num_ctas=3 for 4 work items gives CTA 0 two items. Each item takes 3 key tiles,
# an odd number of steps for the 2-slot ring, so that CTA 0's second item starts in slot 1: a kernel
# that restarted the ring's numbering per item would read the wrong slot.
VARIANTS = {
    "early-k-wait": dict(early_k_wait=True),
    "fenced-sum": dict(row_sum_order="fenced"),
    "sum-during-pv": dict(row_sum_order="during_pv"),
    "persistent": dict(persistent=True, num_ctas=3),
    # CTA 2 takes items 2 and 3 (the second wave counted from the far end), CTAs 0 and 1 one each.
    "persistent-serpentine": dict(persistent=True, num_ctas=3, serpentine=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.simulator
def test_mosaic_forward_variant_in_simulator(variant):
    """A causal band (bottom-right aligned) with padded rows and keys: masked and unmasked tiles."""
    _check(1, 250, 380, 2, 1, 64, causal=True, variant=VARIANTS[variant])


@pytest.mark.simulator
@pytest.mark.simulator_smoke
def test_mosaic_forward_all_variants_smoke_in_simulator():
    """Every variant at once on a persistent grid of 3 CTAs over 4 work items of 3 key tiles each
    (a left window and keys past kv_len: masked edges around an unmasked tile)."""
    _check(1, 256, 380, 2, 1, 64, window_size=(200, -1),
           variant=dict(persistent=True, num_ctas=3, early_k_wait=True, row_sum_order="during_pv"))


# Three consumer warpgroups (FA3's hdim-64 CTA: 3 x 64 query rows), with round-robin turns, without
# ping-pong, and persistent. T=250 pads to 384 rows (two CTAs of 192); S=380 takes two 192-key tiles
# (the second masked past kv_len) or three of 128. In the simulator the 4 warpgroups' barrier waits
# block XLA CPU pool threads (benchmarks/simulator_vjp_hang.py): with a pool of 2 threads (2 CPUs)
# these hang; NPROC=8 in the environment sizes XLA's pool to 8 and they pass in ~25 s each.
THREE_CONSUMERS = {
    "turns": dict(consumers=3),
    "kv192-no-ping-pong": dict(consumers=3, block_kv=192, ping_pong=False),
    "kv192-persistent-early-k": dict(consumers=3, block_kv=192, persistent=True, num_ctas=3, early_k_wait=True),
    # The D=64 default with the serpentine order: the turn passes on to the second wave's item.
    "persistent-early-k-serpentine": dict(consumers=3, persistent=True, num_ctas=3, early_k_wait=True,
                                          serpentine=True),
}


@pytest.mark.parametrize("variant", [pytest.param("turns", marks=pytest.mark.simulator_smoke),
                                     *list(THREE_CONSUMERS)[1:]])
@pytest.mark.simulator
def test_mosaic_forward_three_consumers_in_simulator(variant):
    _check(1, 250, 380, 2, 1, 64, causal=True, variant=THREE_CONSUMERS[variant])


# A persistent CTA passes the consumers' turns on from one work item to the next. With three
# consumers it once started each item with consumer 0 holding a turn of its own: if consumer 1 had not
# yet taken the last turn of an item, consumer 0 handed it the next item's first turn on top,
# completing consumer 1's turn barrier twice; on an H100 the CTA then deadlocked (4x4096x32x64 with
# 192-key tiles, about 21 items per CTA). Warpgroup 1 sleeping before each barrier wait reaches that
# schedule every time in the simulator, at 2 work items on 1 CTA (the 128-key tiles too); the
# simulator reports the double completion, and tests/slow_warpgroup_check.py exits at once with its
# source line. In a subprocess: a broken protocol would leave the simulator's threads waiting forever.
SLOW_CONSUMER = {
    "kv192-turns": dict(consumers=3, block_kv=192, early_k_wait=True),
    "kv128-turns": dict(consumers=3, block_kv=128, early_k_wait=True),
    "two-consumers": dict(),
}


@pytest.mark.parametrize("variant", list(SLOW_CONSUMER))
@pytest.mark.simulator
def test_mosaic_forward_persistent_with_a_slow_consumer_in_simulator(variant):
    spec = dict(shape=[1, 384, 380, 1, 1, 64], slow=1, delay_s=0.05,
                config=dict(SLOW_CONSUMER[variant], persistent=True, num_ctas=1))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "slow_warpgroup_check.py"), json.dumps(spec)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0 and "PASS" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.simulator
def test_mosaic_forward_persistent_segments_in_simulator():
    """A persistent grid with segment ids: each work item clips its key tiles to its queries' ids."""
    _check(2, 256, 256, 2, 1, 64, causal=True, segment_ids=simulator_segment_ids(256, 256),
           variant=dict(persistent=True, num_ctas=3))


@pytest.mark.parametrize("kwargs", [dict(row_sum_order="late"), dict(num_ctas=4),
                                    dict(persistent=True, num_ctas=-1), dict(early_k_wait=1),
                                    dict(persistent="yes"), dict(consumers=4), dict(consumers=1),
                                    dict(consumers=3.0), dict(consumers=True), dict(serpentine=True),
                                    dict(persistent=True, serpentine=1)])
def test_mosaic_fwd_config_checks_the_variants(kwargs):
    with pytest.raises((ValueError, TypeError),
                       match="row_sum_order|num_ctas|early_k_wait|persistent|consumers|serpentine"):
        mosaic_fwd.MosaicFwdConfig(**kwargs)


def test_mosaic_backend_rejects_what_it_does_not_cover():
    q = jnp.ones((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="backend='mosaic' covers"):
        flash_attention(q, q, q, backend="mosaic")
    with pytest.raises(ValueError, match="alibi"):
        flash_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                        alibi_slopes=jnp.ones((2,), jnp.float32), backend="mosaic")
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


def _visible(problem, rows, keys):
    """bool [len(rows), len(keys)]: which (query, key) positions attend, by position alone."""
    q, k = np.asarray(rows)[:, None], np.asarray(keys)[None, :]
    seen = (k < problem.kv_len) & (q >= 0)
    if problem.window_right >= 0:
        seen = seen & (k <= q + problem.q_offset + problem.window_right)
    if problem.window_left >= 0:
        seen = seen & (k >= q + problem.q_offset - problem.window_left)
    return seen


@pytest.mark.parametrize("consumers,block_kv", [(2, 64), (2, 128), (3, 128), (3, 192)])
def test_mosaic_step_counts_match_over_a_grid(consumers, block_kv):
    """Pure Python, no kernel: for every CTA of a grid of T, S (T != S, so q_offset of both signs),
    windows and paddings (the forward-alone and the vjp-with-portable-backward paddings differ), the
    consumers' loops (`consumer_loops`) take exactly the producer's hi - lo steps, also after segment
    clipping, so that every k/v ready/free barrier phase has its arrivals and waits; the visited
    tiles [lo, hi) hold every visible key of the CTA's real rows and the unmasked ones [full_lo,
    full_hi) only keys every row of the CTA sees. A mismatch here is a kernel that hangs on the GPU."""
    cta_rows = consumers * 64
    rng = np.random.default_rng(0)
    windows = [(-1, -1), (-1, 0), (0, 0), (16, 0), (64, 32), (-1, 5), (3, -1), (200, 0)]
    for T in (1, 50, 77, 128, 200):
        for S in (1, 63, 129, 256, 300):
            for left, right in windows:
                problem = mosaic_fwd.MosaicProblem(q_len=T, kv_len=S, q_offset=S - T, window_left=left,
                                                   window_right=right, sm_scale=1.0, group_size=1)
                for Tp in {-(-T // cta_rows) * cta_rows, -(-T // math.lcm(cta_rows, 256)) * math.lcm(cta_rows, 256)}:
                    Sp = -(-S // block_kv) * block_kv
                    masked = mosaic_fwd.masks_keys(problem, Sp)
                    ranks = np.arange(Tp // cta_rows)
                    row0s = np.asarray(mosaic_fwd.cta_first_row(problem, Tp, cta_rows, ranks))
                    ranges_of_ctas = mosaic_fwd._key_tile_ranges(row0s, cta_rows, problem, block_kv, Sp)
                    bounds = [np.broadcast_to(x, row0s.shape) for x in ranges_of_ctas]  # some are scalars
                    for c, row0 in enumerate(row0s):
                        lo, full_lo, full_hi, hi = (int(x[c]) for x in bounds)
                        case = f"{T=} {S=} {left=} {right=} {Tp=} {row0=}: {(lo, full_lo, full_hi, hi)}"
                        assert 0 <= lo <= full_lo <= full_hi <= hi <= Sp // block_kv, case
                        loops = mosaic_fwd.consumer_loops((lo, full_lo, full_hi, hi), masked, "mask")
                        assert [first for first, *_ in loops] == [0, *(last for _, last, _ in loops[:-1])], case
                        assert loops[-1][1] == hi - lo, case  # the producer's steps
                        rows = np.arange(row0, row0 + cta_rows)
                        seen = _visible(problem, rows[rows < T], np.arange(Sp))
                        tiles = np.flatnonzero(seen.reshape(len(seen), Sp // block_kv, block_kv).any((0, 2)))
                        assert np.all((lo <= tiles) & (tiles < hi)), (case, tiles)
                        whole = _visible(problem, rows, np.arange(full_lo * block_kv, full_hi * block_kv))
                        assert whole.all(), case
                        # Segment clipping (random [first, last) tile ranges, empty ones included)
                        # keeps the bounds ordered, so the loops still add up to the producer's steps.
                        ranges = jnp.asarray(rng.integers(0, Sp // block_kv + 1, (1, 3, 2)), jnp.int32)
                        for r in range(3):
                            clipped = [int(x) for x in mosaic_fwd.clip_to_segments(
                                ranges, 0, r, lo, full_lo, full_hi, hi)]
                            c_lo, c_full_lo, c_full_hi, c_hi = clipped
                            assert lo <= c_lo <= c_full_lo <= c_full_hi <= c_hi <= hi, (case, clipped)
                            loops = mosaic_fwd.consumer_loops(clipped, masked, "mask")
                            assert sum(last - first for first, last, _ in loops) == c_hi - c_lo, (case, clipped)


def test_segment_tile_ranges_cover_every_matching_tile():
    """The tile range a kernel visits holds every tile with a pair of equal ids, and the first and
    last tiles of the range hold one (random ids, not sorted, with values that match nothing)."""
    rng = np.random.default_rng(0)
    B, R, C, rb, cb = 3, 5, 7, 4, 8
    row_ids = jnp.asarray(rng.integers(0, 12, (B, R * rb)), jnp.int32)
    col_ids = jnp.asarray(np.sort(rng.integers(0, 12, (B, C * cb)), axis=1), jnp.int32)
    row_ids = row_ids.at[1].set(50)  # batch row 1: no key of the queries' segment anywhere
    ranges = np.asarray(mosaic_fwd.segment_tile_ranges(row_ids, col_ids, rb, cb))
    rows = np.asarray(row_ids).reshape(B, R, rb)
    cols = np.asarray(col_ids).reshape(B, C, cb)
    for b in range(B):
        for r in range(R):
            first, last = ranges[b, r]
            matching = [c for c in range(C) if np.isin(rows[b, r], cols[b, c]).any()]
            assert all(first <= c < last for c in matching), (b, r, first, last, matching)
            if b == 1:
                assert first == last == 0
            else:  # sorted keys: the range's ends overlap the rows' id range
                lo, hi = rows[b, r].min(), rows[b, r].max()
                for end in (first, last - 1):
                    assert cols[b, end].min() <= hi and lo <= cols[b, end].max(), (b, r, end)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_mosaic_forward_on_gpu(causal, D):
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    _check(2, 1000, 1000, 8, 2, D, interpret=False, causal=causal, grads=True)
    _check(1, 333, 517, 4, 4, D, interpret=False, causal=causal, window_size=(100, -1) if causal else (-1, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,S,H,K,D,kwargs", [
    (2, 1000, 1000, 8, 2, 64, {"causal": True}),  # packed training: causal within documents
    (2, 1000, 1000, 8, 2, 128, {"causal": True}),
    (1, 333, 517, 4, 1, 128, {}),  # padded rows and keys, MQA
    (1, 600, 900, 4, 2, 64, {"window_size": (100, 20)}),
    (1, 300, 300, 4, 2, 256, {"causal": True}),  # the forward's 64-key tiles at D=256
])
def test_mosaic_forward_segments_on_gpu(B, T, S, H, K, D, kwargs):
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    _check(B, T, S, H, K, D, interpret=False, segment_ids=Packed(6), **kwargs)
    # With gradients: the Hopper backward (both kernels) where it covers the head dim.
    _check(B, T, S, H, K, D, interpret=False, grads=True, segment_ids=Packed(6), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,S,H,K,D,kwargs", [
    (2, 1000, 1000, 8, 2, 128, {"causal": True, "softcap": 30.0}),
    (1, 333, 517, 4, 1, 64, {"softcap": 5.0}),  # padded rows and keys, MQA
    (1, 600, 900, 4, 2, 64, {"window_size": (100, 20), "softcap": 5.0}),
    (1, 300, 300, 4, 2, 256, {"causal": True, "softcap": 5.0}),  # D=256: portable backward
])
def test_mosaic_forward_softcap_on_gpu(B, T, S, H, K, D, kwargs):
    """Softcap in the Hopper forward (output and lse of the capped scores), then with gradients
    through the Hopper backward where it covers the head dim; q, k scaled by 2 so the cap bites."""
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    _check(B, T, S, H, K, D, interpret=False, input_scale=2.0, **kwargs)
    _check(B, T, S, H, K, D, interpret=False, input_scale=2.0, grads=True, **kwargs)


# On the GPU a persistent grid has one CTA per SM; "all" is every variant at once.
GPU_VARIANTS = dict(VARIANTS, persistent=dict(persistent=True),
                    all=dict(persistent=True, early_k_wait=True, row_sum_order="fenced"))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_mosaic_forward_variant_on_gpu(variant, causal, D):
    """The variants on the wgmma path."""
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    fields = GPU_VARIANTS[variant]
    _check(2, 1000, 1000, 8, 2, D, interpret=False, causal=causal, variant=fields)
    _check(1, 333, 517, 4, 4, D, interpret=False, variant=fields, window_size=(100, 0) if causal else (-1, -1))


# On the GPU: the wgmma path with 160 registers per consumer thread, at D=64 (where FA3 runs three
# consumers); the persistent grid has one CTA per SM.
GPU_THREE_CONSUMERS = dict(THREE_CONSUMERS, **{
    "kv192-turns-s3": dict(consumers=3, block_kv=192, num_stages=3),
    "kv192-persistent-early-k": dict(consumers=3, block_kv=192, persistent=True, early_k_wait=True)})


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_THREE_CONSUMERS))
@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_forward_three_consumers_on_gpu(variant, causal):
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    fields = GPU_THREE_CONSUMERS[variant]
    _check(2, 1000, 1000, 8, 2, 64, interpret=False, causal=causal, variant=fields)
    _check(1, 333, 517, 4, 4, 64, interpret=False, variant=fields, window_size=(100, 0) if causal else (-1, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("block_kv", [192, 128])
def test_mosaic_forward_persistent_three_consumers_many_items_on_gpu(block_kv):
    """The shape at which the persistent three-consumer kernel with 192-key tiles deadlocked on an
    H100 (benchmarks/mosaic_sweep.py, 4x4096x32x64): about 21 work items per CTA, and S padded to
    4224, its last key tile masked past kv_len. The deadlock needed a consumer late at the end of an
    item (see SLOW_CONSUMER), so the kernel runs 10 more times after the check, each bit-identical
    to the first."""
    if not on_hopper():
        pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
    fields = dict(consumers=3, block_kv=block_kv, persistent=True, early_k_wait=True)
    B, T, H, D = 4, 4096, 32, 64
    out, lse = _check(B, T, T, H, H, D, interpret=False, variant=fields)
    q, k, v = (x.astype(jnp.bfloat16) for x in attention_inputs(0, B, T, T, H, H, D, jnp.float32)[:3])
    for _ in range(10):
        again = _variant_forward(q, k, v, fields, interpret=False)
        np.testing.assert_array_equal(np.asarray(again[0], np.float32), np.asarray(out, np.float32))
        np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(lse))
