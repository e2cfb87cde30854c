"""FlashAttention forward for Hopper as a Pallas Mosaic GPU kernel (wgmma + TMA, warp-specialised).

The portable kernel (`triton_fwd`) leaves the H100's tensor cores idle while it computes the softmax.
Here each CTA runs the pipeline of `mosaic_pipeline`: one warpgroup streams K/V tiles with TMA, two
(three by default at head dim 64) consumer warpgroups (`block_q` query rows each) run wgmma and the
online softmax, taking turns on the tensor cores. This module decides the tiles: a CTA covers
consumers * block_q rows and visits the key tiles of their causal/window band, masking only the
tiles at the band's edges.

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
`MosaicFwdConfig` also holds opt-in scheduling variants (issue 17): early K waits, where the row sums
are added, and a persistent grid of one CTA per SM looping over (query tile, head, batch) work items
in the same longest-first order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.device import num_sms
from pallas_kernels.common.mosaic_pipeline import CONSUMERS, REGISTERS, ROW_SUM_ORDERS, Pipeline
from pallas_kernels.common.numerics import LOG2E


@dataclasses.dataclass(frozen=True)
class MosaicFwdConfig:
    """Tile shapes of the Hopper kernel: a CTA covers consumers * block_q query rows.

    The fields after ping_pong are scheduling variants (issue 17), off by default; each computes the
    same result and `benchmarks/mosaic_sweep.py` times them against the default.
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    ping_pong: bool = True
    # Wait for the next step's K while the P V wgmma is in flight (`Pipeline.early_k_wait`).
    early_k_wait: bool = False
    # Where row_sum is accumulated: "plain", "fenced" or "during_pv" (`Pipeline.row_sum_order`).
    row_sum_order: str = "plain"
    # One CTA per SM (or num_ctas), each looping over (query tile, head, batch) work items: the
    # producer streams K/V from one item into the next without draining the ring, and a consumer loads
    # its next queries while it stores this item's O (from a shared-memory slot of its own).
    persistent: bool = False
    num_ctas: int = 0  # persistent only: CTAs launched; 0 = the default device's SM count
    # Persistent only: CTA c takes item c of every even wave of num_ctas items and item
    # num_ctas-1-c of every odd one, instead of item c of each. Items come longest first under a
    # causal band, so the plain order hands the low CTAs the longer item of every wave (at
    # 2x8192x16x128 on 132 CTAs: 13% more key tiles for CTA 0 than CTA 131, the busiest 6% above
    # the mean); the serpentine order evens that out (0.2%).
    serpentine: bool = False
    # Consumer warpgroups per CTA, 2 or 3 (FA3's hdim-64 forward: 3 x 64 rows, 160 registers each).
    consumers: int = CONSUMERS

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64:
            raise ValueError(f"Mosaic GPU tiles must be multiples of 64 rows: {self}")
        if self.num_stages < 2:
            raise ValueError(f"the K/V ring needs at least 2 slots: {self.num_stages=}")
        for name in ("ping_pong", "early_k_wait", "persistent", "serpentine"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool: {self}")
        if self.row_sum_order not in ROW_SUM_ORDERS:
            raise ValueError(f"row_sum_order must be one of {ROW_SUM_ORDERS}: {self.row_sum_order=}")
        if not isinstance(self.num_ctas, int) or self.num_ctas < 0:
            raise ValueError(f"num_ctas must be an int >= 0: {self.num_ctas=}")
        if self.num_ctas and not self.persistent:
            raise ValueError(f"num_ctas sizes a persistent grid only: {self.num_ctas=}, {self.persistent=}")
        if self.serpentine and not self.persistent:
            raise ValueError(f"serpentine orders a persistent grid's items only: {self.serpentine=}, {self.persistent=}")
        if (not isinstance(self.consumers, int) or isinstance(self.consumers, bool)
                or self.consumers not in REGISTERS):
            raise ValueError(f"consumers must be one of {tuple(REGISTERS)}: {self.consumers=}")

    @property
    def cta_rows(self) -> int:
        """Query rows per CTA (192 with 3 consumers of 64: padded lengths are multiples of it)."""
        return self.consumers * self.block_q

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "MosaicFwdConfig":
        """The default tiles for a head dim. At D=64 three consumers (192-row CTAs): each step's
        matmuls are short, and a third warpgroup keeps the tensor cores busy while the other two do
        their softmax; on a persistent grid with the early K wait, which hides the next item's
        first loads and K's wait (faster on an H100, causal or not: BENCHMARKS.md, session 19).
        At D=256 the f32 accumulator takes 128 registers per thread, so the score tile shrinks to
        64 keys to stay inside the consumers' 232. (At D=128 the persistent grid wins without a
        causal band and loses with one: the shipped tuning cache holds that per feature set.)"""
        if head_dim <= 64:
            return cls(consumers=3, persistent=True, early_k_wait=True)
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


def cta_first_row(problem: MosaicProblem, padded_q_len: int, cta_rows: int, rank=None):
    """The first query row of the rank-th query tile to launch (rank: grid axis "q_tiles" unless
    given). Rows that see the most keys go first: under a causal band those are the last rows, and
    starting them early keeps the grid's tail short."""
    tile = lax.axis_index("q_tiles") if rank is None else rank
    if problem.window_right >= 0:
        tile = (padded_q_len // cta_rows - 1) - tile
    return tile * cta_rows


def visible_pairs(q_idx, k_idx, problem: MosaicProblem):
    """bool tile: which (query, key) index pairs attend under the causal/window band and kv_len."""
    visible = k_idx < problem.kv_len
    if problem.window_right >= 0:
        visible &= k_idx <= q_idx + (problem.q_offset + problem.window_right)
    if problem.window_left >= 0:
        visible &= k_idx >= q_idx + (problem.q_offset - problem.window_left)
    return visible


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


def masks_keys(problem: MosaicProblem, padded_kv_len: int) -> bool:
    """Whether some key tile needs a position mask: padded keys, or a causal/window band."""
    return problem.kv_len != padded_kv_len or problem.window_left >= 0 or problem.window_right >= 0


def consumer_loops(bounds, masked: bool, allowed):
    """A consumer's (first, last, allowed) loops over the tiles [lo, hi) of `bounds` (lo, full_lo,
    full_hi, hi), steps counted from lo: masked band edges around the unmasked interior, or (masked
    False, where full_lo == lo and full_hi == hi) the interior alone. Their steps must add up to the
    producer's hi - lo, or a barrier waits forever (tests/test_mosaic_forward.py checks a grid).
    With segment ids every step is masked all the same: the pipeline ANDs "same id" into each step's
    position mask (or uses it alone in the interior)."""
    lo, full_lo, full_hi, hi = bounds
    loops = [(full_lo - lo, full_hi - lo, None)]
    if masked:
        loops = [(0, full_lo - lo, allowed)] + loops + [(full_hi - lo, hi - lo, allowed)]
    return loops


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
    cta_rows = config.cta_rows
    if Tp % cta_rows or Sp % bkv:
        raise ValueError(f"padded lengths must be tile multiples: {Tp=} % {cta_rows}, {Sp=} % {bkv}")
    segments = segment_ids is not None
    if segments and (segment_ids[0].shape != (B, Tp) or segment_ids[1].shape != (B, Sp)):
        raise ValueError(f"segment ids must be [B, Tp]={(B, Tp)} and [B, Sp]={(B, Sp)}, got "
                         f"{segment_ids[0].shape=}, {segment_ids[1].shape=}")
    pipeline = Pipeline(rows=bq, block_kv=bkv, head_dim=D, stages=config.num_stages, dtype=q.dtype,
                        scale=problem.sm_scale * LOG2E, ping_pong=config.ping_pong, interpret=interpret,
                        key_ids=segments, softcap=problem.softcap, early_k_wait=config.early_k_wait,
                        row_sum_order=config.row_sum_order, out_buffer=config.persistent,
                        consumers=config.consumers)
    masked = masks_keys(problem, Sp)
    num_q_tiles = Tp // cta_rows
    num_items = num_q_tiles * H * B  # a CTA's work in the grid kernel, a work item in the persistent one
    num_ctas = min(config.num_ctas or num_sms(), num_items) if config.persistent else 0  # its grid

    def body(q_ref, k_ref, v_ref, *refs):
        if segments:
            q_ids_ref, kv_ids_ref, ranges_ref, out_ref, lse_ref = refs
        else:
            out_ref, lse_ref = refs

        def item_bounds(b, rank=None):
            """(row0, (lo, full_lo, full_hi, hi)) of the rank-th query tile of batch row b."""
            row0 = cta_first_row(problem, Tp, cta_rows, rank)
            bounds = _key_tile_ranges(row0, cta_rows, problem, bkv, Sp)
            if segments:
                bounds = clip_to_segments(ranges_ref, b, lax.div(row0, jnp.int32(cta_rows)), *bounds)
            return row0, bounds

        def kv_source(b, h, lo):
            """(kv_index, key_ids) of `Pipeline.produce` for the key tiles from lo of (b, h)."""
            kv_head = lax.div(h, jnp.int32(problem.group_size))
            key_ids = (lambda i: kv_ids_ref.at[b, pl.ds((lo + i) * bkv, bkv)]) if segments else None
            return (lambda i: (b, pl.ds((lo + i) * bkv, bkv), kv_head)), key_ids

        def consume_item(wg, smem, barriers, my_q, rows0, bounds, query_ids, step0=0, **turns):
            lo = bounds[0]

            def allowed(i):
                return visible_pairs(rows0 + pipeline.iota(0), (lo + i) * bkv + pipeline.iota(1), problem)

            loops = consumer_loops(bounds, masked, allowed)
            return pipeline.consume(wg, my_q, smem, barriers, loops, query_ids, step0, **turns)

        def per_warpgroup(smem, barriers):
            wg = lax.axis_index("wg")
            b, h = lax.axis_index("batch"), lax.axis_index("heads")
            row0, (lo, full_lo, full_hi, hi) = item_bounds(b)

            @pl.when(wg == config.consumers)
            def _producer():
                kv_index, key_ids = kv_source(b, h, lo)
                pipeline.produce(smem, barriers, k_ref, v_ref, hi - lo, kv_index, key_ids)

            @pl.when(wg < config.consumers)
            def _consumer():
                rows0 = row0 + wg * bq
                my_q = pipeline.start_queries(wg, smem, barriers, q_ref.at[b, pl.ds(rows0, bq), h])
                # The queries' segment ids load while the queries are in flight.
                query_ids = pipeline.load_row_ids(q_ids_ref.at[b], rows0) if segments else None
                pipeline.wait_queries(wg, barriers)
                carry = consume_item(wg, smem, barriers, my_q, rows0, (lo, full_lo, full_hi, hi), query_ids)
                pipeline.store(wg, my_q, smem, carry, out_ref.at[b, pl.ds(rows0, bq), h],
                               lse_ref.at[b, h, pl.ds(rows0, bq)])

        def per_warpgroup_persistent(smem, barriers):
            wg = lax.axis_index("wg")
            cta = lax.axis_index("cta")
            if config.serpentine:
                # Waves of num_ctas items; this CTA's k-th item is the cta-th of wave k, counted
                # from the far end in odd waves; only the last wave can be partial.
                waves, rest = divmod(num_items, num_ctas)
                last_pos = cta if waves % 2 == 0 else jnp.int32(num_ctas - 1) - cta
                local_items = jnp.int32(waves) + (last_pos < rest).astype(jnp.int32)

                def item_of(k):
                    return k * num_ctas + jnp.where(lax.rem(k, 2) == 0, cta, jnp.int32(num_ctas - 1) - cta)

                def has_next(k, item):
                    return k + 1 < local_items

                def next_item(k, item):
                    return item_of(k + 1)
            else:
                # This CTA's work items are cta, cta + num_ctas, ... < num_items.
                local_items = lax.div(jnp.int32(num_items - 1 + num_ctas) - cta, jnp.int32(num_ctas))

                def item_of(k):
                    return cta + k * num_ctas

                def has_next(k, item):
                    return item + num_ctas < num_items

                def next_item(k, item):
                    return item + num_ctas

            def item_at(k):
                """(item, b, h, rank) of this CTA's k-th work item."""
                item = item_of(k)
                b, h, rank = _unravel_item(item, problem, B, H, num_q_tiles)
                return item, b, h, rank

            @pl.when(wg == config.consumers)
            def _producer():
                pipeline.producer_setup()

                def stream_item(k, step0):
                    _, b, h, rank = item_at(k)
                    _, (lo, _, _, hi) = item_bounds(b, rank)
                    kv_index, key_ids = kv_source(b, h, lo)
                    pipeline.stream(smem, barriers, k_ref, v_ref, [(0, hi - lo, kv_index, bkv)], key_ids, step0)
                    return step0 + (hi - lo)

                pipeline.drain(barriers, lax.fori_loop(0, local_items, stream_item, jnp.int32(0)))

            @pl.when(wg < config.consumers)
            def _consumer():
                pipeline.consumer_setup()

                def queries(item):
                    b, h, rank = _unravel_item(item, problem, B, H, num_q_tiles)
                    rows0 = cta_first_row(problem, Tp, cta_rows, rank) + wg * bq
                    return q_ref.at[b, pl.ds(rows0, bq), h]

                my_q = pipeline.issue_queries(wg, smem, barriers, queries(cta))

                def consume_and_store(k, step0):
                    item, b, h, rank = item_at(k)
                    row0, bounds = item_bounds(b, rank)
                    rows0 = row0 + wg * bq
                    query_ids = pipeline.load_row_ids(q_ids_ref.at[b], rows0) if segments else None
                    pipeline.wait_queries(wg, barriers)
                    # With three consumers one turn circulates through all the items (`Pipeline.consume`).
                    turns = (dict(turn_in=k > 0, turn_out=has_next(k, item))
                             if pipeline.passes_turns else {})
                    carry = consume_item(wg, smem, barriers, my_q, rows0, bounds, query_ids, step0, **turns)

                    # The last score wgmma has read the Q slot: the next item's queries load while
                    # this item's O is normalised and stored.
                    @pl.when(has_next(k, item))
                    def _():
                        pipeline.issue_queries(wg, smem, barriers, queries(next_item(k, item)))

                    pipeline.store(wg, pipeline.out_slot(wg, smem), smem, carry,
                                   out_ref.at[b, pl.ds(rows0, bq), h], lse_ref.at[b, h, pl.ds(rows0, bq)],
                                   in_flight=True)
                    lo, *_, hi = bounds
                    return step0 + (hi - lo)

                lax.fori_loop(0, local_items, consume_and_store, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)

        pipeline.run(per_warpgroup_persistent if config.persistent else per_warpgroup, (q_ref, k_ref, v_ref))

    inputs = (q, k, v)
    if segments:
        q_ids, kv_ids = segment_ids
        inputs += (q_ids, kv_ids, segment_tile_ranges(q_ids, kv_ids, cta_rows, bkv))
    if config.persistent:
        grid, grid_names = (num_ctas,), ("cta",)
    else:
        grid, grid_names = (num_q_tiles, H, B), ("q_tiles", "heads", "batch")
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, Tp, H, D), q.dtype),
                  jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)),
        grid=grid,
        grid_names=grid_names,
        **pipeline.kernel_options(),
    )(*inputs)


def _unravel_item(item, problem: MosaicProblem, B: int, H: int, num_q_tiles: int):
    """(b, h, rank) of a persistent kernel's work item (rank as `cta_first_row` takes it). Items are
    handed out in order, so the order sets what runs together: with a causal band the query tile
    rank varies slowest (the tiles with the most keys first, as the grid launches them); else
    fastest, so that CTAs running at once share their head's K/V in L2."""
    if problem.window_right >= 0:
        rank, rest = lax.div(item, jnp.int32(H * B)), lax.rem(item, jnp.int32(H * B))
        return lax.rem(rest, jnp.int32(B)), lax.div(rest, jnp.int32(B)), rank
    rank, rest = lax.rem(item, jnp.int32(num_q_tiles)), lax.div(item, jnp.int32(num_q_tiles))
    return lax.div(rest, jnp.int32(H)), lax.rem(rest, jnp.int32(H)), rank
