"""FlashAttention forward for Hopper as a Pallas Mosaic GPU kernel (wgmma + TMA, warp-specialised).

The portable kernel (`triton_fwd`) leaves the H100's tensor cores idle while it computes the softmax.
Here each CTA runs three warpgroups: one producer that streams K/V tiles into a ring of shared-memory
slots with TMA, and two consumers, each owning `block_q` query rows, that issue asynchronous wgmma
for S = Q Kᵀ and O += P V. With two consumers per CTA, one warpgroup's softmax runs while the other
one's matrix products occupy the tensor cores (the FA3 observation), and the optional schedule
barrier forces that ping-pong strictly.

Scope (the dispatcher in `api.py` routes everything else to the portable kernels): bf16/f16, head dim
64 or 128, causal and sliding windows (bottom-right aligned), GQA/MQA, any T and S (the caller pads
them to tile multiples; keys past `kv_len` are masked here). Outputs: O [B, Tp, H, D] in the input
dtype and the natural-log lse [B, H, Tp] (-inf for rows that see no key), the same residuals the
portable backward consumes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Swizzled shared-memory tiles: 64 bf16 columns = one 128-byte swizzle span per row.
_TILE_COLUMNS = 64
_SWIZZLE_BYTES = 128


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tile shapes of the Hopper kernel: a CTA covers 2 * block_q query rows (two consumers)."""

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    ping_pong: bool = True

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64:
            raise ValueError(f"Mosaic GPU tiles must be multiples of 64 rows: {self}")
        if self.num_stages < 2:
            raise ValueError(f"the K/V ring needs at least 2 slots: {self.num_stages=}")


@dataclasses.dataclass(frozen=True)
class MosaicProblem:
    """The static description of one launch (all ints: the kernel is specialised on them)."""

    q_len: int  # real T (rows past it are padding)
    kv_len: int  # real S (keys past it are masked)
    q_offset: int  # S - T: query i is aligned with key i + q_offset
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded; causal is 0
    sm_scale: float
    group_size: int  # H // K


def preferred(*, head_dim: int) -> bool:
    """Where the Hopper forward beat the portable one on an H100 (BENCHMARKS.md): head dims 64 and 128."""
    return head_dim in (64, 128)


def supports(*, dtype, head_dim: int, features: tuple[str, ...]) -> bool:
    """Whether this kernel covers a call (the rest goes to the portable kernels)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim in (64, 128)
            and set(features) <= {"causal", "window"})


def _key_tile_ranges(row0, rows: int, problem: MosaicProblem, block_kv: int, padded_kv_len: int):
    """[lo, hi): key tiles some row of the CTA may see; [full_lo, full_hi): tiles every row sees whole.

    Every bound is computed on clamped non-negative ints so that the divisions are exact floors.
    """
    S, off = problem.kv_len, problem.q_offset
    left, right = problem.window_left, problem.window_right
    first_row_diag = row0 + off
    last_row_diag = row0 + rows - 1 + off
    if right >= 0:
        hi_key = jnp.clip(last_row_diag + right + 1, 0, S)
        full_hi_key = jnp.clip(first_row_diag + right + 1, 0, S)
    else:
        hi_key = jnp.int32(S)
        full_hi_key = jnp.int32(S)
    if left >= 0:
        lo_key = jnp.clip(first_row_diag - left, 0, S)
        full_lo_key = jnp.clip(last_row_diag - left, 0, padded_kv_len)
    else:
        lo_key = jnp.int32(0)
        full_lo_key = jnp.int32(0)
    hi = lax.div(hi_key + (block_kv - 1), jnp.int32(block_kv))
    lo = jnp.minimum(lax.div(lo_key, jnp.int32(block_kv)), hi)
    full_lo = jnp.clip(lax.div(full_lo_key + (block_kv - 1), jnp.int32(block_kv)), lo, hi)
    full_hi = jnp.clip(lax.div(full_hi_key, jnp.int32(block_kv)), full_lo, hi)
    return lo, full_lo, full_hi, hi


def forward(q, k, v, *, problem: MosaicProblem, blocks: MosaicBlocks, interpret: bool = False):
    """q [B, Tp, H, D], k/v [B, Sp, K, D] padded to tile multiples -> (O [B, Tp, H, D], lse [B, H, Tp])."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module, imported on use

    B, Tp, H, D = q.shape
    Sp, K = k.shape[1], k.shape[2]
    bq, bkv, stages = blocks.block_q, blocks.block_kv, blocks.num_stages
    cta_rows = 2 * bq
    if Tp % cta_rows or Sp % bkv:
        raise ValueError(f"padded lengths must be tile multiples: {Tp=} % {cta_rows}, {Sp=} % {bkv}")
    dtype = q.dtype
    scale = problem.sm_scale * LOG2E  # scores enter exp2 directly: one FMA per element
    # The CPU simulator runs on plain arrays: register layouts are a GPU-lowering concern only.
    in_layout = (lambda x, layout: x) if interpret else plgpu.layout_cast

    def iota(dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (bq, bkv), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bkv), dim, layout=plgpu.Layout.WGMMA)

    masks_keys = problem.kv_len != Sp or problem.window_left >= 0 or problem.window_right >= 0

    def consumer(wg, row0, tiles, q_ref, out_ref, lse_ref, smem, barriers):
        q_smem, k_smem, v_smem, lse_smem = smem
        k_ready, v_ready, q_ready, k_free, v_free, schedule = barriers
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        lo, full_lo, full_hi, hi = tiles
        rows0 = row0 + wg * bq
        plgpu.set_max_registers(232, action="increase")
        my_q = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(rows0, bq), h], my_q, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        def sync_schedule():
            if blocks.ping_pong:
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

        def step(t, carry, masked: bool):
            acc, row_max, row_sum = carry
            slot = lax.rem(t - lo, jnp.int32(stages))
            plgpu.barrier_wait(k_ready.at[slot])

            def scores_of(s_ref):
                plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                sync_schedule()
                return s_ref[...]

            if interpret:  # the CPU simulator has no wgmma with a transposed operand
                s = lax.dot_general(my_q[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
                sync_schedule()
            else:
                s = pl.run_scoped(scores_of, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                q_idx = rows0 + iota(0)
                k_idx = t * bkv + iota(1)
                allowed = k_idx < problem.kv_len
                if problem.window_right >= 0:
                    allowed &= k_idx <= q_idx + (problem.q_offset + problem.window_right)
                if problem.window_left >= 0:
                    allowed &= k_idx >= q_idx + (problem.q_offset - problem.window_left)
                s = jnp.where(allowed, s, -jnp.inf)
            # Scores stay unscaled: the scale rides on the exp2 argument as one FMA per element.
            new_max = jnp.maximum(row_max, s.max(axis=1) * scale)
            # A row that has seen no key keeps max -inf; shifting by 0 then gives exp2(-inf) = 0.
            shift = jnp.where(new_max == -jnp.inf, 0.0, new_max) if masked else new_max
            rescale = jnp.exp2(row_max - shift)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(shift, s.shape, [0]))
            row_sum = row_sum * rescale + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
            p = p.astype(dtype)
            if blocks.ping_pong:
                plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[slot])
            if blocks.ping_pong:
                plgpu.barrier_wait(schedule)

            def accumulate(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])

            if interpret:
                acc = acc + jnp.dot(p, v_smem.at[slot][...], preferred_element_type=jnp.float32)
            else:
                acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, new_max, row_sum

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        carry = (
            in_layout(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA),
            in_layout(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
            in_layout(jnp.zeros((bq,), jnp.float32), row_layout),
        )
        # The second consumer starts half a step late so that the two alternate on the tensor cores.
        if blocks.ping_pong:
            pl.when(wg == 1)(sync_schedule)
        if masks_keys:
            carry = lax.fori_loop(lo, full_lo, lambda t, c: step(t, c, True), carry)
        carry = lax.fori_loop(full_lo, full_hi, lambda t, c: step(t, c, False), carry)
        if masks_keys:
            carry = lax.fori_loop(full_hi, hi, lambda t, c: step(t, c, True), carry)
        if blocks.ping_pong:
            pl.when(wg == 0)(sync_schedule)
        acc, row_max, row_sum = carry

        seen = row_sum > 0
        inv_sum = 1.0 / jnp.where(seen, row_sum, 1.0)
        my_q[...] = (acc * lax.broadcast_in_dim(inv_sum, acc.shape, [0])).astype(dtype)
        lse_smem.at[wg][...] = jnp.where(seen, row_max * LN2 + jnp.log(jnp.where(seen, row_sum, 1.0)),
                                         -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, out_ref.at[b, pl.ds(rows0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(rows0, bq)])
        plgpu.wait_smem_to_gmem(0)

    def producer(tiles, k_ref, v_ref, smem, barriers):
        _, k_smem, v_smem, _ = smem
        k_ready, v_ready, _, k_free, v_free, _ = barriers
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        lo, _, _, hi = tiles
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, jnp.int32(problem.group_size))

        @pl.loop(lo, hi)
        def _(t):
            slot = lax.rem(t - lo, jnp.int32(stages))
            keys = (b, pl.ds(t * bkv, bkv), kv_head)
            refill = t - lo >= stages

            @pl.when(refill)
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])

            @pl.when(refill)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

        # Observe the last release of every slot used, so that each barrier phase has been waited on
        # before the barriers are freed (the simulator checks this; on the GPU it costs one wait).
        for slot in range(stages):
            @pl.when(hi - lo > slot)
            def _():
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    def body(q_ref, k_ref, v_ref, out_ref, lse_ref):
        transforms = (plgpu.TilingTransform((8, _TILE_COLUMNS)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))
        smem_shapes = (
            plgpu.SMEM((2, bq, D), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=transforms),
            plgpu.SMEM((2, bq), jnp.float32),
        )
        barrier_shapes = (
            plgpu.Barrier(num_barriers=stages),  # k_ready (TMA completion)
            plgpu.Barrier(num_barriers=stages),  # v_ready
            plgpu.Barrier(num_barriers=2),  # q_ready, one per consumer
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k_free: both consumers are done
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # v_free
            plgpu.Barrier(num_arrivals=2),  # schedule (ping-pong)
        )

        def scoped(smem, *barriers):
            wg = lax.axis_index("wg")
            row0 = lax.axis_index("q_tiles") * cta_rows
            tiles = _key_tile_ranges(row0, cta_rows, problem, bkv, Sp)
            pl.when(wg < 2)(lambda: consumer(wg, row0, tiles, q_ref, out_ref, lse_ref, smem, barriers))
            pl.when(wg == 2)(lambda: producer(tiles, k_ref, v_ref, smem, barriers))

        pl.run_scoped(scoped, smem_shapes, *barrier_shapes, collective_axes="wg")

    out, lse = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, Tp, H, D), dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)),
        grid=(Tp // cta_rows, H, B),
        grid_names=("q_tiles", "heads", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": _gpu_interpret_params()} if interpret else {}),
    )(q, k, v)
    return out, lse


def _gpu_interpret_params():
    """Mosaic GPU's CPU simulator (threads, shared memory, barriers): for tests on machines without a GPU."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
