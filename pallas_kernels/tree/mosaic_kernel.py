"""Tree attention for Hopper as a Pallas Mosaic GPU kernel (TMA producer, two wgmma consumers).

The pipeline of the Hopper FlashAttention forward (`common.mosaic_pipeline`), laid out for
verification: a CTA serves one KV head of one batch row, and its two consumer warpgroups take two
query heads of that KV head (64 tree nodes each), so every K/V tile streamed into shared memory is
used by 2 x 64 query rows. The prefix is split across CTAs (Flash-Decoding) when batch x KV heads
cannot fill the GPU, every split taking the same number of tiles to one (`split_steps`); the partial
results merge by their logsumexp in one small second kernel (`merge_splits`).

Keys of row b: the committed prefix [0, L) and the tree nodes [L, L + N), L = cache_lengths[b]. The
kernel walks aligned tiles over [0, m * bkv) and one final tile that ends exactly at L + N, so
nothing past the tree is read unless the whole sequence is shorter than one tile. The final tile is
cut into chunks of 64 keys (`final_chunk`) that the first splits run before their aligned tiles
(`tile_plan`). Keys a chunk shares with the aligned tiles are masked out, and keys past L are
visible only through the node's ancestor bits (the packed tree mask). TMA copies into swizzled
tiles start on multiples of 8 rows, so the final tile may reach up to 7 slots past the tree (to slot
block_kv - 1 when L + N is shorter than a tile). Those keys are masked (a select: NaN scores there
become -inf), but V there enters the P V wgmma with P = 0, and 0 * NaN = NaN would poison every
row. So the final tile's values are not read from the cache: the wrapper gathers them per row into
a small [B, block_kv, K, D] copy with the slots past L + N zeroed (`final_values`, one XLA fusion of
block_kv / S of V), and the producer streams the final tile's V chunks from it. Slots past the tree
may then hold anything, NaN included, as the portable kernel allows.

Scope (`supports`; the dispatcher sends the rest to the portable kernel): bf16/f16, head dim 64 or
128, an even number of query heads per KV head, no softcap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common.device import num_sms as device_sm_count
from pallas_kernels.common.mosaic_pipeline import CONSUMERS, Pipeline
from pallas_kernels.common.numerics import LOG2E
from pallas_kernels.tree import masking

NODE_BLOCK = 64  # query rows per consumer warpgroup (one wgmma M extent)
MIN_AUTO_NODES = 32  # the default dispatch uses this kernel from this tree size on
# The split merge (`merge_splits`): node rows and warps per program, the fastest of 4/8/16 rows and
# 1/4/8 warps at batch 1 and 8 splits on an H100 (BENCHMARKS.md).
MERGE_ROWS, MERGE_WARPS = 4, 1


@dataclasses.dataclass(frozen=True)
class MosaicTreeConfig:
    """Tile shape of the Hopper tree kernel."""

    block_kv: int = 128
    num_stages: int = 2
    ping_pong: bool = True
    reduction_scratch_bytes: int = 2048  # see Pipeline.reduction_scratch_bytes
    merge_rows: int = MERGE_ROWS
    merge_warps: int = MERGE_WARPS

    @classmethod
    def for_splits(cls, num_splits: int) -> "MosaicTreeConfig":
        """Three K/V stages when the prefix is split. A split grid is one short wave whose CTAs run
        about nine steps; there three stages were at least as fast as two on an H100 (batch 1, 8
        splits), while a long unsplit loop did better with two (batch 8; BENCHMARKS.md). Three
        128-key stages fill shared memory only without Mosaic's reduction scratch, which this
        kernel never uses.
        """
        return cls(num_stages=3, reduction_scratch_bytes=0) if num_splits > 1 else cls()


def supports(*, dtype, head_dim: int, group_size: int, softcap: float) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim in (64, 128) and group_size % 2 == 0 and softcap == 0)


def runs_in_place(cache_size: int, block_kv: int = 128) -> bool:
    """Whether the caches go to the kernel as they are: otherwise they are copied with padding."""
    return cache_size % 8 == 0 and cache_size >= block_kv


def num_splits_for(*, batch: int, num_kv_heads: int, group_size: int, num_nodes: int, cache_size: int,
                   block_kv: int, num_sms: int | None = None) -> int:
    """Prefix splits so that about one wave of CTAs covers the GPU (never more splits than tiles).

    num_sms: the GPU's SM count, None = the default device's (`common.device.num_sms`).
    """
    num_sms = num_sms or device_sm_count()
    ctas = batch * num_kv_heads * (group_size // 2) * -(-num_nodes // NODE_BLOCK)
    return int(max(1, min(num_sms // max(ctas, 1), cache_size // block_kv)))


def split_steps(num_steps, split, splits: int):
    """(first step, step count) of prefix split `split` when `num_steps` >= 0 steps are cut into
    `splits` (int32 scalars; the tests vmap it).

    Contiguous shares in split order whose counts differ by at most one, so the slowest split does
    ceil(num_steps / splits) steps, the fewest possible; the longer shares go to the last splits.
    """
    base = lax.div(num_steps, jnp.int32(splits))
    short = splits - lax.rem(num_steps, jnp.int32(splits))  # splits [0, short) take `base` steps
    longer = (split >= short).astype(jnp.int32)
    return split * base + jnp.maximum(split - short, 0), base + longer


def final_chunk(splits: int, block_kv: int) -> int:
    """Keys of the final tile that each split takes: a multiple of 64, the K extent of the P V wgmma
    (one 128-byte swizzle span of 16-bit values).

    The final tile holds the tree, so it is the one step whose scores need the packed mask, which
    takes about as long again as the step's matrix products. Run whole by the last split, it was
    the critical path's extra step (the other splits did one step fewer), and its slowest step.
    Cut in chunks, it adds half a step to the first splits, which hold the shorter shares of the
    aligned tiles, and they run it first, while the other splits still wait for their first tiles,
    which made the batch-1 kernel faster on an H100 (BENCHMARKS.md).
    """
    return min(block_kv, (-(-block_kv // splits) + 63) // 64 * 64)


class TilePlan(NamedTuple):
    """The key tiles one prefix split visits (int32 scalars; see `tile_plan`)."""

    aligned: jax.Array  # aligned tiles of the row: [0, aligned * block_kv)
    first: jax.Array  # this split's first aligned tile
    num_aligned: jax.Array  # its aligned tiles: [first, first + num_aligned)
    steps: jax.Array  # num_aligned, plus 1 when the split has a chunk of the final tile
    chunk_start_8: jax.Array  # the first key of its chunk of the final tile / 8
    chunk_owned_from: jax.Array  # keys of the chunk below this one are another step's


def tile_plan(end, split, splits: int, block_kv: int) -> TilePlan:
    """The tiles of prefix split `split` for a row whose keys are [0, end), end >= 1.

    Aligned tiles cover [0, aligned * block_kv), the keys below the final tile, which ends at `end`.
    The final tile starts at ceil8(end - block_kv) (clamped to 0; the start of a TMA copy into the
    swizzled tiles must be a multiple of 8 rows), which is <= aligned * block_kv, so no key is
    skipped, and it may reach up to 7 slots past `end`. Split p takes keys [p c, (p + 1) c) of it,
    c = `final_chunk` (a last chunk that would overhang is moved back to end with the tile and owns
    only the keys past the previous chunk; splits from block_kv / c on take none); keys below
    aligned * block_kv are the aligned tiles'.
    """
    aligned = lax.div(end - 1, jnp.int32(block_kv))
    first, num_aligned = split_steps(aligned, split, splits)
    final_start = final_tile_start(end, block_kv)
    chunk = final_chunk(splits, block_kv)
    has_chunk = (chunk * split < block_kv).astype(jnp.int32)
    chunk_start = final_start + jnp.minimum(chunk * split, block_kv - chunk)
    owned_from = jnp.maximum(aligned * block_kv, final_start + chunk * split)
    return TilePlan(aligned, first, num_aligned, num_aligned + has_chunk, lax.div(chunk_start, 8), owned_from)


def node_words(tree_mask) -> jax.Array | np.ndarray:
    """The tree mask as the kernel reads it: int32 [B|1, W, Np], word w of every node-padded row.

    Call it outside any jit of the kernel: a NumPy mask then packs at trace time (a constant), a
    traced one in one small XLA fusion.
    """
    xp = np if isinstance(tree_mask, np.ndarray) else jnp
    if tree_mask.ndim == 2:
        tree_mask = tree_mask[None]
    num_nodes = tree_mask.shape[-1]
    padded = -(-num_nodes // NODE_BLOCK) * NODE_BLOCK
    tree_mask = xp.pad(tree_mask, ((0, 0), (0, padded - num_nodes), (0, 0)))
    return xp.swapaxes(masking.pack_tree_mask(tree_mask), 1, 2)


def final_tile_start(end, block_kv: int):
    """First key of the final tile of a row whose keys are [0, end): ceil8(end - block_kv), >= 0
    (TMA copies into the swizzled tiles start on multiples of 8 rows; see `tile_plan`)."""
    return 8 * jnp.maximum(lax.div(end - block_kv + 7, jnp.int32(8)), 0)


def final_values(v_cache, ends, block_kv: int):
    """[B, block_kv, K, D]: V of each row's final tile [final_tile_start, + block_kv), zero at the
    slots from `ends[b]` on, which may hold NaN. v_cache [B, S', K, D] with S' >= the tile's end."""
    starts = final_tile_start(ends, block_kv)  # [B]
    tiles = jax.vmap(lambda v, start: lax.dynamic_slice_in_dim(v, start, block_kv, axis=0))(v_cache, starts)
    keep = starts[:, None] + jnp.arange(block_kv, dtype=jnp.int32)[None, :] < ends[:, None]  # [B, block_kv]
    return jnp.where(keep[:, :, None, None], tiles, jnp.zeros((), tiles.dtype))


def tree_attention_mosaic(q, k_cache, v_cache, cache_lengths, words, *, sm_scale: float,
                          num_splits: int, config: MosaicTreeConfig = MosaicTreeConfig(),
                          interpret: bool = False):
    """(out [B, N, H, D], lse [B, H, N]) as `tree_attention` returns them, from the mask's
    `node_words`. Arguments assumed valid."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module, imported on use

    B, N, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = H // K
    bkv, splits = config.block_kv, num_splits
    Np = -(-N // NODE_BLOCK) * NODE_BLOCK
    node_blocks, pairs = Np // NODE_BLOCK, G // CONSUMERS
    pipeline = Pipeline(rows=NODE_BLOCK, block_kv=bkv, head_dim=D, stages=config.num_stages,
                        dtype=q.dtype, scale=sm_scale * LOG2E, ping_pong=config.ping_pong,
                        interpret=interpret, reduction_scratch_bytes=config.reduction_scratch_bytes)
    chunk = final_chunk(splits, bkv)
    chunk_pipeline = dataclasses.replace(pipeline, block_kv=chunk)
    if Np != N:
        q = jnp.pad(q, ((0, 0), (0, Np - N), (0, 0), (0, 0)))
    padded_size = max(bkv, -(-S // 8) * 8)  # TMA into 8-row tiles wants S % 8 == 0 (see supports)
    if padded_size != S:
        pad = ((0, 0), (0, padded_size - S), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    num_words, mask_batched = words.shape[1], words.shape[0] > 1
    lengths = cache_lengths.astype(jnp.int32)  # clamped to [0, S - N] in the kernel
    # The final tile's values with the slots past the tree zeroed (see the module docstring).
    v_final = final_values(v_cache, jnp.clip(lengths, 0, S - N) + N, bkv)  # [B, bkv, K, D]

    def body(lengths_ref, words_ref, q_ref, k_ref, v_ref, v_final_ref, out_ref, lse_ref):
        def per_warpgroup(smem, barriers):
            wg = lax.axis_index("wg")
            row_block, split = lax.axis_index("rows"), lax.axis_index("split")
            kv_head, b = lax.axis_index("kv_head"), lax.axis_index("batch")
            n0 = lax.div(row_block, jnp.int32(pairs)) * NODE_BLOCK
            pair = lax.rem(row_block, jnp.int32(pairs))

            def schedule():
                """This CTA's steps: the chunk of the final tile (if any) first, so that its masking
                overlaps the first loads of the other splits, then the aligned tiles, unmasked ones
                first. Called where needed: it waits for the row's length, and the consumers
                first send their queries' copy on its way."""
                prefix = jnp.clip(lengths_ref[b], 0, S - N)
                plan = tile_plan(prefix + N, split, splits, bkv)
                chunks = plan.steps - plan.num_aligned  # 0 or 1

                def aligned_start(i):  # written as 8 * (...) so that the compiler sees the alignment
                    return 8 * ((plan.first + i - chunks) * (bkv // 8))

                return prefix, plan, chunks, aligned_start, 8 * plan.chunk_start_8

            @pl.when(wg == CONSUMERS)
            def _producer():
                _, plan, chunks, aligned_start, chunk_start = schedule()
                # The chunk's offset in the final tile, as tile_plan places it (a multiple of 64).
                chunk_offset = 8 * jnp.minimum((chunk // 8) * split, (bkv - chunk) // 8)
                pipeline.produce_segments(
                    smem, barriers, k_ref, v_ref,
                    [(0, chunks, lambda i: (b, pl.ds(chunk_start, chunk), kv_head), chunk,
                      lambda i: v_final_ref.at[b, pl.ds(chunk_offset, chunk), kv_head]),
                     (chunks, plan.steps, lambda i: (b, pl.ds(aligned_start(i), bkv), kv_head), bkv)])

            @pl.when(wg < CONSUMERS)
            def _consumer():
                head = kv_head * G + pair * CONSUMERS + wg
                my_q = pipeline.start_queries(wg, smem, barriers, q_ref.at[b, pl.ds(n0, NODE_BLOCK), head])
                word_batch = b if mask_batched else 0
                # The mask words and the row's length load while the queries are in flight.
                if interpret:
                    row_words = [words_ref[word_batch, w, pl.ds(n0, NODE_BLOCK)] for w in range(num_words)]
                else:  # a plain (unoptimised) load: 64 words per warpgroup, once per CTA
                    row_words = [plgpu.load(words_ref.at[word_batch, w], pl.ds(n0, NODE_BLOCK),
                                            layout=pipeline.row_layout(), optimized=False)
                                 for w in range(num_words)]
                prefix, plan, chunks, aligned_start, chunk_start = schedule()
                num_unmasked = jnp.clip(lax.div(prefix, jnp.int32(bkv)) - plan.first, 0, plan.num_aligned)
                pipeline.wait_queries(wg, barriers)

                def visible(stepper, start, owned_from=None):
                    # d = key - prefix: prefix keys (d < 0) in, tree keys (0 <= d < N) through the
                    # node's ancestor bit, and in the final tile's chunk the keys below owned_from
                    # (another step's) out. Few operations per score: every masked step pays them.
                    d = stepper.iota(1) + (start - prefix)
                    if len(row_words) == 1:
                        word = lax.broadcast_in_dim(row_words[0], d.shape, [0])
                    else:
                        word = lax.broadcast_in_dim(row_words[-1], d.shape, [0])
                        for w in range(len(row_words) - 2, -1, -1):
                            word = jnp.where(d < 32 * (w + 1),
                                             lax.broadcast_in_dim(row_words[w], d.shape, [0]), word)
                    ancestor = ((word >> (d & 31)) & 1) == 1
                    seen = (d < 0) | ((d < N) & ancestor)
                    return seen if owned_from is None else seen & (d >= owned_from - prefix)

                # Masked: the final tile's chunk, and aligned tiles that reach past the prefix (when
                # the tree starts mid-tile). Unmasked: the aligned tiles wholly inside the prefix.
                unmasked_end = chunks + num_unmasked
                carry = pipeline.consume(wg, my_q, smem, barriers, [
                    (0, chunks, lambda i: visible(chunk_pipeline, chunk_start, plan.chunk_owned_from),
                     chunk_pipeline),
                    (chunks, unmasked_end, None),
                    (unmasked_end, plan.steps, lambda i: visible(pipeline, aligned_start(i)))])
                rows = pl.ds(n0, NODE_BLOCK)
                if splits == 1:
                    out_dst, lse_dst = out_ref.at[b, rows, head], lse_ref.at[b, head, rows]
                else:  # head-major like lse, so that the merge is elementwise (see below)
                    out_dst, lse_dst = out_ref.at[b, split, head, rows], lse_ref.at[b, split, head, rows]
                pipeline.store(wg, my_q, smem, carry, out_dst, lse_dst)

        pipeline.run(per_warpgroup, (q_ref, k_ref, v_ref))

    if splits == 1:
        out_type = (jax.ShapeDtypeStruct((B, Np, H, D), q.dtype), jax.ShapeDtypeStruct((B, H, Np), jnp.float32))
    else:
        out_type = (jax.ShapeDtypeStruct((B, splits, H, Np, D), q.dtype),
                    jax.ShapeDtypeStruct((B, splits, H, Np), jnp.float32))
    out, lse = plgpu.kernel(
        body,
        out_type=out_type,
        # "rows" last: the CTAs of one KV head's query-head pairs are adjacent in launch order, so
        # they stream the same K/V tiles at about the same time and the second read hits L2 (3.5%
        # faster at batch 8 on an H100 than with "rows" first).
        grid=(splits, K, B, pairs * node_blocks),
        grid_names=("split", "kv_head", "batch", "rows"),
        **pipeline.kernel_options(),
    )(lengths, words, q, k_cache, v_cache, v_final)
    if splits > 1:
        out, lse = merge_splits(out, lse, interpret=interpret, rows=config.merge_rows,
                                num_warps=config.merge_warps)
    return out[:, :N], lse[:, :, :N]


def _merge_kernel(parts_ref, lse_ref, out_ref, merged_lse_ref):
    """Merges the splits of R node rows of one head by their logsumexp.

    parts_ref [P, R, D] (each split's o / l), lse_ref [P, R] (-inf: the split saw no key of the row,
    and its part is zeros); out_ref [R, D], merged_lse_ref [R]. The loops over the splits are
    unrolled, so that all the loads are in flight at once (a loop waited for each in turn, which
    was slower on an H100; BENCHMARKS.md).
    """
    num_splits = parts_ref.shape[0]
    lse = [lse_ref[p] for p in range(num_splits)]
    top = functools.reduce(jnp.maximum, lse)
    top = jnp.where(top == -jnp.inf, 0.0, top)  # a row no split saw: every weight below is 0
    weights = [jnp.exp(part_lse - top) for part_lse in lse]  # [R] each
    acc = sum(weight[:, None] * parts_ref[p].astype(jnp.float32) for p, weight in enumerate(weights))
    total = sum(weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    out_ref[...] = (acc / safe_total[:, None]).astype(out_ref.dtype)
    merged_lse_ref[...] = jnp.where(total > 0, top + jnp.log(safe_total), -jnp.inf)


def merge_splits(parts, lse, *, interpret: bool, rows: int = MERGE_ROWS, num_warps: int = MERGE_WARPS):
    """(out [B, Np, H, D] in parts' dtype, lse [B, H, Np]) from the splits' parts [B, P, H, Np, D] and
    lse [B, P, H, Np]: the whole merge in one launch.

    One launch instead of the two fusions XLA made of the same math (a transpose fusion and a select
    fusion, and the launch gap between them; BENCHMARKS.md). Not inside the attention kernel: that needs
    its CTAs to synchronise, through global atomics or semaphores ("the last split merges") or a
    cluster barrier with distributed shared memory, and Mosaic GPU's simulator (JAX 0.10 to 0.11)
    runs none of those, so such a kernel could only be tested on a GPU. The merge is elementwise
    with a loop over the splits, which Pallas' Triton backend compiles as it compiles the portable
    kernel (and Pallas' interpreter runs on CPU).
    """
    B, P, H, Np, D = parts.shape
    return pl.pallas_call(
        _merge_kernel,
        grid=(Np // rows, H, B),
        in_specs=[pl.BlockSpec((None, P, None, rows, D), lambda r, h, b: (b, 0, h, r, 0)),
                  pl.BlockSpec((None, P, None, rows), lambda r, h, b: (b, 0, h, r))],
        out_specs=[pl.BlockSpec((None, rows, None, D), lambda r, h, b: (b, r, h, 0)),
                   pl.BlockSpec((None, None, rows), lambda r, h, b: (b, h, r))],
        out_shape=[jax.ShapeDtypeStruct((B, Np, H, D), parts.dtype),
                   jax.ShapeDtypeStruct((B, H, Np), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="tree_attention_merge",
    )(parts, lse)
