"""FlashAttention-2 forward as a portable Pallas kernel (Triton lowering on GPU, interpret mode on CPU).

FA2 (Dao, 2023) Algorithm 1: one program per (query block, batch, head); the KV loop runs inside
the program with an online softmax; the 1/l rescale is deferred to the end (§3.1.1); only the
logsumexp is saved for the backward. KV tiles outside the causal/window band are never visited
(the loop bounds come from `MaskConfig.key_range`), and tiles that the segment ids or the dense mask
rule out entirely are skipped through a precomputed tile-visit table.

Inputs arrive padded by `api.py`: T, S to block multiples, D to a power of two, so every block is a
power of two as Triton requires. GQA reads KV head h // G through the BlockSpec index map: K/V are
never repeated in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.numerics import LN2
from pallas_kernels.fa2 import masking
from pallas_kernels.fa2.kernel_common import (
    KernelSpec, block_ranges, scalar_specs, tile_allowed, tile_scores, zero_nonfinite_rows)


def _forward_kernel(*refs, names: tuple[str, ...], spec: KernelSpec, block_q: int, block_k: int):
    inputs = dict(zip(names, refs))
    o_ref, lse_ref = refs[len(names):]
    q_block, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    q = inputs["q"][...]  # [bq, Dp]
    q_start = q_block * block_q
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    slope = inputs["alibi"][b * spec.num_heads + h] if spec.has_alibi else None
    stream = masking.dropout_stream(inputs["seed"][0], b, h) if spec.has_dropout else None
    q_segments = inputs["q_segments"][...] if spec.has_segments else None

    def visit(k_block, carry, masked: bool):
        acc, row_max, row_sum, hit_nonfinite = carry
        k_start = k_block * block_k
        keys = pl.ds(pl.multiple_of(k_start, block_k), block_k)  # aligned: lets Triton vectorise loads
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        scores, _ = tile_scores(q, inputs["k"][keys, :], q_idx, k_idx, spec, slope)  # [bq, bk], log2 units
        v = inputs["v"][keys, :]
        if masked:
            allowed = tile_allowed(
                q_idx, k_idx, spec,
                q_segments=q_segments,
                kv_segments=inputs["kv_segments"][keys] if spec.has_segments else None,
                dense_mask=inputs["mask"][:, keys] if spec.mask_heads else None)
            scores = jnp.where(allowed, scores, -jnp.inf)
            v, nonfinite_keys = zero_nonfinite_rows(v)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        if spec.needs_mask:
            # A row with nothing visible yet keeps max -inf; shift by 0 so exp2() gives 0, not NaN.
            shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        else:
            shift = new_max
        correction = jnp.exp2(row_max - shift)
        probs = jnp.exp2(scores - shift[:, None])
        row_sum = correction * row_sum + jnp.sum(probs, axis=1)
        if spec.has_dropout:  # l counts every probability; only the kept ones reach the output
            keep = masking.dropout_keep(stream, q_idx, k_idx, spec.dropout_rate)
            probs = jnp.where(keep, probs, 0.0)
        if masked:  # a row that really attends a non-finite V row must still come out NaN
            attended = jnp.where(probs > 0, nonfinite_keys[None, :], 0)
            hit_nonfinite = jnp.maximum(hit_nonfinite, jnp.max(attended, axis=1))
        acc = correction[:, None] * acc + lax.dot_general(
            probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc, new_max, row_sum, hit_nonfinite

    def body(k_block, carry, masked: bool):
        if spec.tile_heads:
            return lax.cond(inputs["tiles"][k_block] != 0, functools.partial(visit, masked=masked),
                            lambda _, c: c, k_block, carry)
        return visit(k_block, carry, masked)

    config = spec.mask_config
    q_stop = q_start + block_q
    carry = (jnp.zeros((block_q, q.shape[-1]), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q,), jnp.int32))
    for first, last, masked in block_ranges(config.key_range(q_start, q_stop),
                                            config.full_key_range(q_start, q_stop), block_k, spec):
        carry = lax.fori_loop(first, last, functools.partial(body, masked=masked), carry)
    acc, row_max, row_sum, hit_nonfinite = carry

    # FA2 §3.1.1: one 1/l rescale at the end. A fully masked row has l = 0: output 0, lse = -inf.
    empty = row_sum == 0.0
    scale = 1.0 / jnp.where(empty, 1.0, row_sum)
    if spec.has_dropout:
        scale = scale / (1.0 - spec.dropout_rate)
    out = acc * scale[:, None]
    if spec.needs_mask:
        out = jnp.where(hit_nonfinite[:, None] > 0, jnp.nan, out)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (row_max + jnp.log2(jnp.where(empty, 1.0, row_sum))) * LN2)


def forward(q, k, v, extras: dict, *, spec: KernelSpec, block_q: int, block_k: int,
            num_warps: int, num_stages: int, interpret: bool):
    """Runs the forward kernel on padded inputs.

    Args:
      q: [B, Tp, H, Dp]; k, v: [B, Sp, K, Dp] (padded to block multiples / a power of two).
      extras: optional kernel inputs by name, prepared by `api.py`: q_segments [B, Tp],
        kv_segments [B, Sp], alibi [P] (b * H + h), mask int8 [Bm, Hm, Tp, Sp],
        tiles int32 [Bt, Ht, nq, nk] (built for these block sizes), seed int32 [1].

    Returns:
      out [B, Tp, H, Dp] in q's dtype, lse [B, H, Tp] float32.
    """
    B, Tp, H, Dp = q.shape
    Sp = k.shape[1]
    G = spec.group_size
    grid = (Tp // block_q, B, H)

    specs = {
        "q": pl.BlockSpec((None, block_q, None, Dp), lambda i, b, h: (b, i, h, 0)),
        "k": pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, h // G, 0)),
        "v": pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, h // G, 0)),
        "q_segments": pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
        "kv_segments": pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)),
        **scalar_specs(extras),
    }
    if "mask" in extras:
        mask_b, mask_h = (spec.mask_batched, spec.mask_heads > 1)
        specs["mask"] = pl.BlockSpec(
            (None, None, block_q, Sp),
            lambda i, b, h: (b if mask_b else 0, h if mask_h else 0, i, 0))
    if "tiles" in extras:
        tile_b, tile_h = (spec.tile_batched, spec.tile_heads > 1)
        specs["tiles"] = pl.BlockSpec(
            (None, None, None, extras["tiles"].shape[-1]),
            lambda i, b, h: (b if tile_b else 0, h if tile_h else 0, i, 0))

    names = ("q", "k", "v") + tuple(extras)
    arrays = (q, k, v) + tuple(extras.values())
    kernel = functools.partial(_forward_kernel, names=names, spec=spec, block_q=block_q, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[specs[name] for name in names],
        out_specs=[
            pl.BlockSpec((None, block_q, None, Dp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fa2_forward",
    )(*arrays)
