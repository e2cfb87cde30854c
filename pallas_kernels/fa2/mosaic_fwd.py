"""FlashAttention forward for Hopper as a Pallas Mosaic GPU kernel (wgmma + TMA, warp-specialised).

The portable kernel (`triton_fwd`) leaves the H100's tensor cores idle while it computes the softmax.
Here each CTA runs the pipeline of `mosaic_pipeline`: one warpgroup streams K/V tiles with TMA, two
consumer warpgroups (`block_q` query rows each) run wgmma and the online softmax, alternating on the
tensor cores. This module decides the tiles: a CTA covers 2 * block_q rows and visits the key tiles
of their causal/window band, masking only the tiles at the band's edges.

Scope (the dispatcher in `api.py` routes everything else to the portable kernels): bf16/f16, head dim
64, 128 or 256, causal and sliding windows (bottom-right aligned), segment ids (packed sequences),
logit softcapping (Gemma 2: the pipeline caps each score tile before its mask and exp2, so the lse is
that of the capped scores), GQA/MQA, any T and S (the caller pads them to tile multiples; keys past
`kv_len` are masked here).
With segment ids every visited tile is masked: each K tile's ids travel with it through the TMA
ring, and a CTA visits only the key tiles between the first and the last whose id range overlaps its
queries' (`segment_tile_ranges`, from the ids' per-tile min and max). Under a causal band the CTAs that
own the last rows (the most keys) launch first. Outputs: O [B, Tp, H, D] in the input dtype and the
natural-log lse [B, H, Tp] (-inf for rows that see no key), the residuals both backwards consume.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.mosaic_pipeline import CONSUMERS, Pipeline
from pallas_kernels.common.numerics import LOG2E


@dataclasses.dataclass(frozen=True)
class MosaicFwdConfig:
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

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "MosaicFwdConfig":
        """The default tiles for a head dim. At D=256 the f32 accumulator takes 128 registers per
        thread, so the score tile shrinks to 64 keys to stay inside the consumers' 232."""
        return cls(block_kv=64) if head_dim > 128 else cls()


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
    softcap: float = 0.0  # > 0: scores s = sm_scale * q.k become softcap * tanh(s / softcap)


def preferred(*, head_dim: int) -> bool:
    """Where the Hopper forward beat the portable one on an H100 (BENCHMARKS.md): head dims 64 and 128."""
    return head_dim in (64, 128)


FEATURES = frozenset({"causal", "window", "segments", "softcap"})


def supports(*, dtype, head_dim: int, features: tuple[str, ...]) -> bool:
    """Whether this kernel covers a call (the rest goes to the portable kernels)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim in (64, 128, 256)
            and set(features) <= FEATURES)


def cta_first_row(problem: MosaicProblem, padded_q_len: int, cta_rows: int):
    """The first query row of this CTA (grid axis "q_tiles"). Rows that see the most keys go first:
    under a causal band those are the last rows, and starting them early keeps the grid's tail short."""
    tile = lax.axis_index("q_tiles")
    if problem.window_right >= 0:
        tile = (padded_q_len // cta_rows - 1) - tile
    return tile * cta_rows


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


def segment_tile_ranges(row_ids, col_ids, row_block: int, col_block: int):
    """int32 [B, R, 2]: for each block of `row_block` rows, [first, last + 1) of the `col_block`-wide
    column tiles whose segment id range overlaps the block's ([0, 0) when none does).

    row_ids [B, R * row_block], col_ids [B, C * col_block] int32. A tile outside [first, last + 1)
    holds no pair of equal ids, so a kernel may skip it; tiles inside are visited (and masked) even
    when their own range misses the rows', which keeps the visited tiles one contiguous range. For
    packed sequences (ids ascending along the sequence) the range is the rows' documents' keys.
    """
    B = row_ids.shape[0]
    rows = row_ids.reshape(B, -1, row_block)
    cols = col_ids.reshape(B, -1, col_block)
    row_lo, row_hi = rows.min(-1), rows.max(-1)  # [B, R]
    col_lo, col_hi = cols.min(-1), cols.max(-1)  # [B, C]
    overlap = (row_lo[:, :, None] <= col_hi[:, None, :]) & (col_lo[:, None, :] <= row_hi[:, :, None])  # [B, R, C]
    first = jnp.argmax(overlap, axis=-1)
    last = overlap.shape[-1] - jnp.argmax(overlap[..., ::-1], axis=-1)
    ranges = jnp.stack([first, last], axis=-1)
    return jnp.where(overlap.any(-1)[..., None], ranges, 0).astype(jnp.int32)


def clip_to_segments(ranges_ref, b, block, lo, full_lo, full_hi, hi):
    """Tile bounds lo <= full_lo <= full_hi <= hi (as `_key_tile_ranges` gives them) narrowed to row
    block `block`'s range in `segment_tile_ranges` [B, R, 2]: still ordered, empty if no tile overlaps."""
    lo, hi = jnp.clip(ranges_ref[b, block, 0], lo, hi), jnp.clip(ranges_ref[b, block, 1], lo, hi)
    hi = jnp.maximum(hi, lo)
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def forward(q, k, v, segment_ids=None, *, problem: MosaicProblem, config: MosaicFwdConfig,
            interpret: bool = False):
    """q [B, Tp, H, D], k/v [B, Sp, K, D] padded to tile multiples -> (O [B, Tp, H, D], lse [B, H, Tp]).

    segment_ids: None, or (q_ids [B, Tp], kv_ids [B, Sp]) int32 padded like q and k; ids of padded
    keys may equal real ones (those keys are masked by position).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module, imported on use

    B, Tp, H, D = q.shape
    Sp = k.shape[1]
    bq, bkv = config.block_q, config.block_kv
    cta_rows = CONSUMERS * bq
    if Tp % cta_rows or Sp % bkv:
        raise ValueError(f"padded lengths must be tile multiples: {Tp=} % {cta_rows}, {Sp=} % {bkv}")
    segments = segment_ids is not None
    if segments and (segment_ids[0].shape != (B, Tp) or segment_ids[1].shape != (B, Sp)):
        raise ValueError(f"segment ids must be [B, Tp]={(B, Tp)} and [B, Sp]={(B, Sp)}, got "
                         f"{segment_ids[0].shape=}, {segment_ids[1].shape=}")
    pipeline = Pipeline(rows=bq, block_kv=bkv, head_dim=D, stages=config.num_stages, dtype=q.dtype,
                        scale=problem.sm_scale * LOG2E, ping_pong=config.ping_pong, interpret=interpret,
                        key_ids=segments, softcap=problem.softcap)
    masks_keys = problem.kv_len != Sp or problem.window_left >= 0 or problem.window_right >= 0

    def body(q_ref, k_ref, v_ref, *refs):
        if segments:
            q_ids_ref, kv_ids_ref, ranges_ref, out_ref, lse_ref = refs
        else:
            out_ref, lse_ref = refs

        def per_warpgroup(smem, barriers):
            wg = lax.axis_index("wg")
            b, h = lax.axis_index("batch"), lax.axis_index("heads")
            row0 = cta_first_row(problem, Tp, cta_rows)
            lo, full_lo, full_hi, hi = _key_tile_ranges(row0, cta_rows, problem, bkv, Sp)
            if segments:
                lo, full_lo, full_hi, hi = clip_to_segments(
                    ranges_ref, b, lax.div(row0, jnp.int32(cta_rows)), lo, full_lo, full_hi, hi)

            @pl.when(wg == CONSUMERS)
            def _producer():
                kv_head = lax.div(h, jnp.int32(problem.group_size))
                key_ids = (lambda i: kv_ids_ref.at[b, pl.ds((lo + i) * bkv, bkv)]) if segments else None
                pipeline.produce(smem, barriers, k_ref, v_ref, hi - lo,
                                 lambda i: (b, pl.ds((lo + i) * bkv, bkv), kv_head), key_ids)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                rows0 = row0 + wg * bq
                my_q = pipeline.start_queries(wg, smem, barriers, q_ref.at[b, pl.ds(rows0, bq), h])
                # The queries' segment ids load while the queries are in flight.
                query_ids = pipeline.load_row_ids(q_ids_ref.at[b], rows0) if segments else None
                pipeline.wait_queries(wg, barriers)

                def allowed(i):
                    q_idx = rows0 + pipeline.iota(0)
                    k_idx = (lo + i) * bkv + pipeline.iota(1)
                    visible = k_idx < problem.kv_len
                    if problem.window_right >= 0:
                        visible &= k_idx <= q_idx + (problem.q_offset + problem.window_right)
                    if problem.window_left >= 0:
                        visible &= k_idx >= q_idx + (problem.q_offset - problem.window_left)
                    return visible

                # Steps count from tile lo: masked band edges around the unmasked interior. With
                # segment ids every step is masked all the same: the pipeline ANDs "same id" into
                # each step's position mask (or uses it alone in the interior).
                loops = [(full_lo - lo, full_hi - lo, None)]
                if masks_keys:
                    loops = [(0, full_lo - lo, allowed)] + loops + [(full_hi - lo, hi - lo, allowed)]
                carry = pipeline.consume(wg, my_q, smem, barriers, loops, query_ids)
                pipeline.store(wg, my_q, smem, carry, out_ref.at[b, pl.ds(rows0, bq), h],
                               lse_ref.at[b, h, pl.ds(rows0, bq)])

        pipeline.run(per_warpgroup, (q_ref, k_ref, v_ref))

    inputs = (q, k, v)
    if segments:
        q_ids, kv_ids = segment_ids
        inputs += (q_ids, kv_ids, segment_tile_ranges(q_ids, kv_ids, cta_rows, bkv))
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, Tp, H, D), q.dtype),
                  jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)),
        grid=(Tp // cta_rows, H, B),
        grid_names=("q_tiles", "heads", "batch"),
        **pipeline.kernel_options(),
    )(*inputs)
