"""Fused tree attention as one Pallas (Triton) kernel with split-KV and an lse-weighted combine.

Algorithm: FlashAttention-2's online softmax (Dao, 2023, §3.1) over the committed prefix, split
along the prefix as in Flash-Decoding (Dao et al., 2023) so that small batches still fill the GPU,
plus one extra tile per KV head for the tree's own keys, masked by bit words (SpecInfer, Miao et al.,
2024: one verification pass over every node of the token tree).

Layout inside a program, for node block nb, split s, batch row b and KV head kh:
  * the query rows are (node, query head) pairs of KV head kh, node-major: q is read in place as
    [B, N, K, Gp, D] and one program takes Nb nodes x Gp heads (see tuning.RowTiling), so a K/V tile
    is loaded once for all the query heads that share it (once per KV head when N * G <= block_rows);
  * split s covers an equal share of the prefix [0, cache_lengths[b]), in whole blocks of block_k;
    the last split also covers the tree keys [cache_lengths[b], cache_lengths[b] + N) in one tile;
  * every load stays inside [0, S): the last partial block and the tree tile start at most at
    S - tile, and positions outside the wanted range are masked in the scores (-inf) and zeroed in V,
    so NaN in unused slots cannot reach the result through 0 * NaN.
With one split the kernel writes the final output in place as [B, N, K, Gp, D]. With several, each
writes (o / l, lse) for its rows in f32 and `combine_splits` merges them (elementwise, in XLA).

`batch_invariant=True` walks the keys differently (see `absolute_tiles` in the kernel): tiles and
splits sit at fixed cache positions, and the tree's keys are masked inside those tiles, so that a
node's result does not depend on where the prefix ends. Slower for short prefixes in large caches
(the splits past the prefix idle), but a chain verified in one call reproduces one-token decoding
bit for bit, which the fast walk (whose split shares follow the prefix length) does not.

Tuned on: an H100, where the benchmark's `--tune` sweep kept the default tiles (see tuning.py).
Caveats: forward only (no VJP: verification is inference). Scores use exp2 with the scale folded in.
A head dim that is not a power of two is padded per tile (masked loads); a group size G that is not
a power of two costs a padded copy of q.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.numerics import LN2, LOG2E, next_power_of_two
from pallas_kernels.tree import masking
from pallas_kernels.tree.tuning import TreeAttentionConfig, row_tiling

M_INIT = -1e30  # finite start for the running max, so an all-masked tile gives exp2(-inf - m) = 0


def _tree_attention_kernel(
    lengths_ref,  # [B] int32: committed prefix length of every batch row
    words_ref,  # [W, R] int32: ancestor bit words of each row's node
    q_ref,  # [Nb, Gp, Dp]: Nb nodes x the Gp query heads of one KV head; rows are node-major
    k_ref,  # [S, Dp]
    v_ref,  # [S, Dp]
    o_ref,  # one split: [Nb, Gp, Dp] final output; several: [R, Dp] f32 o / l of this split
    lse_ref,  # [R] f32, natural log
    *,
    scale_log2: float,
    softcap: float,
    head_dim: int,
    num_nodes: int,
    num_words: int,
    block_k: int,
    tree_tile: int,
    num_splits: int,
    cache_size: int,
    batch_invariant: bool,
):
    split = pl.program_id(1)
    nodes_per_block, group, head_dim_padded = q_ref.shape
    rows = nodes_per_block * group
    head_mask = None  # [1, Dp]: head-dim padding of the tiles
    if head_dim_padded != head_dim:
        head_mask = (jnp.arange(head_dim_padded) < head_dim)[None, :]
    q_mask = None  # [Nb, 1, 1] & [1, 1, Dp]: nodes past N in the last block, head-dim padding
    if num_nodes % nodes_per_block:
        first_node = pl.program_id(0) * nodes_per_block
        q_mask = (first_node + jnp.arange(nodes_per_block) < num_nodes)[:, None, None]
    if head_mask is not None:
        q_mask = head_mask[None] if q_mask is None else q_mask & head_mask[None]

    def load(ref, mask):
        if mask is None:
            return ref[...]
        return plgpu.load(ref, mask=mask, other=0.0)

    q = load(q_ref, q_mask).reshape(rows, head_dim_padded)  # [R, Dp], row r = node r // Gp, head r % Gp
    prefix = jnp.clip(lengths_ref[pl.program_id(2)], 0, cache_size)  # clamped: loads stay inside the cache

    def scores_of(k):
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if softcap > 0:  # Gemma-2 order: scale, cap, then mask; log2(e) folded in after the cap
            return (softcap * LOG2E) * jnp.tanh(s * (scale_log2 / (softcap * LOG2E)))
        return s * scale_log2

    def update(carry, s, v):
        """FA2 online softmax in base 2, deferring the 1/l rescale to the end (FA2 §3.1.1)."""
        o, m, l = carry
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = l * correction + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return o * correction[:, None] + pv, m_next, l_next

    def masked_tile(carry, load_start, size, key_visible):
        """One tile of `size` keys from load_start; key_visible(pos) -> (bool [R|1, size], bool [size])."""
        k = load(k_ref.at[pl.ds(load_start, size), :], head_mask)
        v = load(v_ref.at[pl.ds(load_start, size), :], head_mask)
        positions = load_start + jnp.arange(size, dtype=jnp.int32)
        visible, key_used = key_visible(positions)
        s = jnp.where(visible, scores_of(k), -jnp.inf)
        v = jnp.where(key_used[:, None], v, jnp.zeros_like(v))
        return update(carry, s, v)

    def prefix_then_tree(carry):
        """The fast walk: split s takes an equal share of [0, prefix) in whole blocks, unmasked but for
        the last partial block, and the last split adds the tree's keys [prefix, prefix + N) as one tile."""
        # This split's share of the prefix, in whole blocks: [lo, hi). Operands are >= 0, so lax.div
        # (truncating) is floor division; it lowers to one Triton op where `//` would add sign fix-ups.
        blocks = lax.div(prefix + block_k - 1, block_k)
        share = lax.div(blocks + num_splits - 1, num_splits) * block_k
        lo = split * share
        hi = jnp.minimum(prefix, lo + share)
        num_keys = jnp.maximum(hi - lo, 0)
        num_full = lax.div(num_keys, block_k)

        def full_block(i, carry):
            start = pl.multiple_of(lo + i * block_k, block_k)
            k = load(k_ref.at[pl.ds(start, block_k), :], head_mask)
            v = load(v_ref.at[pl.ds(start, block_k), :], head_mask)
            return update(carry, scores_of(k), v)

        carry = lax.fori_loop(0, num_full, full_block, carry)

        # The last, partial block: [tail, hi). Clamped so the tile ends inside the cache.
        tail = lo + num_full * block_k

        def prefix_tail(carry):
            def key_visible(positions):
                used = (positions >= tail) & (positions < hi)
                return used[None, :], used
            return masked_tile(carry, jnp.minimum(tail, cache_size - block_k), block_k, key_visible)

        carry = lax.cond(hi > tail, prefix_tail, lambda c: c, carry)

        # The tree's keys [prefix, prefix + N) in one tile, on the last split only.
        def tree_part(carry):
            words = [words_ref[w, :] for w in range(num_words)]  # W x [R]

            def key_visible(positions):
                node = positions - prefix
                used = (node >= 0) & (node < num_nodes)
                bits = masking.tree_bits(words, jnp.clip(node, 0, num_nodes - 1))
                return bits & used[None, :], used
            return masked_tile(carry, jnp.minimum(prefix, cache_size - tree_tile), tree_tile, key_visible)

        if num_splits == 1:
            carry = tree_part(carry)
        else:
            carry = lax.cond(split == num_splits - 1, tree_part, lambda c: c, carry)
        return carry

    def absolute_tiles(carry):
        """The batch-invariant walk: tiles at fixed cache positions, splits fixed by the cache size.

        Tile t holds slots [t * block_k, (t + 1) * block_k) and split s the tiles [s * C, (s + 1) * C),
        C = ceil(tiles / num_splits), whatever `prefix` is; every tile goes through the same masked
        update (an unmasked fast path for the tiles below the prefix could compile to other
        roundings, e.g. a fused multiply-add, and a tile is below the prefix in one call but not in
        the other). A node's result then depends only on which slots it sees, not on where the prefix ends:
        a chain node at depth d over a prefix L is bit for bit a one-token decode over L + d (same
        shapes), which greedy speculative decoding needs to reproduce incremental decoding exactly.
        """
        words = [words_ref[w, :] for w in range(num_words)]  # W x [R]
        cache_tiles = -(-cache_size // block_k)
        tiles_per_split = -(-cache_tiles // num_splits)
        lo = split * (tiles_per_split * block_k)
        hi = jnp.minimum(jnp.minimum(prefix + num_nodes, cache_size), lo + tiles_per_split * block_k)
        num_tiles = lax.div(jnp.maximum(hi - lo, 0) + block_k - 1, block_k)

        def tile(i, carry):
            start = lo + i * block_k

            def key_visible(positions):
                node = positions - prefix
                in_tree = (node >= 0) & (node < num_nodes)
                ancestor = masking.tree_bits(words, jnp.clip(node, 0, num_nodes - 1)) & in_tree[None, :]
                used = (positions >= start) & (positions < hi)  # a clamped last tile overlaps the one before
                return ((positions < prefix)[None, :] | ancestor) & used[None, :], used
            # The last tile of a cache that is not a whole number of tiles is loaded from S - block_k.
            return masked_tile(carry, jnp.minimum(start, cache_size - block_k), block_k, key_visible)

        return lax.fori_loop(0, num_tiles, tile, carry)

    carry = (jnp.zeros((rows, head_dim_padded), jnp.float32),
             jnp.full((rows,), M_INIT, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    o, m, l = (absolute_tiles if batch_invariant else prefix_then_tree)(carry)

    has_keys = l > 0  # padding rows, or a split whose share of the prefix is empty
    safe_l = jnp.where(has_keys, l, 1.0)
    lse_ref[...] = jnp.where(has_keys, (m + jnp.log2(safe_l)) * LN2, -jnp.inf)
    out = (o / safe_l[:, None]).astype(o_ref.dtype)
    out_mask = head_mask
    if num_splits == 1:  # straight into [B, N, K, Gp, D]
        out, out_mask = out.reshape(nodes_per_block, group, head_dim_padded), q_mask
    if out_mask is None:
        o_ref[...] = out
    else:
        plgpu.store(o_ref, out, mask=out_mask)


MAX_UNROLLED_SPLITS = 16


def combine_splits(o, lse, axis: int = 2):
    """lse-weighted merge of per-split results (Flash-Decoding's reduction), in f32.

    o: [..., P, ..., D], each split's o / l (P at `axis`); lse: o's shape without D, -inf for an
    empty split. Returns (o without the P axis, f32; lse without it). The Triton kernel passes
    [B, K, P, R, D]; the Mosaic kernel has its own one-launch merge (`mosaic_kernel.merge_splits`),
    which the tests check against this one with axis=1.
    """
    num_splits = o.shape[axis]
    if num_splits > MAX_UNROLLED_SPLITS:
        return _combine_splits_reduce(o, lse, axis)
    # Split by split, so every op is elementwise over the output: with reductions over P, XLA made
    # four kernels (max, exp, divide, sum), this way two, which take less time (BENCHMARKS.md).
    parts = [lax.index_in_dim(o, p, axis, keepdims=False) for p in range(num_splits)]
    lses = [lax.index_in_dim(lse, p, axis, keepdims=False) for p in range(num_splits)]
    top = functools.reduce(jnp.maximum, lses)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(x - top) for x in lses]  # 0 for empty splits
    total = functools.reduce(jnp.add, weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    out = functools.reduce(jnp.add, [part.astype(jnp.float32) * (w / safe_total)[..., None]
                                     for part, w in zip(parts, weights)])
    return out, jnp.where(total > 0, top + jnp.log(safe_total), -jnp.inf)


def _combine_splits_reduce(o, lse, axis: int):
    """combine_splits through reductions over the split axis, for split counts too many to unroll."""
    top = jnp.max(lse, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)
    total = jnp.sum(weights, axis=axis, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    out = jnp.sum((weights / safe_total)[..., None] * o.astype(jnp.float32), axis=axis)
    lse = jnp.where(total > 0, top + jnp.log(safe_total), -jnp.inf)
    return out, jnp.squeeze(lse, axis)


def tree_attention_call(
    q,  # [B, N, H, D]
    k_cache,  # [B, S, K, D]
    v_cache,  # [B, S, K, D]
    cache_lengths,  # [B] int32
    tree_mask,  # [N, N] or [B, N, N] bool
    *,
    sm_scale: float,
    softcap: float,
    num_splits: int,
    config: TreeAttentionConfig,
    interpret: bool,
    batch_invariant: bool = False,
):
    """Lays out the operands, runs the kernel, merges splits. Returns (out [B, N, H, D], lse [B, H, N]).

    Arguments are assumed valid (see arguments.validate). q is read in place as [B, N, K, G, D] when
    G is a power of two; the output of a one-split call is written in place the same way.
    """
    B, N, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = H // K
    tiling = row_tiling(N, G, config.block_rows)
    Gp, Nb, rows = tiling.padded_group, tiling.nodes_per_block, tiling.block_rows
    head_dim_padded = max(16, next_power_of_two(D))
    tree_tile = max(16, next_power_of_two(N))
    block_k = config.block_k

    q5 = q.reshape(B, N, K, G, D)
    if Gp != G:  # odd group sizes: zero query heads, sliced off the output
        q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, 0), (0, Gp - G), (0, 0)))
    packed = masking.pack_tree_mask(tree_mask)  # [B|., N, W]
    words = masking.row_words(packed, Gp, tiling.padded_rows)  # [B|., W, Rp]
    if words.ndim == 2:
        words = words[None]
    num_words = words.shape[1]
    mask_batched = words.shape[0] != 1
    # Tiles never start below 0 nor end past S; a cache smaller than one tile is padded (cheap: tiny).
    if S < max(block_k, tree_tile):
        pad = ((0, 0), (0, max(block_k, tree_tile) - S), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
        S = k_cache.shape[1]

    kernel = functools.partial(
        _tree_attention_kernel,
        scale_log2=sm_scale * LOG2E,
        softcap=softcap,
        head_dim=D,
        num_nodes=N,
        num_words=num_words,
        block_k=block_k,
        tree_tile=tree_tile,
        num_splits=num_splits,
        cache_size=S,
        batch_invariant=batch_invariant,
    )
    # Grid (node block, split, batch, KV head): the node blocks of one K/V stream are adjacent in
    # launch order, so the second read of a K/V tile usually comes from L2.
    grid = (tiling.node_blocks, num_splits, B, K)
    in_specs = [
        pl.BlockSpec((B,), lambda r, s, b, h: (0,)),  # read by scalar index
        pl.BlockSpec((None, num_words, rows), lambda r, s, b, h: (b if mask_batched else 0, 0, r)),
        pl.BlockSpec((None, Nb, None, Gp, head_dim_padded), lambda r, s, b, h: (b, r, h, 0, 0)),
        pl.BlockSpec((None, S, None, head_dim_padded), lambda r, s, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, S, None, head_dim_padded), lambda r, s, b, h: (b, 0, h, 0)),
    ]
    Rp = tiling.padded_rows
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((B, N, K, Gp, D), q.dtype),
                     jax.ShapeDtypeStruct((B, K, Rp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, Nb, None, Gp, head_dim_padded), lambda r, s, b, h: (b, r, h, 0, 0)),
                     pl.BlockSpec((None, None, rows), lambda r, s, b, h: (b, h, r))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, Rp, D), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, num_splits, Rp), jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim_padded), lambda r, s, b, h: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, rows), lambda r, s, b, h: (b, h, s, r)),
        ]
    o, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tree_attention",
    )(cache_lengths.astype(jnp.int32), words, q5, k_cache, v_cache)

    if num_splits > 1:
        o, lse = combine_splits(o, lse)  # [B, K, Rp, D], [B, K, Rp]
        o = o.reshape(B, K, tiling.padded_nodes, Gp, D)[:, :, :N].transpose(0, 2, 1, 3, 4).astype(q.dtype)
    out = o[:, :, :, :G].reshape(B, N, H, D)
    lse = lse.reshape(B, K, tiling.padded_nodes, Gp)[:, :, :N, :G].transpose(0, 1, 3, 2).reshape(B, H, N)
    return out, lse
