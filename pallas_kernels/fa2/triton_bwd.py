"""FlashAttention-2 backward as two portable Pallas kernels: dK/dV and dQ.

FA2 (Dao, 2023) Algorithm 2, split the way FA2's Triton kernels do so that no atomics are needed and
the result is bitwise deterministic:
  - delta = rowsum(dO * O) - dlse is computed first (the preprocess, in `api.py`);
  - the dK/dV kernel runs one program per (KV block, batch, KV head) and loops over the G query heads
    of that KV head and over the query blocks that can see the KV block, so GQA gradients are summed
    in registers, never through a repeated K/V;
  - the dQ kernel runs one program per (query block, batch, head) and loops over the KV blocks.
Both recompute P = exp(S - lse) from the saved logsumexp, and rebuild the dropout mask from indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fa2 import masking
from pallas_kernels.fa2.kernel_common import (
    KernelSpec, block_ranges, scalar_specs, tile_allowed, tile_scores, zero_nonfinite_rows)


def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _score_gradient(q, k, v, do, lse, delta, q_idx, k_idx, spec: KernelSpec, slope, stream,
                    allowed):
    """One tile of FA2's backward: returns (P after dropout, dS w.r.t. the scaled score q.k * scale).

    lse arrives in log2 units with +inf for fully masked rows, so that every P of such a row is 0.
    """
    scores, softcap_grad = tile_scores(q, k, q_idx, k_idx, spec, slope)  # [bq, bk], log2 units
    probs = jnp.exp2(scores - lse[:, None])
    dprobs = _dot(do, v, 1, 1)  # dO V^T [bq, bk]
    if spec.has_dropout:
        keep = masking.dropout_keep(stream, q_idx, k_idx, spec.dropout_rate)
        inverse_keep = 1.0 / (1.0 - spec.dropout_rate)
        dropped_probs = jnp.where(keep, probs * inverse_keep, 0.0)
        dprobs = jnp.where(keep, dprobs * inverse_keep, 0.0)
    else:
        dropped_probs = probs
    dscores = probs * (dprobs - delta[:, None])
    if softcap_grad is not None:
        dscores = dscores * softcap_grad
    if allowed is not None:  # select, not multiply: padding may hold NaN, and 0 * NaN is NaN
        dropped_probs = jnp.where(allowed, dropped_probs, 0.0)
        dscores = jnp.where(allowed, dscores, 0.0)
    # dS is left unscaled here: the softmax scale is applied once to the finished dK and dQ tiles
    # instead of to every [bq, bk] score tile (one multiply per element less in both kernels).
    return dropped_probs, dscores


def _dkdv_kernel(*refs, names: tuple[str, ...], spec: KernelSpec, block_q: int, block_k: int):
    inputs = dict(zip(names, refs))
    dk_ref, dv_ref = refs[len(names):]
    k_block, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    config = spec.mask_config

    k = inputs["k"][...]  # [bk, Dp]
    v = inputs["v"][...]
    k_start = k_block * block_k
    k_stop = k_start + block_k
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    kv_segments = inputs["kv_segments"][...] if spec.has_segments else None

    full_lo, full_hi = config.full_query_range(k_start, k_stop)
    if spec.kv_padded:  # a key block that crosses S holds padded keys: no query sees all of it
        # (multiplied, not jnp.where: a select between two literals trips the Triton lowering)
        full_hi = full_hi * (k_stop <= config.kv_len).astype(jnp.int32)
    ranges = block_ranges(config.query_range(k_start, k_stop), (full_lo, full_hi), block_q, spec)

    def visit(q_block, carry, g, masked: bool):
        dk, dv = carry
        h = kv_head * spec.group_size + g
        q_start = q_block * block_q
        rows = pl.ds(pl.multiple_of(q_start, block_q), block_q)  # aligned: lets Triton vectorise loads
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        q = inputs["q"][rows, g, :]
        do = inputs["do"][rows, g, :]
        allowed = None
        if masked:
            allowed = tile_allowed(
                q_idx, k_idx, spec,
                q_segments=inputs["q_segments"][rows] if spec.has_segments else None,
                kv_segments=kv_segments,
                dense_mask=inputs["mask"][g if spec.mask_heads > 1 else 0, rows, :] if spec.mask_heads else None)
        probs, dscores = _score_gradient(
            q, k, v, do, inputs["lse"][g, rows], inputs["delta"][g, rows], q_idx, k_idx, spec,
            inputs["alibi"][b * spec.num_heads + h] if spec.has_alibi else None,
            masking.dropout_stream(inputs["seed"][0], b, h) if spec.has_dropout else None,
            allowed)
        if masked:
            q, _ = zero_nonfinite_rows(q)
        dv = dv + _dot(probs.astype(do.dtype), do, 0, 0)  # P^T dO [bk, Dp]
        dk = dk + _dot(dscores.astype(q.dtype), q, 0, 0)  # dS^T Q
        return dk, dv

    def body(q_block, carry, g, masked: bool):
        if spec.tile_heads:
            tile_head = g if spec.tile_heads > 1 else 0
            return lax.cond(inputs["tiles"][tile_head, q_block, k_block] != 0,
                            functools.partial(visit, g=g, masked=masked), lambda _, c: c, q_block, carry)
        return visit(q_block, carry, g, masked)

    def head(g, carry):  # the G query heads of this KV head, summed in registers
        for first, last, masked in ranges:
            carry = lax.fori_loop(first, last, functools.partial(body, g=g, masked=masked), carry)
        return carry

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, spec.group_size, head, (zeros, zeros))
    dk_ref[...] = (dk * spec.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, names: tuple[str, ...], spec: KernelSpec, block_q: int, block_k: int):
    inputs = dict(zip(names, refs))
    (dq_ref,) = refs[len(names):]
    q_block, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    config = spec.mask_config

    q = inputs["q"][...]  # [bq, Dp]
    do = inputs["do"][...]
    lse = inputs["lse"][...]
    delta = inputs["delta"][...]
    q_start = q_block * block_q
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    slope = inputs["alibi"][b * spec.num_heads + h] if spec.has_alibi else None
    stream = masking.dropout_stream(inputs["seed"][0], b, h) if spec.has_dropout else None
    q_segments = inputs["q_segments"][...] if spec.has_segments else None

    def visit(k_block, dq, masked: bool):
        k_start = k_block * block_k
        keys = pl.ds(pl.multiple_of(k_start, block_k), block_k)
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        k = inputs["k"][keys, :]
        allowed = None
        if masked:
            allowed = tile_allowed(
                q_idx, k_idx, spec,
                q_segments=q_segments,
                kv_segments=inputs["kv_segments"][keys] if spec.has_segments else None,
                dense_mask=inputs["mask"][:, keys] if spec.mask_heads else None)
        _, dscores = _score_gradient(q, k, inputs["v"][keys, :], do, lse, delta, q_idx, k_idx, spec,
                                     slope, stream, allowed)
        if masked:
            k, _ = zero_nonfinite_rows(k)
        return dq + _dot(dscores.astype(k.dtype), k, 1, 0)  # dS K [bq, Dp]

    def body(k_block, dq, masked: bool):
        if spec.tile_heads:
            return lax.cond(inputs["tiles"][k_block] != 0, functools.partial(visit, masked=masked),
                            lambda _, c: c, k_block, dq)
        return visit(k_block, dq, masked)

    q_stop = q_start + block_q
    dq = jnp.zeros(q.shape, jnp.float32)
    for first, last, masked in block_ranges(config.key_range(q_start, q_stop),
                                            config.full_key_range(q_start, q_stop), block_k, spec):
        dq = lax.fori_loop(first, last, functools.partial(body, masked=masked), dq)
    dq_ref[...] = (dq * spec.sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, do, lse, delta, extras_dkdv: dict, extras_dq: dict, *, spec: KernelSpec,
             block_q_dkv: int, block_k_dkv: int, block_q_dq: int, block_k_dq: int,
             num_warps: int, num_stages: int, interpret: bool):
    """Runs the dK/dV and dQ kernels on padded inputs.

    Args:
      q, do: [B, Tp, H, Dp]; k, v: [B, Sp, K, Dp]; lse, delta: [B, H, Tp] float32.
      extras_dkdv / extras_dq: optional inputs by name as for `triton_fwd.forward`, with tile tables
        built for each kernel's own block sizes.

    Returns:
      dq [B, Tp, H, Dp], dk and dv [B, Sp, K, Dp], in the inputs' dtypes.
    """
    B, Tp, H, Dp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = spec.group_size
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

    # dK/dV: grid over (KV block, batch, KV head); the G query heads of the group are looped inside.
    bq, bk = block_q_dkv, block_k_dkv
    mask_g = G if spec.mask_heads > 1 else 1
    tile_g = G if spec.tile_heads > 1 else 1
    specs = {
        "q": pl.BlockSpec((None, Tp, G, Dp), lambda j, b, kh: (b, 0, kh, 0)),
        "k": pl.BlockSpec((None, bk, None, Dp), lambda j, b, kh: (b, j, kh, 0)),
        "v": pl.BlockSpec((None, bk, None, Dp), lambda j, b, kh: (b, j, kh, 0)),
        "do": pl.BlockSpec((None, Tp, G, Dp), lambda j, b, kh: (b, 0, kh, 0)),
        "lse": pl.BlockSpec((None, G, Tp), lambda j, b, kh: (b, kh, 0)),
        "delta": pl.BlockSpec((None, G, Tp), lambda j, b, kh: (b, kh, 0)),
        "q_segments": pl.BlockSpec((None, Tp), lambda j, b, kh: (b, 0)),
        "kv_segments": pl.BlockSpec((None, bk), lambda j, b, kh: (b, j)),
        "mask": pl.BlockSpec(
            (None, mask_g, Tp, bk),
            lambda j, b, kh: (b if spec.mask_batched else 0, kh if spec.mask_heads > 1 else 0, 0, j)),
        **scalar_specs(extras_dkdv),
    }
    if "tiles" in extras_dkdv:
        nq, nk = extras_dkdv["tiles"].shape[2:]
        specs["tiles"] = pl.BlockSpec(
            (None, tile_g, nq, nk),
            lambda j, b, kh: (b if spec.tile_batched else 0, kh if spec.tile_heads > 1 else 0, 0, 0))
    names = ("q", "k", "v", "do", "lse", "delta") + tuple(extras_dkdv)
    arrays = (q, k, v, do, lse, delta) + tuple(extras_dkdv.values())
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, names=names, spec=spec, block_q=bq, block_k=bk),
        grid=(Sp // bk, B, K),
        in_specs=[specs[name] for name in names],
        out_specs=[pl.BlockSpec((None, bk, None, Dp), lambda j, b, kh: (b, j, kh, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="fa2_backward_dkdv",
    )(*arrays)

    # dQ: grid over (query block, batch, head); the KV blocks are looped inside.
    bq, bk = block_q_dq, block_k_dq
    specs = {
        "q": pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0)),
        "k": pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, h // G, 0)),
        "v": pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, h // G, 0)),
        "do": pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0)),
        "lse": pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        "delta": pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        "q_segments": pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
        "kv_segments": pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)),
        "mask": pl.BlockSpec(
            (None, None, bq, Sp),
            lambda i, b, h: (b if spec.mask_batched else 0, h if spec.mask_heads > 1 else 0, i, 0)),
        **scalar_specs(extras_dq),
    }
    if "tiles" in extras_dq:
        specs["tiles"] = pl.BlockSpec(
            (None, None, None, extras_dq["tiles"].shape[-1]),
            lambda i, b, h: (b if spec.tile_batched else 0, h if spec.tile_heads > 1 else 0, i, 0))
    names = ("q", "k", "v", "do", "lse", "delta") + tuple(extras_dq)
    arrays = (q, k, v, do, lse, delta) + tuple(extras_dq.values())
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, names=names, spec=spec, block_q=bq, block_k=bk),
        grid=(Tp // bq, B, H),
        in_specs=[specs[name] for name in names],
        out_specs=pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="fa2_backward_dq",
    )(*arrays)
    return dq, dk, dv
