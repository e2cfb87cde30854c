"""FlashAttention backward for Hopper as two Pallas Mosaic GPU kernels (wgmma + TMA, warp-specialised).

FA2's backward (Dao, 2023, Algorithm 2) laid out the FA3 way (Shah et al., 2024, §3.3) for Hopper:
every CTA runs two consumer warpgroups and one producer warpgroup that streams tiles with TMA into
a ring of shared-memory slots, and the products are asynchronous wgmma.

- dK/dV kernel: one CTA per 2 * block_kv keys of one KV head. Each consumer keeps its block_kv keys'
  K and V in shared memory and their dK, dV accumulators in registers for the whole CTA; the producer
  streams (Q, dO, [lse, delta]) tiles of every query head of the GQA group, over the query tiles that
  can see these keys. The GQA reduction is that loop: no repeated K/V, no [B, S, H, D] partials.
- dQ kernel: one CTA per 2 * block_q query rows of one head, streaming K/V like the forward and
  recomputing P and dP.
- D=256 (`MosaicBwdConfig.split_head_dim`): whole-width dK and dV per consumer would take 256 f32
  registers per thread, so the two consumers share each tile and split the head dim's columns
  instead (FA3's layout): one computes the scores and P, the other dP and dS, they hand P and dS
  over in shared memory, and each accumulates half of dK, dV or dQ (`_dkdv_split`, `_dq_split`).
- Softcap (Gemma 2): both kernels recompute tanh from the raw scores, cap them as the forward did,
  and scale dS by the cap's derivative 1 - tanh^2.

Every sum is accumulated in a fixed order inside one CTA, so the result is deterministic. Causal and
window calls visit only the tiles of their band and mask only its edges. With segment ids (packed
sequences) both kernels mask every step with the forward's "same id" test, so P recomputed here is
the forward's: the ids of the streamed tiles travel with them through the TMA ring, a consumer's own
ids load once, and the visited tiles are narrowed to those whose id ranges overlap
(`mosaic_fwd.segment_tile_ranges`). The inputs are padded to
tile multiples by `api.py`; lse arrives in log2 units with +inf for a row that saw no key (all its P
are then exactly 0) and delta = rowsum(dO * O) - dlse.

`interpret=True` runs Mosaic GPU's CPU simulator, which lacks wgmma with a transposed operand and
register layouts: there the products are plain dots on the shared-memory tiles.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.mosaic_pipeline import CONSUMERS, smem_transforms
from pallas_kernels.common.numerics import LOG2E, softcap_unscaled
from pallas_kernels.fa2.mosaic_fwd import (FEATURES, MosaicProblem, _key_tile_ranges, clip_to_segments,
                                           consumer_loops, cta_first_row, masks_keys, segment_tile_ranges,
                                           visible_pairs)


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
    """Tile shapes of the Hopper backward."""

    block_q: int = 64  # dK/dV kernel: query rows per streamed tile
    block_kv: int = 64  # dK/dV kernel: keys per consumer (a CTA covers CONSUMERS * block_kv)
    block_q_dq: int = 64  # dQ kernel: query rows per consumer (a CTA covers CONSUMERS * block_q_dq)
    block_kv_dq: int = 64  # dQ kernel: keys per streamed tile
    num_stages: int = 2
    # False: the dK/dV kernel also adds each step's dQ partial into an f32 buffer in global memory
    # with TMA reduce-add (FA3's route: no second pass, but the order of the additions varies from
    # run to run). True: a separate dQ kernel sums in a fixed order (bitwise reproducible).
    deterministic: bool = True
    # The reduce-add mode's dQ path (deterministic=False only; the defaults are its first form).
    # dq_buffers: f32 [block_q, D] partial buffers per consumer. With 1, writing a step's partial
    # waits until the previous one has left shared memory; with n, only the one n steps back must
    # have (the TMA reduce-add of the others keeps running). Each costs block_q * D * 4 bytes per
    # consumer: at D=128 a second one does not fit (`dkdv_smem_bytes`).
    dq_buffers: int = 1
    # dq_chunks: the partial leaves in this many column chunks [block_q, D / dq_chunks], each its
    # own reduce-add through the dq_buffers ring, so a buffer is a chunk: 2 chunks in 2 buffers
    # cost the shared memory of one whole partial, and writing a chunk waits only for the store of
    # the chunk two stores back (the only double buffering that fits at D=128).
    dq_chunks: int = 1
    # dq_with_dkdv: False issues the dQ product dSᵀK after the dV and dK products have been waited
    # on, and waits on it alone. True writes dS to shared memory first and issues dQ, dV and dK
    # together with one wait (FA3's order: dS reaches shared memory before the dV product), at the
    # price of three f32 accumulators live at once.
    dq_with_dkdv: bool = False
    # dq_split: the two consumers share each step's dQ partial (FA3's layout at D=128): once both
    # have written their dSᵀ to shared memory, consumer w computes columns [w D/2, (w+1) D/2) of
    # dS·K over BOTH consumers' keys and reduce-adds that half. Each consumer's dQ accumulator is
    # half as wide (at D=128 the whole one would push the dK/dV consumer past its 232 registers:
    # dK, dV, Sᵀ, dPᵀ and dQ together need 256) and half as many f32 bytes go to global memory, at
    # the price of two barrier waits per step between the consumers. Needs D a multiple of 128 (a
    # half is then whole 64-column swizzle spans), dq_chunks=1 and dq_with_dkdv=False.
    dq_split: bool = False
    # split_head_dim: the two consumers share each tile's keys (dK/dV kernel) or query rows (dQ
    # kernel) and split the head dim's columns between them (FA3's layout at D=256, where one
    # consumer's whole-width dK and dV would take 256 f32 registers per thread): consumer 0 computes
    # the scores and P, consumer 1 dP and dS, they hand P and dS over in shared memory, and each
    # accumulates its half of the columns (`_dkdv_split`, `_dq_split`). A CTA then covers block_kv
    # keys or block_q_dq rows, not CONSUMERS times as many. Needs 64-row tiles, D a multiple of 128
    # and deterministic=True.
    split_head_dim: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq"):
            if getattr(self, name) % 64:
                raise ValueError(f"Mosaic GPU tiles must be multiples of 64 rows: {name}={getattr(self, name)}")
        if self.num_stages < 2:
            raise ValueError(f"the streamed ring needs at least 2 slots: {self.num_stages=}")
        if not isinstance(self.dq_buffers, int) or self.dq_buffers < 1:
            raise ValueError(f"dq_buffers must be an int >= 1, got {self.dq_buffers=}")
        if self.dq_chunks not in (1, 2):
            raise ValueError(f"dq_chunks must be 1 or 2 (64-column chunks at D=128), got {self.dq_chunks=}")
        if not isinstance(self.dq_with_dkdv, bool):
            raise TypeError(f"dq_with_dkdv must be a bool, got {self.dq_with_dkdv=}")
        if not isinstance(self.dq_split, bool):
            raise TypeError(f"dq_split must be a bool, got {self.dq_split=}")
        if self.deterministic and (self.dq_buffers != 1 or self.dq_chunks != 1 or self.dq_with_dkdv
                                   or self.dq_split):
            raise ValueError(f"dq_buffers, dq_chunks, dq_with_dkdv and dq_split shape the reduce-add dQ "
                             f"path, which deterministic=True does not run: {self.dq_buffers=}, "
                             f"{self.dq_chunks=}, {self.dq_with_dkdv=}, {self.dq_split=}")
        if self.dq_split and (self.dq_chunks != 1 or self.dq_with_dkdv):
            raise ValueError(f"dq_split already halves the partial's columns and issues dQ after dK/dV: "
                             f"it takes dq_chunks=1 and dq_with_dkdv=False, got {self.dq_chunks=}, "
                             f"{self.dq_with_dkdv=}")

        if not isinstance(self.split_head_dim, bool):
            raise TypeError(f"split_head_dim must be a bool, got {self.split_head_dim=}")
        tiles = (self.block_q, self.block_kv, self.block_q_dq, self.block_kv_dq)
        if self.split_head_dim and (not self.deterministic or tiles != (64, 64, 64, 64)):
            raise ValueError(f"split_head_dim runs the deterministic kernels on 64-row tiles (one wgmma "
                             f"row block per hand-off tile): {self.deterministic=}, {tiles=}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "MosaicBwdConfig":
        """The default tiles per head dim, from the H100 sweep (benchmarks/mosaic_bwd_sweep.py, BENCHMARKS.md):
        at D=128 a third ring slot hides the Q/dO copies (+4-5%); at D=64 the dQ kernel's 128-row
        consumers halve its K/V traffic (+8-10%). Larger dK/dV tiles were slower or did not fit.
        D=256 splits the head dim between the consumers (not yet measured on a GPU); a third ring
        slot would not fit in shared memory there."""
        if head_dim > 128:
            return cls(split_head_dim=True)
        return cls(num_stages=3) if head_dim > 64 else cls(block_q_dq=128)

    @property
    def q_multiple(self) -> int:
        if self.split_head_dim:
            return max(self.block_q, self.block_q_dq)
        return max(self.block_q, CONSUMERS * self.block_q_dq)

    @property
    def kv_multiple(self) -> int:
        if self.split_head_dim:
            return max(self.block_kv, self.block_kv_dq)
        return max(CONSUMERS * self.block_kv, self.block_kv_dq)


# Shared memory one CTA may use on H100/H200 (sm90: 227 KB of the SM's 228 KB).
SMEM_LIMIT_BYTES = 227 * 1024


def dkdv_smem_bytes(config: MosaicBwdConfig, *, head_dim: int, itemsize: int, segments: bool) -> int:
    """A lower bound on the dK/dV kernel's shared memory (the buffers of `_dkdv`, without the
    barriers and alignment padding Mosaic GPU adds): above SMEM_LIMIT_BYTES the kernel cannot launch.
    itemsize: bytes per element of q (2 for bf16/f16). With `split_head_dim`: `split_smem_bytes`."""
    bq, bkv, stages, D = config.block_q, config.block_kv, config.num_stages, head_dim
    if config.split_head_dim:
        return split_smem_bytes(config, head_dim=head_dim, itemsize=itemsize, segments=segments)
    total = 2 * CONSUMERS * bkv * D * itemsize  # this CTA's K, V
    total += 2 * stages * bq * D * itemsize  # Q and dO rings
    total += stages * 2 * bq * 4  # [lse, delta] ring
    if not config.deterministic:
        total += CONSUMERS * bkv * bq * itemsize  # dSᵀ
        width = D // (2 if config.dq_split else config.dq_chunks)
        total += CONSUMERS * config.dq_buffers * bq * width * 4  # dQ partials on their way out
    if segments:
        total += stages * bq * 4  # query ids ring
    return total


def split_smem_bytes(config: MosaicBwdConfig, *, head_dim: int, itemsize: int, segments: bool) -> int:
    """The larger of the two split-head-dim kernels' shared memory (`split_head_dim`), a lower bound
    as in `dkdv_smem_bytes`. dK/dV: this CTA's K and V, the Q and dO ring, the [lse, delta] ring, the
    Pᵀ and dSᵀ hand-off tiles. dQ: the CTA's Q and dO, the K and V ring, its [lse, delta], P and dS.
    At D=256 in bf16 with 2 slots both come to 209 KB."""
    bq, bkv, stages, D = config.block_q, config.block_kv, config.num_stages, head_dim
    dkdv = (2 * bkv * D + 2 * stages * bq * D + 2 * bkv * bq) * itemsize + stages * 2 * bq * 4
    dkdv += stages * bq * 4 if segments else 0  # query ids ring
    bq, bkv = config.block_q_dq, config.block_kv_dq
    dq = (2 * bq * D + 2 * stages * bkv * D + 2 * bq * bkv) * itemsize + 2 * bq * 4
    dq += stages * bkv * 4 if segments else 0  # key ids ring
    return max(dkdv, dq)


ATOMIC_DQ_ENV = "FA2JAX_ATOMIC_DQ"


def atomic_dq_available() -> bool:
    """Whether the reduce-add dQ mode (`deterministic=False`) may run: on every jax this project
    supports (0.10.2 on; on 0.11 since its dQ partial is a scoped-accumulator product, see
    `_Matmuls.t_dot`), unless the environment variable FA2JAX_ATOMIC_DQ=0 turns it off, a switch
    for a jax whose lowering breaks it again (the deterministic dQ kernel then runs)."""
    setting = os.environ.get(ATOMIC_DQ_ENV, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{ATOMIC_DQ_ENV} must be 0 or 1, got {setting=}")
    return setting == "1"


# What the split-head-dim kernels (D=256) cover: a softcap's derivative needs the raw scores, which
# only consumer 0 holds while consumer 1 forms dS.
SPLIT_FEATURES = FEATURES - {"softcap"}


def supports(*, dtype, head_dim: int, features: tuple[str, ...]) -> bool:
    """Whether the Hopper backward covers a call (the rest runs the portable backward)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and (head_dim in (64, 128) and set(features) <= FEATURES
                 or head_dim == 256 and set(features) <= SPLIT_FEATURES))


def preferred(*, head_dim: int) -> bool:
    """Where the automatic backend choice runs the Hopper backward: head dims 64 and 128, measured
    faster than the portable one on an H100 (BENCHMARKS.md). D=256 runs when asked for
    (backend="mosaic") until it is measured."""
    return head_dim in (64, 128)


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module, imported on use

    return plgpu


def _kernel_options(interpret: bool) -> dict:
    plgpu = _plgpu()
    options = dict(num_threads=CONSUMERS + 1, thread_name="wg",
                   compiler_params=plgpu.CompilerParams(approx_math=True))
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        options["interpret"] = InterpretGPUParams()
    return options


@dataclasses.dataclass(frozen=True)
class _Matmuls:
    """The products of one consumer, as wgmma on the GPU and as dots in the simulator."""

    interpret: bool

    def dot_t(self, a_ref, b_ref, shape):
        """a [M, D] · b [N, D]ᵀ -> f32 [M, N], both operands in shared memory."""
        if self.interpret:
            return lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return self.dot_t_sum([(a_ref, b_ref)], shape)

    def accumulate(self, acc, a, b_ref):
        """acc [M, N] += a [M, K] (registers) · b [K, N] (shared memory)."""
        if self.interpret:
            return acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)
        plgpu = _plgpu()

        def product(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(product)(plgpu.ACC.init(acc))

    def t_dot(self, a_ref, b_ref, shape):
        """a [K, M]ᵀ · b [K, N] -> f32 [M, N], both in shared memory, into a fresh (zeroed) accumulator.

        A scoped accumulator (zeroed by Mosaic GPU), not `pl.run_state` on a zero tile: run_state
        carries the index scalars of the refs it closes over as state. On jax 0.11 a kernel that
        writes a mutable ref (the reduce-add dQ buffer) is re-traced when that ref is discharged
        (`mpmd._mpmd_map_discharge_rule`), the literal 0 of `kv_smem.at[0, wg]` then enters the
        run_state as a Python int and leaves it unchanged, and the warpgroup lowering (0.11's default
        semantics) rejects it: "Shaped arrays must be represented by ir.Values, got: TypedInt(0)"."""
        if self.interpret:
            return lax.dot_general(a_ref[...], b_ref[...], (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return self.t_dot_sum([(a_ref, b_ref)], shape)

    def dot_t_sum(self, pairs, shape):
        """sum over (a [M, K], b [N, K]) in `pairs` of a · bᵀ -> f32 [M, N], all in shared memory:
        issued into one scoped accumulator, waited on once (a contraction split into column blocks)."""
        if self.interpret:
            return sum(self.dot_t(a_ref, b_ref, shape) for a_ref, b_ref in pairs)
        plgpu = _plgpu()

        def products(acc_ref):
            for a_ref, b_ref in pairs:
                plgpu.wgmma(acc_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
            return acc_ref[...]

        return pl.run_scoped(products, plgpu.ACC(shape, jnp.float32))

    def t_dot_sum(self, pairs, shape):
        """sum over (a [K, M], b [K, N]) in `pairs` of aᵀ · b -> f32 [M, N], all in shared memory:
        every product issued into one scoped accumulator, waited on once (scoped as in `t_dot`)."""
        if self.interpret:
            return sum(self.t_dot(a_ref, b_ref, shape) for a_ref, b_ref in pairs)
        plgpu = _plgpu()

        def products(acc_ref):
            for a_ref, b_ref in pairs:
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_ref, (1, 0)), b_ref)
            return acc_ref[...]

        return pl.run_scoped(products, plgpu.ACC(shape, jnp.float32))

    def two_dot_t(self, a_ref, b_ref, c_ref, d_ref, shape):
        """(a · bᵀ, c · dᵀ), all four in shared memory: issued together, waited on once."""
        if self.interpret:
            return self.dot_t(a_ref, b_ref, shape), self.dot_t(c_ref, d_ref, shape)
        plgpu = _plgpu()

        def products(first_ref, second_ref):
            plgpu.wgmma(first_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
            plgpu.wgmma(second_ref, c_ref, plgpu.transpose_ref(d_ref, (1, 0)))
            return first_ref[...], second_ref[...]

        return pl.run_scoped(products, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))

    def with_t_dot(self, t_ref, k_ref, shape, products):
        """(t [K, M]ᵀ · k [K, N] as f32 [M, N], *products()): the first product is issued before
        `products` issues its own, and all are waited on together (`products` ends in one wait).
        Scoped like `t_dot`, for the same reason."""
        if self.interpret:
            return self.t_dot(t_ref, k_ref, shape), *products()
        plgpu = _plgpu()

        def issue_first(acc_ref):
            plgpu.wgmma(acc_ref, plgpu.transpose_ref(t_ref, (1, 0)), k_ref)
            rest = products()
            return acc_ref[...], *rest

        return pl.run_scoped(issue_first, plgpu.ACC(shape, jnp.float32))

    def two_accumulate(self, acc1, a1, b1_ref, acc2, a2, b2_ref):
        """(acc1 + a1 · b1, acc2 + a2 · b2), a in registers: issued together, waited on once."""
        if self.interpret:
            return self.accumulate(acc1, a1, b1_ref), self.accumulate(acc2, a2, b2_ref)
        plgpu = _plgpu()

        def products(refs):
            first_ref, second_ref = refs
            plgpu.wgmma(first_ref, a1, b1_ref)
            plgpu.wgmma(second_ref, a2, b2_ref)

        return pl.run_state(products)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))

    def accumulate_from_smem(self, acc, a_ref, b_ref):
        """acc [M, N] += a [M, K] · b [K, N], both in shared memory."""
        if self.interpret:
            return acc + jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32)
        return self.accumulate(acc, a_ref, b_ref)  # wgmma reads a from registers or shared memory

    def accumulate_mixed(self, acc1, a1, b1_ref, acc2, a2_ref, b2_ref):
        """(acc1 + a1 · b1, acc2 + a2 · b2), a1 in registers, a2 in shared memory: issued together,
        waited on once."""
        if self.interpret:
            return self.accumulate(acc1, a1, b1_ref), self.accumulate_from_smem(acc2, a2_ref, b2_ref)
        return self.two_accumulate(acc1, a1, b1_ref, acc2, a2_ref, b2_ref)

    def tile(self, ref):
        """A 16-bit tile from (swizzled) shared memory into registers, laid out as a wgmma operand."""
        if self.interpret:
            return ref[...]
        plgpu = _plgpu()
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

    def zeros(self, shape):
        if self.interpret:
            return jnp.zeros(shape, jnp.float32)
        plgpu = _plgpu()
        return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

    def vector(self, ref, reduced_dim: int):
        """A f32 vector from shared memory, laid out to broadcast along `reduced_dim` of a tile."""
        if self.interpret:
            return ref[...]
        plgpu = _plgpu()
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(reduced_dim))

    def ids(self, ids_ref, start, size: int):
        """int32 [size] segment ids from a [T] ref in global memory, laid out to broadcast along dim 1
        of a tile whose rows they index: a consumer's own ids, loaded once (a plain load)."""
        if self.interpret:
            return ids_ref[pl.ds(start, size)]
        plgpu = _plgpu()
        return plgpu.load(ids_ref, pl.ds(start, size), layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)

    def same_segment(self, row_ids, col_ids_smem, shape):
        """bool tile: row_ids (from `ids`) == the ids in shared memory that index the columns."""
        if self.interpret:
            col_ids = col_ids_smem[...]
        else:
            plgpu = _plgpu()
            col_ids = plgpu.load(col_ids_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
        return lax.broadcast_in_dim(row_ids, shape, [0]) == lax.broadcast_in_dim(col_ids, shape, [1])

    def iota(self, shape, dim: int):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        plgpu = _plgpu()
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _softcap(s, problem: MosaicProblem):
    """(`softcap_unscaled` of the unscaled scores, as the forward's pipeline caps them) when the
    problem has a cap, else (s, None). The cap's derivative multiplies dS; dS's sm_scale factor is
    applied to the finished dQ and dK, as without a cap."""
    if problem.softcap <= 0:
        return s, None
    return softcap_unscaled(s, sm_scale=problem.sm_scale, softcap=problem.softcap)


def _query_tile_ranges(k0, keys: int, problem: MosaicProblem, block_q: int, padded_q_len: int):
    """[lo, hi): query tiles some row of which sees a key of [k0, k0 + keys); [full_lo, full_hi):
    tiles whose every row sees every one of these keys (no mask needed). The mirror image of the
    forward's key ranges: query i sees key j iff i + off - left <= j <= i + off + right."""
    off, left, right = problem.q_offset, problem.window_left, problem.window_right
    k_last = k0 + keys - 1
    T = problem.q_len
    lo_row = jnp.clip(k0 - off - right, 0, T) if right >= 0 else jnp.int32(0)
    hi_row = jnp.clip(k_last - off + left + 1, 0, T) if left >= 0 else jnp.int32(T)
    full_lo_row = jnp.clip(k_last - off - right, 0, padded_q_len) if right >= 0 else jnp.int32(0)
    full_hi_row = jnp.clip(k0 - off + left + 1, 0, padded_q_len) if left >= 0 else jnp.int32(padded_q_len)
    bq = jnp.int32(block_q)
    hi = lax.div(hi_row + (block_q - 1), bq)
    lo = jnp.minimum(lax.div(lo_row, bq), hi)
    full_lo = jnp.clip(lax.div(full_lo_row + (block_q - 1), bq), lo, hi)
    full_hi = jnp.clip(lax.div(full_hi_row, bq), full_lo, hi)
    return lo, full_lo, full_hi, hi


def _zero_hidden(p, visible, positions, problem: MosaicProblem):
    """p [M, N] with 0 where a (query, key) pair is hidden. visible: bool [M, N] from the segment ids
    ("same id"), or None without them. positions: None for a tile inside the causal/window band and
    kv_len, else a function giving the pairs' (query, key) index tiles [M, N] for `visible_pairs`."""
    if positions is not None:
        by_position = visible_pairs(*positions(), problem)
        visible = by_position if visible is None else visible & by_position
    return p if visible is None else jnp.where(visible, p, 0.0)


# -- what the kernels share: the tiles' layout, the producer's rings, the launch --------------------
# Each kernel pairs a producer warpgroup that streams tiles of one side of the attention matrix
# through rings of shared-memory slots with two consumers that hold a block of the other side: the
# dK/dV kernels hold keys and stream query tiles (`_QueryStream`), the dQ kernels hold query rows and
# stream key tiles (`_KeyStream`). Each stream owns its rings, their barriers and the producer's loop,
# so that a ring's "ready" arrivals match the copies that fill it.


@dataclasses.dataclass(frozen=True)
class _Columns:
    """How a kernel lays out its [rows, D] tiles in shared memory: whole, or (`split_head_dim`) as
    their column halves [CONSUMERS, rows, D / CONSUMERS], each a contiguous swizzled tile, so that a
    consumer's half is a whole wgmma operand and a whole TMA copy (a column slice of one [rows, D]
    tile is strided, which TMA cannot copy)."""

    head_dim: int
    split: bool

    @property
    def halves(self) -> list:
        """The column halves of D as slices: consumer c's is [c D/2, (c+1) D/2)."""
        half = self.head_dim // CONSUMERS
        return [pl.ds(c * half, half) for c in range(CONSUMERS)]

    @property
    def copies(self) -> int:
        """TMA copies per tile: the arrivals of a barrier that waits for one tile."""
        return CONSUMERS if self.split else 1

    def shape(self, rows: int) -> tuple[int, ...]:
        return (CONSUMERS, rows, self.head_dim // CONSUMERS) if self.split else (rows, self.head_dim)

    def copy_in(self, src, src_index: tuple, dst, dst_index: tuple, barrier):
        """TMA src.at[src_index] [rows, D] in global memory -> dst.at[dst_index] (a `shape` tile)."""
        plgpu = _plgpu()
        if not self.split:
            plgpu.copy_gmem_to_smem(src.at[src_index], dst.at[dst_index], barrier)
            return
        for c, cols in enumerate(self.halves):
            plgpu.copy_gmem_to_smem(src.at[(*src_index, cols)], dst.at[(*dst_index, c)], barrier)


def _produce(steps: Callable, stages: int, frees, issue: Callable):
    """The producer warpgroup's loop over rings of `stages` shared-memory slots, step i in slot
    i % stages: ring by ring, wait until the consumers have freed the slot (step i - stages's release
    on the ring's barrier in `frees`), then start the ring's copies of step i. At the end, observe
    each slot's last release before the barriers are freed.

    steps: () -> int32, the step count, traced anew at each use: the kernels were validated (sm90
    lowering, simulator) in that form, and one value traced once lowers to another module.
    issue(i, slot) -> one function per ring, in the order of `frees`, that starts step i's copies."""
    plgpu = _plgpu()

    @pl.loop(0, steps())
    def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        for free, copy in zip(frees, issue(i, slot)):
            @pl.when(i >= stages)
            def _(free=free):
                plgpu.barrier_wait(free.at[slot])

            copy()

    for slot in range(stages):
        @pl.when(steps() > slot)
        def _():
            for free in frees:
                plgpu.barrier_wait(free.at[slot])


@dataclasses.dataclass(frozen=True)
class _QueryStream:
    """The producer side of the dK/dV kernels (`_dkdv`, `_dkdv_split`). A CTA holds `cta_keys` keys of
    one KV head; its producer streams the query tiles that see them, for every query head of the GQA
    group in turn: step i is tile lo + i % tiles of head kv_head * group_size + i // tiles. Three
    rings: Q and dO [block_q, D] (laid out by `columns`) and the rows' [lse, delta] f32 [2, block_q],
    with which the rows' segment ids ride (freed with them). Both consumers read every slot."""

    problem: MosaicProblem
    columns: _Columns
    cta_keys: int
    block_q: int
    stages: int
    padded_q_len: int
    segments: bool

    def tile_bounds(self, ranges_ref, b):
        """(k0, (lo, full_lo, full_hi, hi)): this CTA's first key and the query tiles it visits, as
        `_query_tile_ranges`, narrowed to the keys' segments with segment ids."""
        k0 = lax.axis_index("kv_tiles") * self.cta_keys
        bounds = _query_tile_ranges(k0, self.cta_keys, self.problem, self.block_q, self.padded_q_len)
        if self.segments:
            bounds = clip_to_segments(ranges_ref, b, lax.axis_index("kv_tiles"), *bounds)
        return k0, bounds

    def smem(self, dtype) -> tuple:
        """The Q, dO and [lse, delta] rings."""
        plgpu = _plgpu()
        transforms = smem_transforms()
        tiles = (self.stages, *self.columns.shape(self.block_q))
        return (plgpu.SMEM(tiles, dtype, transforms=transforms),  # Q ring
                plgpu.SMEM(tiles, dtype, transforms=transforms),  # dO ring
                plgpu.SMEM((self.stages, 2, self.block_q), jnp.float32))  # [lse, delta] ring

    def ids_smem(self) -> tuple:
        """With segment ids, the ring of the streamed rows' ids [stages, block_q] int32; else ()."""
        return (_plgpu().SMEM((self.stages, self.block_q), jnp.int32),) if self.segments else ()

    def barriers(self) -> tuple:
        """(q_ready, do_ready, stats_ready, q_free, do_free, stats_free), `stages` barriers each."""
        plgpu, n, copies = _plgpu(), self.stages, self.columns.copies
        return (plgpu.Barrier(num_arrivals=copies, num_barriers=n),  # q_ready
                plgpu.Barrier(num_arrivals=copies, num_barriers=n),  # do_ready
                plgpu.Barrier(num_arrivals=1 + self.segments, num_barriers=n),  # stats_ready (+ the ids)
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n),  # q_free
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n),  # do_free
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n))  # stats_free

    def produce(self, refs, rings, barriers, *, b, kv_head, lo, tiles, steps: Callable):
        """`_produce` (steps: group_size * tiles). refs: q, do, stats and q_ids (or None) in global
        memory; rings: `smem`'s and the ids ring (or None); barriers: `barriers`'."""
        plgpu = _plgpu()
        q_ref, do_ref, stats_ref, ids_ref = refs
        q_smem, do_smem, stats_smem, ids_smem = rings
        q_ready, do_ready, stats_ready, *frees = barriers
        G, bq = self.problem.group_size, self.block_q

        def issue(i, slot):
            head = kv_head * G + lax.div(i, tiles)
            rows = pl.ds((lo + lax.rem(i, tiles)) * bq, bq)

            def stats_and_ids():
                plgpu.copy_gmem_to_smem(stats_ref.at[b, head, :, rows], stats_smem.at[slot], stats_ready.at[slot])
                if self.segments:
                    plgpu.copy_gmem_to_smem(ids_ref.at[b, rows], ids_smem.at[slot], stats_ready.at[slot])

            return (lambda: self.columns.copy_in(q_ref, (b, rows, head), q_smem, (slot,), q_ready.at[slot]),
                    lambda: self.columns.copy_in(do_ref, (b, rows, head), do_smem, (slot,), do_ready.at[slot]),
                    stats_and_ids)

        _produce(steps, self.stages, frees, issue)

    def operands(self, q, k, v, do, stats, segment_ids) -> tuple:
        """The kernel's inputs: (q, k, v, do, stats), with segment ids then (q_ids, kv_ids, each key
        block's range of query tiles)."""
        if not self.segments:
            return q, k, v, do, stats
        q_ids, kv_ids = segment_ids
        return q, k, v, do, stats, q_ids, kv_ids, segment_tile_ranges(kv_ids, q_ids, self.cta_keys, self.block_q)


@dataclasses.dataclass(frozen=True)
class _KeyStream:
    """The producer side of the dQ kernels (`_dq`, `_dq_split`). A CTA holds `cta_rows` query rows of
    one head; its producer streams the key tiles they see from the head's KV head: step i is key tile
    lo + i. Two rings: K and V [block_kv, D] (laid out by `columns`); the keys' segment ids ride with
    K (freed with it). Both consumers read every K slot, `v_readers` of them every V slot."""

    problem: MosaicProblem
    columns: _Columns
    cta_rows: int
    block_kv: int
    stages: int
    padded_q_len: int
    padded_kv_len: int
    segments: bool
    v_readers: int

    def tile_bounds(self, ranges_ref, b):
        """(row0, (lo, full_lo, full_hi, hi)): this CTA's first query row and the key tiles it visits,
        as `_key_tile_ranges`, narrowed to the rows' segments with segment ids."""
        row0 = cta_first_row(self.problem, self.padded_q_len, self.cta_rows)
        bounds = _key_tile_ranges(row0, self.cta_rows, self.problem, self.block_kv, self.padded_kv_len)
        if self.segments:
            bounds = clip_to_segments(ranges_ref, b, lax.div(row0, jnp.int32(self.cta_rows)), *bounds)
        return row0, bounds

    def smem(self, dtype) -> tuple:
        """The K and V rings."""
        plgpu = _plgpu()
        transforms = smem_transforms()
        tiles = (self.stages, *self.columns.shape(self.block_kv))
        return (plgpu.SMEM(tiles, dtype, transforms=transforms),  # K ring
                plgpu.SMEM(tiles, dtype, transforms=transforms))  # V ring

    def ids_smem(self) -> tuple:
        """With segment ids, the ring of the streamed keys' ids [stages, block_kv] int32; else ()."""
        return (_plgpu().SMEM((self.stages, self.block_kv), jnp.int32),) if self.segments else ()

    def barriers(self) -> tuple:
        """(k_ready, v_ready, k_free, v_free), `stages` barriers each."""
        plgpu, n, copies = _plgpu(), self.stages, self.columns.copies
        return (plgpu.Barrier(num_arrivals=copies + self.segments, num_barriers=n),  # k_ready (+ the ids)
                plgpu.Barrier(num_arrivals=copies, num_barriers=n),  # v_ready
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n),  # k_free
                plgpu.Barrier(num_arrivals=self.v_readers, num_barriers=n))  # v_free

    def produce(self, refs, rings, barriers, *, b, kv_head, lo, hi):
        """`_produce` (steps: hi - lo). refs: k, v and kv_ids (or None) in global memory; rings:
        `smem`'s and the ids ring (or None); barriers: `barriers`'."""
        plgpu = _plgpu()
        k_ref, v_ref, ids_ref = refs
        k_smem, v_smem, ids_smem = rings
        k_ready, v_ready, k_free, v_free = barriers

        def issue(i, slot):
            keys = pl.ds((lo + i) * self.block_kv, self.block_kv)

            def k_and_ids():
                self.columns.copy_in(k_ref, (b, keys, kv_head), k_smem, (slot,), k_ready.at[slot])
                if self.segments:
                    plgpu.copy_gmem_to_smem(ids_ref.at[b, keys], ids_smem.at[slot], k_ready.at[slot])

            return k_and_ids, lambda: self.columns.copy_in(v_ref, (b, keys, kv_head), v_smem, (slot,),
                                                           v_ready.at[slot])

        _produce(lambda: hi - lo, self.stages, (k_free, v_free), issue)

    def operands(self, q, k, v, do, stats, segment_ids) -> tuple:
        """The kernel's inputs: (q, k, v, do, stats), with segment ids then (q_ids, kv_ids, each row
        block's range of key tiles)."""
        if not self.segments:
            return q, k, v, do, stats
        q_ids, kv_ids = segment_ids
        return q, k, v, do, stats, q_ids, kv_ids, segment_tile_ranges(q_ids, kv_ids, self.cta_rows, self.block_kv)


def _split_refs(refs, segments: bool):
    """((q_ids, kv_ids, ranges), outputs) from a kernel's refs after its five inputs: the segment ids'
    three refs come first, (None, None, None) without segment ids."""
    return (refs[:3], refs[3:]) if segments else ((None, None, None), refs)


def _store_dkdv(dk, dv, k_smem, v_smem, dk_dst, dv_dst, *, sm_scale: float):
    """Writes the finished f32 dK and dV over the CTA's K and V tiles in shared memory (read by no
    one any more) and copies them out. dS was left unscaled: the softmax scale goes on dK once."""
    plgpu = _plgpu()
    k_smem[...] = (dk * sm_scale).astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_dst)
    plgpu.copy_smem_to_gmem(v_smem, dv_dst)
    plgpu.wait_smem_to_gmem(0)


def _store_dq(dq, q_smem, dq_dst, *, sm_scale: float):
    """Writes the finished f32 dQ (unscaled, like dS) over the CTA's Q tile in shared memory (read by
    no one any more) and copies it out."""
    plgpu = _plgpu()
    q_smem[...] = (dq * sm_scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_dst)
    plgpu.wait_smem_to_gmem(0)


def _dkdv(q, k, v, do, stats, segment_ids=None, dq_acc=None, *, problem: MosaicProblem,
          config: MosaicBwdConfig, interpret: bool):
    """-> dK, dV [B, Sp, K, D] in q's dtype, summed over the GQA group. With `dq_acc` (a mutable f32
    [B, Tp, H, D] ref holding zeros), each step's unscaled dQ partial is also added into it.
    segment_ids: None or padded (q_ids [B, Tp], kv_ids [B, Sp]) int32."""
    plgpu = _plgpu()
    B, Tp, H, D = q.shape
    Sp, K = k.shape[1], k.shape[2]
    bq, bkv, stages = config.block_q, config.block_kv, config.num_stages
    G = problem.group_size
    cta_keys = CONSUMERS * bkv
    scale = problem.sm_scale * LOG2E
    masks = masks_keys(problem, Sp)
    mm = _Matmuls(interpret)
    transforms = smem_transforms()

    with_dq = dq_acc is not None
    segments = segment_ids is not None
    stream = _QueryStream(problem, _Columns(D, split=False), cta_keys=cta_keys, block_q=bq, stages=stages,
                          padded_q_len=Tp, segments=segments)

    def body(q_ref, k_ref, v_ref, do_ref, stats_ref, *refs):
        (q_ids_ref, kv_ids_ref, ranges_ref), refs = _split_refs(refs, segments)
        dq_ref, dk_ref, dv_ref = refs if with_dq else (None, *refs)

        def per_warpgroup(smem, barriers):
            kv_smem, q_smem, do_smem, stats_smem, *extra_smem = smem
            ids_smem = extra_smem.pop() if segments else None  # the streamed query tiles' ids
            dq_smem = extra_smem
            kv_ready, q_ready, do_ready, stats_ready, q_free, do_free, stats_free, *ds_barriers = barriers
            wg = lax.axis_index("wg")
            b, kv_head = lax.axis_index("batch"), lax.axis_index("kv_heads")
            k0, (lo, full_lo, full_hi, hi) = stream.tile_bounds(ranges_ref, b)
            tiles = hi - lo

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")
                stream.produce((q_ref, do_ref, stats_ref, q_ids_ref), (q_smem, do_smem, stats_smem, ids_smem),
                               (q_ready, do_ready, stats_ready, q_free, do_free, stats_free),
                               b=b, kv_head=kv_head, lo=lo, tiles=tiles, steps=lambda: G * tiles)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                keys0 = k0 + wg * bkv
                my_k, my_v = kv_smem.at[0, wg], kv_smem.at[1, wg]
                plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(keys0, bkv), kv_head], my_k, kv_ready.at[wg])
                plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(keys0, bkv), kv_head], my_v, kv_ready.at[wg])
                key_ids = mm.ids(kv_ids_ref.at[b], keys0, bkv) if segments else None
                plgpu.barrier_wait(kv_ready.at[wg])

                def step(i, t, carry, masked: bool):
                    dk, dv = carry
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_wait(q_ready.at[slot])
                    plgpu.barrier_wait(do_ready.at[slot])
                    # Sᵀ = K Qᵀ and dPᵀ = V dOᵀ [keys, queries] need only shared memory: one issue.
                    s_t, dp_t = mm.two_dot_t(my_k, q_smem.at[slot], my_v, do_smem.at[slot], (bkv, bq))
                    plgpu.barrier_wait(stats_ready.at[slot])
                    lse = mm.vector(stats_smem.at[slot, 0], 0)
                    delta = mm.vector(stats_smem.at[slot, 1], 0)
                    visible = mm.same_segment(key_ids, ids_smem.at[slot], s_t.shape) if segments else None
                    plgpu.barrier_arrive(stats_free.at[slot])
                    s_t, cap_grad = _softcap(s_t, problem)
                    p_t = jnp.exp2(s_t * scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                    positions = (lambda: (t * bq + mm.iota(s_t.shape, 1), keys0 + mm.iota(s_t.shape, 0))
                                 ) if masked else None
                    p_t = _zero_hidden(p_t, visible, positions, problem)
                    ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                    if cap_grad is not None:
                        ds_t = ds_t * cap_grad
                    ds_t = ds_t.astype(q.dtype)
                    if with_dq and config.dq_with_dkdv:
                        dv, dk, part = dkdv_with_dq(dv, dk, p_t.astype(q.dtype), ds_t, slot)
                    else:
                        # dV += Pᵀ dO and dK += dSᵀ Q, issued together.
                        dv, dk = mm.two_accumulate(dv, p_t.astype(q.dtype), do_smem.at[slot],
                                                   dk, ds_t, q_smem.at[slot])
                        part = None
                    plgpu.barrier_arrive(do_free.at[slot])
                    plgpu.barrier_arrive(q_free.at[slot])
                    if with_dq:
                        add_dq_partial(ds_t, part, i, t)
                    return dk, dv

                def dkdv_with_dq(dv, dk, p_t, ds_t, slot):
                    """(dV + Pᵀ dO, dK + dSᵀ Q, dSᵀ K): dS is written to shared memory first, so that
                    the dQ product issues before dV's and dK's and shares their one wait."""
                    ds_smem = dq_smem[0].at[wg]
                    ds_smem[...] = ds_t
                    plgpu.commit_smem()
                    part, dv, dk = mm.with_t_dot(ds_smem, my_k, (bq, D), lambda: mm.two_accumulate(
                        dv, p_t, do_smem.at[slot], dk, ds_t, q_smem.at[slot]))
                    return dv, dk, part

                def split_dq_partial(ds_t, i):
                    """`config.dq_split`: this consumer's half of the columns of dS K over both
                    consumers' keys, f32 [bq, D / 2]. Step i's dSᵀ goes to this consumer's slot once
                    the other has read step i - 1's (ds_free), and the product waits until both
                    slots hold step i's (ds_ready)."""
                    ds_ready, ds_free = ds_barriers

                    @pl.when(i > 0)
                    def _():
                        plgpu.barrier_wait(ds_free)

                    dq_smem[0].at[wg][...] = ds_t
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(ds_ready)
                    plgpu.barrier_wait(ds_ready)
                    cols = pl.ds(wg * (D // 2), D // 2)
                    part = mm.t_dot_sum([(dq_smem[0].at[c], kv_smem.at[0, c, :, cols]) for c in range(CONSUMERS)],
                                        (bq, D // 2))
                    plgpu.barrier_arrive(ds_free)
                    return part

                def add_dq_partial(ds_t, part, i, t):
                    """dQ[tile rows] += dSᵀ K over this consumer's keys, by TMA reduce-add. part: that
                    product when `dkdv_with_dq` made it, else None (made here). With `config.dq_split`
                    the consumer adds its half of the columns over both consumers' keys instead."""
                    nbuf, chunks = config.dq_buffers, config.dq_chunks
                    if config.dq_split:
                        half = split_dq_partial(ds_t, i)
                        buf = wg if nbuf == 1 else wg * nbuf + lax.rem(i, jnp.int32(nbuf))
                        plgpu.wait_smem_to_gmem(nbuf - 1, wait_read_only=True)
                        dq_smem[1].at[buf][...] = half
                        plgpu.commit_smem()
                        head = kv_head * G + lax.div(i, tiles)
                        plgpu.copy_smem_to_gmem(
                            dq_smem[1].at[buf], dq_ref.at[b, pl.ds(t * bq, bq), head, pl.ds(wg * (D // 2), D // 2)],
                            reduction_op="add")
                        return
                    ds_smem = dq_smem[0].at[wg]
                    if part is None:
                        ds_smem[...] = ds_t
                        plgpu.commit_smem()
                        part = mm.t_dot(ds_smem, my_k, (bq, D))
                    width = D // chunks
                    for c in range(chunks):  # one reduce-add per column chunk [bq, width]
                        # Store n = i * chunks + c goes to buffer n % nbuf of this consumer's nbuf
                        # (1 buffer and 1 chunk lower as the first form of this kernel did).
                        n = i if chunks == 1 else i * chunks + c
                        buf = wg if nbuf == 1 else wg * nbuf + lax.rem(n, jnp.int32(nbuf))
                        part_smem = dq_smem[1].at[buf]
                        # The store made nbuf stores ago must have left this buffer before it is
                        # overwritten; the nbuf - 1 after it may still be reading.
                        plgpu.wait_smem_to_gmem(nbuf - 1, wait_read_only=True)
                        part_smem[...] = part if chunks == 1 else part[:, c * width:(c + 1) * width]
                        plgpu.commit_smem()
                        head = kv_head * G + lax.div(i, tiles)
                        dst = dq_ref.at[b, pl.ds(t * bq, bq), head]
                        if chunks > 1:
                            dst = dq_ref.at[b, pl.ds(t * bq, bq), head, pl.ds(c * width, width)]
                        plgpu.copy_smem_to_gmem(part_smem, dst, reduction_op="add")

                def head_loop(g, carry):
                    base = g * tiles - lo  # step number of tile t is base + t

                    def run(first, last, masked, carry):
                        return lax.fori_loop(first, last, lambda t, c: step(base + t, t, c, masked), carry)

                    # With segment ids every step is masked by id; `masked` adds the position mask.
                    if not masks:
                        return run(lo, hi, False, carry)
                    carry = run(lo, full_lo, True, carry)
                    carry = run(full_lo, full_hi, False, carry)
                    return run(full_hi, hi, True, carry)

                dk, dv = lax.fori_loop(0, G, head_loop, (mm.zeros((bkv, D)), mm.zeros((bkv, D))))
                if ds_barriers:  # observe the last step's ds_free before the barriers are freed
                    @pl.when(G * tiles > 0)
                    def _():
                        plgpu.barrier_wait(ds_barriers[1])
                _store_dkdv(dk, dv, my_k, my_v, dk_ref.at[b, pl.ds(keys0, bkv), kv_head],
                            dv_ref.at[b, pl.ds(keys0, bkv), kv_head], sm_scale=problem.sm_scale)

        smem = (plgpu.SMEM((2, CONSUMERS, bkv, D), q.dtype, transforms=transforms),  # this CTA's K, V
                *stream.smem(q.dtype))
        if with_dq:
            smem += (plgpu.SMEM((CONSUMERS, bkv, bq), q.dtype, transforms=transforms),  # dSᵀ
                     # dQ partials on their way out, dq_buffers per consumer
                     plgpu.SMEM((CONSUMERS * config.dq_buffers, bq,
                                 D // (2 if config.dq_split else config.dq_chunks)), jnp.float32))
        smem += stream.ids_smem()
        barriers = (plgpu.Barrier(num_arrivals=2, num_barriers=CONSUMERS),  # kv_ready: K and V landed
                    *stream.barriers())
        if with_dq and config.dq_split:
            barriers += (plgpu.Barrier(num_arrivals=CONSUMERS),  # ds_ready: both dSᵀ of a step written
                         plgpu.Barrier(num_arrivals=CONSUMERS))  # ds_free: both read by the dQ products
        pl.run_scoped(lambda smem, *bars: per_warpgroup(smem, bars), smem, *barriers, collective_axes="wg")

    out = jax.ShapeDtypeStruct((B, Sp, K, D), q.dtype)
    launch = dict(grid=(Sp // cta_keys, K, B), grid_names=("kv_tiles", "kv_heads", "batch"))
    inputs = stream.operands(q, k, v, do, stats, segment_ids)
    if not with_dq:
        return plgpu.kernel(body, out_type=(out, out), **launch, **_kernel_options(interpret))(*inputs)
    # pl.kernel (unlike plgpu.kernel) takes a mutable ref argument, updated in place.
    options = _kernel_options(interpret)
    mesh = plgpu.Mesh(**launch, num_threads=options.pop("num_threads"),
                      thread_name=options.pop("thread_name"))
    return pl.kernel(body, out_type=(out, out), mesh=mesh, **options)(*inputs, dq_acc)


def _dq(q, k, v, do, stats, segment_ids=None, *, problem: MosaicProblem, config: MosaicBwdConfig,
        interpret: bool):
    """-> dQ [B, Tp, H, D] in q's dtype. segment_ids: None or padded (q_ids [B, Tp], kv_ids [B, Sp])."""
    plgpu = _plgpu()
    B, Tp, H, D = q.shape
    Sp = k.shape[1]
    bq, bkv, stages = config.block_q_dq, config.block_kv_dq, config.num_stages
    cta_rows = CONSUMERS * bq
    scale = problem.sm_scale * LOG2E
    masks = masks_keys(problem, Sp)
    mm = _Matmuls(interpret)
    transforms = smem_transforms()

    segments = segment_ids is not None
    stream = _KeyStream(problem, _Columns(D, split=False), cta_rows=cta_rows, block_kv=bkv, stages=stages,
                        padded_q_len=Tp, padded_kv_len=Sp, segments=segments, v_readers=CONSUMERS)

    def body(q_ref, k_ref, v_ref, do_ref, stats_ref, *refs):
        (q_ids_ref, kv_ids_ref, ranges_ref), (dq_ref,) = _split_refs(refs, segments)

        def per_warpgroup(smem, barriers):
            qdo_smem, k_smem, v_smem, stats_smem, *ids_smem = smem
            ids_smem = ids_smem[0] if segments else None  # the key tiles' ids
            mine_ready, k_ready, v_ready, k_free, v_free = barriers
            wg = lax.axis_index("wg")
            b, h = lax.axis_index("batch"), lax.axis_index("heads")
            row0, (lo, full_lo, full_hi, hi) = stream.tile_bounds(ranges_ref, b)

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")
                kv_head = lax.div(h, jnp.int32(problem.group_size))
                stream.produce((k_ref, v_ref, kv_ids_ref), (k_smem, v_smem, ids_smem),
                               (k_ready, v_ready, k_free, v_free),
                               b=b, kv_head=kv_head, lo=lo, hi=hi)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                rows0 = row0 + wg * bq
                my_q, my_do = qdo_smem.at[0, wg], qdo_smem.at[1, wg]
                my_stats = stats_smem.at[wg]
                rows = pl.ds(rows0, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], my_q, mine_ready.at[wg])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], my_do, mine_ready.at[wg])
                plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, rows], my_stats, mine_ready.at[wg])
                query_ids = mm.ids(q_ids_ref.at[b], rows0, bq) if segments else None
                plgpu.barrier_wait(mine_ready.at[wg])
                lse = mm.vector(my_stats.at[0], 1)
                delta = mm.vector(my_stats.at[1], 1)

                def step(i, dq, masked: bool):
                    slot = lax.rem(i - lo, jnp.int32(stages))
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])
                    # S = Q Kᵀ and dP = dO Vᵀ need only shared memory: one issue, one wait.
                    s, dp = mm.two_dot_t(my_q, k_smem.at[slot], my_do, v_smem.at[slot], (bq, bkv))
                    plgpu.barrier_arrive(v_free.at[slot])
                    s, cap_grad = _softcap(s, problem)
                    p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, s.shape, [0]))
                    # With segment ids every step is masked by id; `masked` adds the position mask.
                    visible = mm.same_segment(query_ids, ids_smem.at[slot], s.shape) if segments else None
                    positions = (lambda: (rows0 + mm.iota(s.shape, 0), i * bkv + mm.iota(s.shape, 1))
                                 ) if masked else None
                    p = _zero_hidden(p, visible, positions, problem)
                    ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                    if cap_grad is not None:
                        ds = ds * cap_grad
                    dq = mm.accumulate(dq, ds.astype(q.dtype), k_smem.at[slot])  # dQ += dS K
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq

                def run(first, last, masked, dq):
                    return lax.fori_loop(first, last, lambda i, c: step(i, c, masked), dq)

                dq = mm.zeros((bq, D))
                if masks:
                    dq = run(lo, full_lo, True, dq)
                    dq = run(full_lo, full_hi, False, dq)
                    dq = run(full_hi, hi, True, dq)
                else:
                    dq = run(lo, hi, False, dq)
                _store_dq(dq, my_q, dq_ref.at[b, rows, h], sm_scale=problem.sm_scale)

        smem = (plgpu.SMEM((2, CONSUMERS, bq, D), q.dtype, transforms=transforms),  # each consumer's Q, dO
                *stream.smem(q.dtype),
                plgpu.SMEM((CONSUMERS, 2, bq), jnp.float32),  # each consumer's [lse, delta]
                *stream.ids_smem())
        barriers = (plgpu.Barrier(num_arrivals=3, num_barriers=CONSUMERS),  # mine_ready: Q, dO and stats landed
                    *stream.barriers())
        pl.run_scoped(lambda smem, *bars: per_warpgroup(smem, bars), smem, *barriers, collective_axes="wg")

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((B, Tp, H, D), q.dtype),
                        grid=(Tp // cta_rows, H, B), grid_names=("q_tiles", "heads", "batch"),
                        **_kernel_options(interpret))(*stream.operands(q, k, v, do, stats, segment_ids))


# -- the head dim split between the consumers (`MosaicBwdConfig.split_head_dim`, D=256) -------------
# Each step's score tile is shared by the two consumers: consumer 0 computes the scores and P (the
# whole D contraction), consumer 1 dP and dS, and each then accumulates its half of the gradient's
# columns. They hand P and dS over in shared memory (`_HandOff`). Every [rows, D] tile lies in
# shared memory as its two column halves (`_Columns`); the D contraction of the scores is the sum
# of the two halves' products.
#
# P crosses in the input dtype, the precision it already has as the dV (dK/dV kernel) operand: dS =
# P (dP - delta) formed from the rounded P has one more rounding error of the same size as the one
# dS gets anyway when it is cast for its product (f32 P would cost 8 KB more shared memory).


@dataclasses.dataclass(frozen=True)
class _HandOff:
    """A tile one consumer writes each step and the other reads (P or dS), guarded by a "ready"
    barrier (the writer arrives once the tile is written) and a "free" barrier (the reader arrives
    once it has read it; the writer waits on that before overwriting the tile next step, and observes
    the last one at the end)."""

    smem: Any  # the tile in shared memory: Pᵀ or dSᵀ [bkv, bq] (dK/dV kernel), P or dS [bq, bkv] (dQ)
    ready: Any  # barrier: the writer has written this step's tile
    free: Any  # barrier: the reader has read it

    def put(self, value, overwrites):
        """Writes value (cast to the tile's dtype) and signals it; overwrites: whether a previous
        step's tile is there (then the reader must have freed it first)."""
        plgpu = _plgpu()

        @pl.when(overwrites)
        def _():
            plgpu.barrier_wait(self.free)

        self.smem[...] = value.astype(self.smem.dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(self.ready)

    def take(self, mm: _Matmuls):
        """The tile in registers, as a wgmma operand; frees it."""
        plgpu = _plgpu()
        plgpu.barrier_wait(self.ready)
        value = mm.tile(self.smem)
        plgpu.barrier_arrive(self.free)
        return value

    def last_freed(self, written):
        """The writer observes the last step's release (if any step was written: `written`) before
        the barriers are freed."""
        @pl.when(written)
        def _():
            _plgpu().barrier_wait(self.free)


def _dkdv_split(q, k, v, do, stats, segment_ids=None, *, problem: MosaicProblem, config: MosaicBwdConfig,
                interpret: bool):
    """-> dK, dV [B, Sp, K, D] in q's dtype, summed over the GQA group; one CTA per block_kv keys of
    one KV head, consumer w owning columns [w D/2, (w+1) D/2) of dK and dV. Streams (Q, dO,
    [lse, delta]) tiles like `_dkdv`. segment_ids: None or padded (q_ids [B, Tp], kv_ids [B, Sp])."""
    plgpu = _plgpu()
    B, Tp, H, D = q.shape
    Sp, K = k.shape[1], k.shape[2]
    bq, bkv, stages = config.block_q, config.block_kv, config.num_stages
    G = problem.group_size
    half = D // CONSUMERS
    scale = problem.sm_scale * LOG2E
    masks = masks_keys(problem, Sp)
    mm = _Matmuls(interpret)
    transforms = smem_transforms()
    segments = segment_ids is not None
    columns = _Columns(D, split=True)
    stream = _QueryStream(problem, columns, cta_keys=bkv, block_q=bq, stages=stages, padded_q_len=Tp,
                          segments=segments)

    def body(q_ref, k_ref, v_ref, do_ref, stats_ref, *refs):
        (q_ids_ref, kv_ids_ref, ranges_ref), (dk_ref, dv_ref) = _split_refs(refs, segments)

        def per_warpgroup(smem, barriers):
            # Refs read by a run_state product (`mm.accumulate*`) take traced indices only: P and dS have
            # buffers of their own, a consumer's column half is `wg`. run_state returns the index scalars
            # it closes over, and jax 0.11's warpgroup lowering rejects a constant one ("Shaped arrays
            # must be represented by ir.Values, got: TypedInt(0)").
            kv_smem, q_smem, do_smem, stats_smem, p_smem, ds_smem, *ids_smem = smem
            ids_smem = ids_smem[0] if segments else None  # the streamed query tiles' ids
            kv_ready, q_ready, do_ready, stats_ready, q_free, do_free, stats_free, *hand_barriers = barriers
            p_hand = _HandOff(p_smem, *hand_barriers[:2])  # Pᵀ [bkv, bq]
            ds_hand = _HandOff(ds_smem, *hand_barriers[2:])  # dSᵀ [bkv, bq]
            wg = lax.axis_index("wg")
            b, kv_head = lax.axis_index("batch"), lax.axis_index("kv_heads")
            k0, (lo, full_lo, full_hi, hi) = stream.tile_bounds(ranges_ref, b)
            keys = pl.ds(k0, bkv)
            tiles = hi - lo
            steps = G * tiles

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")
                for c, cols in enumerate(columns.halves):
                    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head, cols], kv_smem.at[0, c], kv_ready)
                    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head, cols], kv_smem.at[1, c], kv_ready)
                stream.produce((q_ref, do_ref, stats_ref, q_ids_ref), (q_smem, do_smem, stats_smem, ids_smem),
                               (q_ready, do_ready, stats_ready, q_free, do_free, stats_free),
                               b=b, kv_head=kv_head, lo=lo, tiles=tiles, steps=lambda: steps)

            def finish(dk, dv, c):
                """Stores this consumer's columns of dK and dV over K's and V's half c (neither consumer
                reads them any more: each has waited on the other's last hand-off)."""
                cols = columns.halves[c]
                _store_dkdv(dk, dv, kv_smem.at[0, c], kv_smem.at[1, c], dk_ref.at[b, keys, kv_head, cols],
                            dv_ref.at[b, keys, kv_head, cols], sm_scale=problem.sm_scale)

            @pl.when(wg == 0)
            def _scores():
                """Sᵀ = K Qᵀ and Pᵀ, handed to consumer 1; dV, dK columns [0, D/2)."""
                plgpu.set_max_registers(232, action="increase")
                key_ids = mm.ids(kv_ids_ref.at[b], k0, bkv) if segments else None
                plgpu.barrier_wait(kv_ready)

                def step(i, t, carry, masked: bool):
                    dk, dv = carry
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_wait(q_ready.at[slot])
                    s_t = mm.dot_t_sum([(kv_smem.at[0, c], q_smem.at[slot, c]) for c in range(CONSUMERS)],
                                       (bkv, bq))  # [keys, queries]
                    plgpu.barrier_wait(stats_ready.at[slot])
                    lse = mm.vector(stats_smem.at[slot, 0], 0)
                    visible = mm.same_segment(key_ids, ids_smem.at[slot], s_t.shape) if segments else None
                    plgpu.barrier_arrive(stats_free.at[slot])
                    p_t = jnp.exp2(s_t * scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                    positions = (lambda: (t * bq + mm.iota(s_t.shape, 1), k0 + mm.iota(s_t.shape, 0))
                                 ) if masked else None
                    p_t = _zero_hidden(p_t, visible, positions, problem).astype(q.dtype)
                    p_hand.put(p_t, i > 0)
                    plgpu.barrier_wait(do_ready.at[slot])
                    plgpu.barrier_wait(ds_hand.ready)
                    # dV += Pᵀ dO (Pᵀ from registers) and dK += dSᵀ Q (dSᵀ from consumer 1), this half.
                    dv, dk = mm.accumulate_mixed(dv, p_t, do_smem.at[slot, wg], dk, ds_hand.smem, q_smem.at[slot, wg])
                    plgpu.barrier_arrive(ds_hand.free)
                    plgpu.barrier_arrive(q_free.at[slot])
                    plgpu.barrier_arrive(do_free.at[slot])
                    return dk, dv

                def head_loop(g, carry):
                    base = g * tiles - lo  # step number of tile t is base + t
                    for first, last, allowed in consumer_loops((lo, full_lo, full_hi, hi), masks, True):
                        carry = lax.fori_loop(lo + first, lo + last,
                                              lambda t, c, m=allowed is not None: step(base + t, t, c, m), carry)
                    return carry

                dk, dv = lax.fori_loop(0, G, head_loop, (mm.zeros((bkv, half)), mm.zeros((bkv, half))))
                p_hand.last_freed(steps > 0)
                finish(dk, dv, 0)

            @pl.when(wg == 1)
            def _gradients():
                """dPᵀ = V dOᵀ and dSᵀ, handed to consumer 0; dV, dK columns [D/2, D)."""
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(kv_ready)

                def step(i, carry):
                    dk, dv = carry
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_wait(do_ready.at[slot])
                    dp_t = mm.dot_t_sum([(kv_smem.at[1, c], do_smem.at[slot, c]) for c in range(CONSUMERS)],
                                        (bkv, bq))  # [keys, queries]
                    plgpu.barrier_wait(stats_ready.at[slot])
                    delta = mm.vector(stats_smem.at[slot, 1], 0)
                    plgpu.barrier_arrive(stats_free.at[slot])
                    p_t = p_hand.take(mm)
                    ds_t = p_t.astype(jnp.float32) * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                    ds_t = ds_t.astype(q.dtype)
                    ds_hand.put(ds_t, i > 0)
                    plgpu.barrier_wait(q_ready.at[slot])
                    dv, dk = mm.two_accumulate(dv, p_t, do_smem.at[slot, wg], dk, ds_t, q_smem.at[slot, wg])
                    plgpu.barrier_arrive(q_free.at[slot])
                    plgpu.barrier_arrive(do_free.at[slot])
                    return dk, dv

                dk, dv = lax.fori_loop(0, steps, step, (mm.zeros((bkv, half)), mm.zeros((bkv, half))))
                ds_hand.last_freed(steps > 0)
                finish(dk, dv, 1)

        smem = (plgpu.SMEM((2, *columns.shape(bkv)), q.dtype, transforms=transforms),  # K, V (then dK, dV)
                *stream.smem(q.dtype),
                plgpu.SMEM((bkv, bq), q.dtype, transforms=transforms),  # Pᵀ hand-off
                plgpu.SMEM((bkv, bq), q.dtype, transforms=transforms),  # dSᵀ hand-off
                *stream.ids_smem())
        barriers = (
            plgpu.Barrier(num_arrivals=2 * CONSUMERS),  # kv_ready: K's and V's halves landed
            *stream.barriers(),
            plgpu.Barrier(),  # p_ready: consumer 0 wrote Pᵀ
            plgpu.Barrier(),  # p_free: consumer 1 read it
            plgpu.Barrier(),  # ds_ready: consumer 1 wrote dSᵀ
            plgpu.Barrier(),  # ds_free: consumer 0's dK product read it
        )
        pl.run_scoped(lambda smem, *bars: per_warpgroup(smem, bars), smem, *barriers, collective_axes="wg")

    out = jax.ShapeDtypeStruct((B, Sp, K, D), q.dtype)
    return plgpu.kernel(body, out_type=(out, out), grid=(Sp // bkv, K, B),
                        grid_names=("kv_tiles", "kv_heads", "batch"),
                        **_kernel_options(interpret))(*stream.operands(q, k, v, do, stats, segment_ids))


def _dq_split(q, k, v, do, stats, segment_ids=None, *, problem: MosaicProblem, config: MosaicBwdConfig,
              interpret: bool):
    """-> dQ [B, Tp, H, D] in q's dtype; one CTA per block_q_dq query rows of one head, streaming K/V
    tiles like `_dq`, consumer w owning columns [w D/2, (w+1) D/2) of dQ. segment_ids: as `_dq`."""
    plgpu = _plgpu()
    B, Tp, H, D = q.shape
    Sp = k.shape[1]
    bq, bkv, stages = config.block_q_dq, config.block_kv_dq, config.num_stages
    half = D // CONSUMERS
    scale = problem.sm_scale * LOG2E
    masks = masks_keys(problem, Sp)
    mm = _Matmuls(interpret)
    transforms = smem_transforms()
    segments = segment_ids is not None
    columns = _Columns(D, split=True)
    stream = _KeyStream(problem, columns, cta_rows=bq, block_kv=bkv, stages=stages, padded_q_len=Tp,
                        padded_kv_len=Sp, segments=segments, v_readers=1)  # consumer 1 alone reads V

    def body(q_ref, k_ref, v_ref, do_ref, stats_ref, *refs):
        (q_ids_ref, kv_ids_ref, ranges_ref), (dq_ref,) = _split_refs(refs, segments)

        def per_warpgroup(smem, barriers):
            # Indexed as in `_dkdv_split` (traced indices only, for jax 0.11's warpgroup lowering).
            qdo_smem, k_smem, v_smem, stats_smem, p_smem, ds_smem, *ids_smem = smem
            ids_smem = ids_smem[0] if segments else None  # the key tiles' ids
            mine_ready, k_ready, v_ready, k_free, v_free, *hand_barriers = barriers
            p_hand = _HandOff(p_smem, *hand_barriers[:2])  # P [bq, bkv]
            ds_hand = _HandOff(ds_smem, *hand_barriers[2:])  # dS [bq, bkv]
            wg = lax.axis_index("wg")
            b, h = lax.axis_index("batch"), lax.axis_index("heads")
            row0, (lo, full_lo, full_hi, hi) = stream.tile_bounds(ranges_ref, b)
            rows = pl.ds(row0, bq)
            my_q, my_do = qdo_smem.at[0], qdo_smem.at[1]

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")
                kv_head = lax.div(h, jnp.int32(problem.group_size))
                for c, cols in enumerate(columns.halves):
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, cols], my_q.at[c], mine_ready)
                    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, cols], my_do.at[c], mine_ready)
                plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, rows], stats_smem, mine_ready)
                stream.produce((k_ref, v_ref, kv_ids_ref), (k_smem, v_smem, ids_smem),
                               (k_ready, v_ready, k_free, v_free),
                               b=b, kv_head=kv_head, lo=lo, hi=hi)

            def finish(dq, c):
                """Stores this consumer's columns of dQ over Q's half c (consumer 0 read Q last before
                its last P, which consumer 1 waited on)."""
                _store_dq(dq, my_q.at[c], dq_ref.at[b, rows, h, columns.halves[c]], sm_scale=problem.sm_scale)

            @pl.when(wg == 0)
            def _scores():
                """S = Q Kᵀ and P, handed to consumer 1; dQ columns [0, D/2)."""
                plgpu.set_max_registers(232, action="increase")
                query_ids = mm.ids(q_ids_ref.at[b], row0, bq) if segments else None
                plgpu.barrier_wait(mine_ready)
                lse = mm.vector(stats_smem.at[0], 1)

                def step(i, dq, masked: bool):
                    slot = lax.rem(i - lo, jnp.int32(stages))
                    plgpu.barrier_wait(k_ready.at[slot])
                    s = mm.dot_t_sum([(my_q.at[c], k_smem.at[slot, c]) for c in range(CONSUMERS)], (bq, bkv))
                    p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, s.shape, [0]))
                    visible = mm.same_segment(query_ids, ids_smem.at[slot], s.shape) if segments else None
                    positions = (lambda: (row0 + mm.iota(s.shape, 0), i * bkv + mm.iota(s.shape, 1))
                                 ) if masked else None
                    p_hand.put(_zero_hidden(p, visible, positions, problem), i > lo)
                    plgpu.barrier_wait(ds_hand.ready)
                    dq = mm.accumulate_from_smem(dq, ds_hand.smem, k_smem.at[slot, wg])  # dQ += dS K, this half
                    plgpu.barrier_arrive(ds_hand.free)
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq

                dq = mm.zeros((bq, half))
                for first, last, allowed in consumer_loops((lo, full_lo, full_hi, hi), masks, True):
                    dq = lax.fori_loop(lo + first, lo + last,
                                       lambda i, c, m=allowed is not None: step(i, c, m), dq)
                p_hand.last_freed(hi > lo)
                finish(dq, 0)

            @pl.when(wg == 1)
            def _gradients():
                """dP = dO Vᵀ and dS, handed to consumer 0; dQ columns [D/2, D)."""
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(mine_ready)
                delta = mm.vector(stats_smem.at[1], 1)

                def step(i, dq):
                    slot = lax.rem(i - lo, jnp.int32(stages))
                    plgpu.barrier_wait(v_ready.at[slot])
                    dp = mm.dot_t_sum([(my_do.at[c], v_smem.at[slot, c]) for c in range(CONSUMERS)], (bq, bkv))
                    plgpu.barrier_arrive(v_free.at[slot])
                    p = p_hand.take(mm)
                    ds = p.astype(jnp.float32) * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                    ds = ds.astype(q.dtype)
                    ds_hand.put(ds, i > lo)
                    plgpu.barrier_wait(k_ready.at[slot])
                    dq = mm.accumulate(dq, ds, k_smem.at[slot, wg])  # dQ += dS K, this half
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq

                dq = lax.fori_loop(lo, hi, step, mm.zeros((bq, half)))
                ds_hand.last_freed(hi > lo)
                finish(dq, 1)

        smem = (plgpu.SMEM((2, *columns.shape(bq)), q.dtype, transforms=transforms),  # this CTA's Q (then dQ), dO
                *stream.smem(q.dtype),
                plgpu.SMEM((2, bq), jnp.float32),  # [lse, delta]
                plgpu.SMEM((bq, bkv), q.dtype, transforms=transforms),  # P hand-off
                plgpu.SMEM((bq, bkv), q.dtype, transforms=transforms),  # dS hand-off
                *stream.ids_smem())
        barriers = (
            plgpu.Barrier(num_arrivals=2 * CONSUMERS + 1),  # mine_ready: Q's and dO's halves, stats landed
            *stream.barriers(),
            plgpu.Barrier(),  # p_ready: consumer 0 wrote P
            plgpu.Barrier(),  # p_free: consumer 1 read it
            plgpu.Barrier(),  # ds_ready: consumer 1 wrote dS
            plgpu.Barrier(),  # ds_free: consumer 0's dQ product read it
        )
        pl.run_scoped(lambda smem, *bars: per_warpgroup(smem, bars), smem, *barriers, collective_axes="wg")

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((B, Tp, H, D), q.dtype),
                        grid=(Tp // bq, H, B), grid_names=("q_tiles", "heads", "batch"),
                        **_kernel_options(interpret))(*stream.operands(q, k, v, do, stats, segment_ids))


def backward(q, k, v, do, lse2, delta, segment_ids=None, *, problem: MosaicProblem,
             config: MosaicBwdConfig, interpret: bool = False):
    """Padded q, do [B, Tp, H, D], k, v [B, Sp, K, D], lse2 (log2 units, +inf for empty rows) and
    delta [B, H, Tp] f32 -> (dQ, dK, dV) padded, in q's dtype. segment_ids: None, or
    (q_ids [B, Tp], kv_ids [B, Sp]) int32 padded as for `mosaic_fwd.forward`."""
    Tp, Sp, D = q.shape[1], k.shape[1], q.shape[3]
    if D not in (64, 128, 256):
        raise ValueError(f"the Hopper backward covers head dim 64, 128 or 256, got {D=}")
    if (D == 256) != config.split_head_dim:
        raise ValueError(f"head dim 256 (and only it) runs the split-head-dim kernels: {D=}, "
                         f"{config.split_head_dim=}")
    if config.split_head_dim and problem.softcap > 0:
        raise ValueError(f"the split-head-dim kernels do not cover softcap: {problem.softcap=}")
    if config.dq_split and D % 128:
        raise ValueError(f"dq_split halves dQ's columns into 64-column swizzle spans: it needs D=128, got {D=}")
    if Tp % config.q_multiple or Sp % config.kv_multiple:
        raise ValueError(f"padded lengths must be tile multiples: {Tp=} % {config.q_multiple}, "
                         f"{Sp=} % {config.kv_multiple}")
    if segment_ids is not None and (segment_ids[0].shape != (q.shape[0], Tp)
                                    or segment_ids[1].shape != (q.shape[0], Sp)):
        raise ValueError(f"segment ids must be [B, Tp] and [B, Sp] for {q.shape=}, {k.shape=}, got "
                         f"{segment_ids[0].shape=}, {segment_ids[1].shape=}")
    smem = dkdv_smem_bytes(config, head_dim=D, itemsize=jnp.dtype(q.dtype).itemsize,
                           segments=segment_ids is not None)
    if smem > SMEM_LIMIT_BYTES:
        raise ValueError(f"the dK/dV kernel needs at least {smem=} bytes of shared memory, more than "
                         f"{SMEM_LIMIT_BYTES=}, for {config=} at {D=}")
    stats = jnp.stack([lse2, delta], axis=2)  # [B, H, 2, Tp]: one copy per tile brings both
    kwargs = dict(problem=problem, config=config, interpret=interpret)
    if config.split_head_dim:
        dk, dv = _dkdv_split(q, k, v, do, stats, segment_ids, **kwargs)
        return _dq_split(q, k, v, do, stats, segment_ids, **kwargs), dk, dv
    if config.deterministic:
        dk, dv = _dkdv(q, k, v, do, stats, segment_ids, **kwargs)
        return _dq(q, k, v, do, stats, segment_ids, **kwargs), dk, dv
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = _dkdv(q, k, v, do, stats, segment_ids, dq_acc, **kwargs)
    return (jax.freeze(dq_acc) * problem.sm_scale).astype(q.dtype), dk, dv
