"""Tree attention for Hopper as a Pallas Mosaic GPU kernel (TMA producer, two wgmma consumers).

The same pipeline as the Hopper FlashAttention forward (`flash_attention.mosaic_fwd`), laid out for
verification: a CTA serves one KV head of one batch row, and its two consumer warpgroups take two
query heads of that KV head (64 tree nodes each), so every K/V tile streamed into shared memory is
used by 2 x 64 query rows. The prefix is split across CTAs (Flash-Decoding) when batch x KV heads
cannot fill the GPU; the partial results merge by their logsumexp in one XLA fusion.

Keys of row b: the committed prefix [0, L) and the tree nodes [L, L + N), L = cache_lengths[b]. The
kernel walks aligned tiles over [0, m * bkv) and then one final tile that ends exactly at L + N, so
nothing past the tree is read unless the whole sequence is shorter than one tile. Keys the final
tile shares with the aligned ones are masked out, and keys past L are visible only through the
node's ancestor bits (the packed tree mask). TMA copies into swizzled tiles start on multiples of 8
rows, so the final tile may reach up to 7 slots past the tree (to slot block_kv - 1 when L + N is
shorter than a tile). Those keys are masked, but V there enters the P V product with P = 0: the
slots must hold finite values (fa2jax's KVCache starts zeroed), where the portable kernel also
tolerates NaN.

Scope (`supports`; the dispatcher sends the rest to the portable kernel): bf16/f16, head dim 64 or
128, an even number of query heads per KV head, no softcap.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.tree_attention import masking

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NODE_BLOCK = 64  # query rows per consumer warpgroup (one wgmma M extent)
MIN_AUTO_NODES = 32  # the default dispatch uses this kernel from this tree size on
_TILE_COLUMNS = 64
_SWIZZLE_BYTES = 128


@dataclasses.dataclass(frozen=True)
class MosaicTreeConfig:
    """Tile shape of the Hopper tree kernel."""

    block_kv: int = 128
    num_stages: int = 2
    ping_pong: bool = True


def supports(*, dtype, head_dim: int, group_size: int, softcap: float) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim in (64, 128) and group_size % 2 == 0 and softcap == 0)


def runs_in_place(cache_size: int, block_kv: int = 128) -> bool:
    """Whether the caches go to the kernel as they are: otherwise they are copied with padding."""
    return cache_size % 8 == 0 and cache_size >= block_kv


def num_splits_for(*, batch: int, num_kv_heads: int, group_size: int, num_nodes: int, cache_size: int,
                   block_kv: int, num_sms: int = 132) -> int:
    """Prefix splits so that about one wave of CTAs covers the GPU (never more splits than tiles)."""
    ctas = batch * num_kv_heads * (group_size // 2) * -(-num_nodes // NODE_BLOCK)
    return int(max(1, min(num_sms // max(ctas, 1), cache_size // block_kv)))


def tree_attention_mosaic(q, k_cache, v_cache, cache_lengths, tree_mask, *, sm_scale: float,
                          num_splits: int, config: MosaicTreeConfig = MosaicTreeConfig(),
                          interpret: bool = False):
    """(out [B, N, H, D], lse [B, H, N]) as `tree_attention` returns them. Arguments assumed valid."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module, imported on use

    B, N, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = H // K
    bkv, stages, splits = config.block_kv, config.num_stages, num_splits
    Np = -(-N // NODE_BLOCK) * NODE_BLOCK
    node_blocks, pairs = Np // NODE_BLOCK, G // 2
    dtype = q.dtype
    scale = sm_scale * LOG2E
    if Np != N:
        q = jnp.pad(q, ((0, 0), (0, Np - N), (0, 0), (0, 0)))
    padded_size = max(bkv, -(-S // 8) * 8)  # TMA into 8-row tiles wants S % 8 == 0 (see supports)
    if padded_size != S:
        pad = ((0, 0), (0, padded_size - S), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    tree_mask = jnp.asarray(tree_mask)
    if tree_mask.ndim == 2:
        tree_mask = tree_mask[None]
    # Node-padded, then packed and laid out word-major: [B|1, W, Np] (one small XLA fusion, and
    # folded into a constant when the mask is).
    tree_mask = jnp.pad(tree_mask, ((0, 0), (0, Np - N), (0, 0)))
    words = jnp.swapaxes(masking.pack_tree_mask(tree_mask), 1, 2)
    num_words, mask_batched = words.shape[1], words.shape[0] > 1
    lengths = cache_lengths.astype(jnp.int32)  # clamped to [0, S - N] in the kernel

    in_layout = (lambda x, layout: x) if interpret else plgpu.layout_cast

    def iota(dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (NODE_BLOCK, bkv), dim)
        return plgpu.broadcasted_iota(jnp.int32, (NODE_BLOCK, bkv), dim, layout=plgpu.Layout.WGMMA)

    def schedule_of(prefix, split):
        """This CTA's tiles: aligned [a0, a1) (unmasked below u), then the final tile on the last split."""
        end = prefix + N
        aligned = lax.div(jnp.maximum(end - 1, 0), jnp.int32(bkv))
        share = lax.div(aligned + (splits - 1), jnp.int32(splits))
        a0 = jnp.minimum(split * share, aligned)
        a1 = jnp.minimum(a0 + share, aligned)
        unmasked_end = jnp.clip(lax.div(prefix, jnp.int32(bkv)), a0, a1)
        has_final = (split == splits - 1).astype(jnp.int32)
        # In units of 8 rows: a TMA copy into the swizzled tiles must start on a multiple of 8, so the
        # final tile starts at ceil8(end - bkv) (<= aligned * bkv, so no key is skipped) and may reach
        # up to 7 slots past the tree.
        final_start_8 = jnp.maximum(lax.div(end - bkv + 7, jnp.int32(8)), 0)
        return prefix, end, aligned, a0, a1, unmasked_end, has_final, final_start_8

    def body(lengths_ref, words_ref, q_ref, k_ref, v_ref, out_ref, lse_ref):
        transforms = (plgpu.TilingTransform((8, _TILE_COLUMNS)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))
        smem_shapes = (
            plgpu.SMEM((2, NODE_BLOCK, D), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=transforms),
            plgpu.SMEM((2, NODE_BLOCK), jnp.float32),
        )
        barrier_shapes = (
            plgpu.Barrier(num_barriers=stages),  # k_ready
            plgpu.Barrier(num_barriers=stages),  # v_ready
            plgpu.Barrier(num_barriers=2),  # q_ready
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k_free
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # v_free
            plgpu.Barrier(num_arrivals=2),  # schedule (ping-pong)
        )

        def scoped(smem, *barriers):
            q_smem, k_smem, v_smem, lse_smem = smem
            k_ready, v_ready, q_ready, k_free, v_free, schedule = barriers
            wg = lax.axis_index("wg")
            row_block, split = lax.axis_index("rows"), lax.axis_index("split")
            kv_head, b = lax.axis_index("kv_head"), lax.axis_index("batch")
            node_block = lax.div(row_block, jnp.int32(pairs))
            pair = lax.rem(row_block, jnp.int32(pairs))
            n0 = node_block * NODE_BLOCK
            prefix, end, aligned, a0, a1, unmasked_end, has_final, final_start_8 = schedule_of(
                jnp.clip(lengths_ref[b], 0, S - N), split)
            num_aligned = a1 - a0
            steps = num_aligned + has_final

            def tile_start(i):  # written as 8 * (...) so that the compiler sees the alignment
                return 8 * jnp.where(i < num_aligned, (a0 + i) * (bkv // 8), final_start_8)

            @pl.when(wg == 2)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")

                @pl.loop(0, steps)
                def _(i):
                    slot = lax.rem(i, jnp.int32(stages))
                    keys = (b, pl.ds(tile_start(i), bkv), kv_head)

                    @pl.when(i >= stages)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])

                    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])

                    @pl.when(i >= stages)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])

                    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

                for slot in range(stages):  # observe every slot's last release (see mosaic_fwd)
                    @pl.when(steps > slot)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])
                        plgpu.barrier_wait(v_free.at[slot])

            @pl.when(wg < 2)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                head = kv_head * G + pair * 2 + wg
                my_q = q_smem.at[wg]
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(n0, NODE_BLOCK), head], my_q, q_ready.at[wg])
                row_layout = plgpu.Layout.WGMMA.reduce(1)
                word_batch = b if mask_batched else 0
                if interpret:
                    row_words = [words_ref[word_batch, w, pl.ds(n0, NODE_BLOCK)] for w in range(num_words)]
                else:
                    # A plain (unoptimised) load: 64 words per warpgroup, once per CTA.
                    row_words = [plgpu.load(words_ref.at[word_batch, w], pl.ds(n0, NODE_BLOCK),
                                            layout=row_layout, optimized=False) for w in range(num_words)]
                plgpu.barrier_wait(q_ready.at[wg])

                def sync_schedule():
                    if config.ping_pong:
                        plgpu.barrier_arrive(schedule)
                        plgpu.barrier_wait(schedule)

                def step(i, carry, masked: bool):
                    acc, row_max, row_sum = carry
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_wait(k_ready.at[slot])
                    if interpret:  # the simulator has no wgmma with a transposed operand
                        s = lax.dot_general(my_q[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)
                        sync_schedule()
                    else:
                        def scores_of(s_ref):
                            plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                            sync_schedule()
                            return s_ref[...]
                        s = pl.run_scoped(scores_of, plgpu.ACC((NODE_BLOCK, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    if masked:
                        key = tile_start(i) + iota(1)
                        seen_before = jnp.where(i < num_aligned, 0, aligned * bkv)
                        node = jnp.clip(key - prefix, 0, N - 1)
                        word_index, shift = node >> 5, node & 31
                        bits = jnp.zeros_like(node)
                        for w, row_word in enumerate(row_words):
                            word = lax.broadcast_in_dim(row_word, node.shape, [0])
                            bits = jnp.where(word_index == w, word, bits)
                        ancestor = ((bits >> shift) & 1) == 1
                        allowed = (key >= seen_before) & ((key < prefix) | ((key < end) & ancestor))
                        s = jnp.where(allowed, s, -jnp.inf)
                    new_max = jnp.maximum(row_max, s.max(axis=1) * scale)
                    shift_by = jnp.where(new_max == -jnp.inf, 0.0, new_max) if masked else new_max
                    rescale = jnp.exp2(row_max - shift_by)
                    p = jnp.exp2(s * scale - lax.broadcast_in_dim(shift_by, s.shape, [0]))
                    row_sum = row_sum * rescale + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
                    p = p.astype(dtype)
                    if config.ping_pong:
                        plgpu.barrier_arrive(schedule)
                    plgpu.barrier_wait(v_ready.at[slot])
                    if config.ping_pong:
                        plgpu.barrier_wait(schedule)
                    if interpret:
                        acc = acc + jnp.dot(p, v_smem.at[slot][...], preferred_element_type=jnp.float32)
                    else:
                        def accumulate(acc_ref):
                            plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                        acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, new_max, row_sum

                carry = (
                    in_layout(jnp.zeros((NODE_BLOCK, D), jnp.float32), plgpu.Layout.WGMMA),
                    in_layout(jnp.full((NODE_BLOCK,), -jnp.inf, jnp.float32), row_layout),
                    in_layout(jnp.zeros((NODE_BLOCK,), jnp.float32), row_layout),
                )
                if config.ping_pong:
                    pl.when(wg == 1)(sync_schedule)
                carry = lax.fori_loop(0, unmasked_end - a0, lambda i, c: step(i, c, False), carry)
                carry = lax.fori_loop(unmasked_end - a0, steps, lambda i, c: step(i, c, True), carry)
                if config.ping_pong:
                    pl.when(wg == 0)(sync_schedule)
                acc, row_max, row_sum = carry
                seen = row_sum > 0
                safe_sum = jnp.where(seen, row_sum, 1.0)
                my_q[...] = (acc * lax.broadcast_in_dim(1.0 / safe_sum, acc.shape, [0])).astype(dtype)
                lse_smem.at[wg][...] = jnp.where(seen, row_max * LN2 + jnp.log(safe_sum), -jnp.inf)
                plgpu.commit_smem()
                if splits == 1:
                    plgpu.copy_smem_to_gmem(my_q, out_ref.at[b, pl.ds(n0, NODE_BLOCK), head])
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(n0, NODE_BLOCK)])
                else:
                    plgpu.copy_smem_to_gmem(my_q, out_ref.at[b, split, pl.ds(n0, NODE_BLOCK), head])
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                                            lse_ref.at[b, split, head, pl.ds(n0, NODE_BLOCK)])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, smem_shapes, *barrier_shapes, collective_axes="wg")

    if splits == 1:
        out_type = (jax.ShapeDtypeStruct((B, Np, H, D), dtype), jax.ShapeDtypeStruct((B, H, Np), jnp.float32))
    else:
        out_type = (jax.ShapeDtypeStruct((B, splits, Np, H, D), dtype),
                    jax.ShapeDtypeStruct((B, splits, H, Np), jnp.float32))
    extra = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        extra["interpret"] = InterpretGPUParams()
    out, lse = plgpu.kernel(
        body,
        out_type=out_type,
        grid=(pairs * node_blocks, splits, K, B),
        grid_names=("rows", "split", "kv_head", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **extra,
    )(lengths, words, q, k_cache, v_cache)
    if splits > 1:
        out, lse = _merge_splits(out, lse)
    return out[:, :N], lse[:, :, :N]


def _merge_splits(out, lse):
    """out [B, P, Np, H, D] (each split's o / l), lse [B, P, H, Np] -> [B, Np, H, D], [B, H, Np]."""
    top = jnp.max(lse, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)  # [B, P, H, Np]; 0 for a split that saw no key
    total = jnp.sum(weights, axis=1)
    safe_total = jnp.where(total > 0, total, 1.0)
    # A broadcast multiply and a sum (not an einsum, which would become a separate matmul launch):
    # XLA fuses the whole merge of the outputs into one reduction.
    weights = jnp.swapaxes(weights / safe_total[:, None], 2, 3)[..., None]  # [B, P, Np, H, 1]
    merged = jnp.sum(weights * out.astype(jnp.float32), axis=1)
    return merged.astype(out.dtype), jnp.where(total > 0, top[:, 0] + jnp.log(safe_total), -jnp.inf)
