"""The tree mask as bit words: packed once in the wrapper, tested per tile in the kernel.

Node i's ancestor-or-self set is stored as W = ceil(N / 32) 32-bit words; bit j % 32 of word j // 32
is tree_mask[i, j]. N <= 128 gives at most 4 words per node. Words are stored as int32 (the same
bits): Triton's integer ops are signless, and `(word >> s) & 1` picks bit s for any s in [0, 32)
whether the shift is arithmetic or logical, so no shift ever reaches 32 (the overflow that breaks
64-bit-mask implementations above 32 nodes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32  # the shifts in tree_bits assume this


def num_words(num_nodes: int) -> int:
    return -(-num_nodes // WORD_BITS)


def pack_tree_mask(tree_mask: jax.Array) -> jax.Array:
    """bool [..., N, N] -> int32 [..., N, W]: bit j % 32 of word j // 32 of row i is tree_mask[i, j].

    A NumPy mask (a static tree) is packed with NumPy, so the words are a constant of the compiled
    program rather than a kernel launched with every call.
    """
    xp = np if isinstance(tree_mask, np.ndarray) else jnp
    num_nodes = tree_mask.shape[-1]
    words = num_words(num_nodes)
    pad = words * WORD_BITS - num_nodes
    bits = xp.pad(tree_mask, [(0, 0)] * (tree_mask.ndim - 1) + [(0, pad)])
    bits = bits.reshape(tree_mask.shape[:-1] + (words, WORD_BITS)).astype(xp.uint32)
    weights = xp.left_shift(xp.uint32(1), xp.arange(WORD_BITS, dtype=xp.uint32))
    packed = xp.sum(bits * weights, axis=-1, dtype=xp.uint32)  # distinct bits: sum == or
    return packed.view(np.int32) if xp is np else jax.lax.bitcast_convert_type(packed, jnp.int32)


def row_words(packed: jax.Array, group_size: int, num_rows: int) -> jax.Array:
    """Bit words per kernel row: int32 [..., N, W] -> [..., W, num_rows].

    Kernel row r holds node r // G (the G query heads of one KV head are adjacent). Rows past N * G
    are padding and get no bits.
    """
    rows = jnp.repeat(packed, group_size, axis=-2)  # [..., N * G, W]
    pad = num_rows - rows.shape[-2]
    rows = jnp.pad(rows, [(0, 0)] * (rows.ndim - 2) + [(0, pad), (0, 0)])
    return jnp.swapaxes(rows, -1, -2)


def tree_bits(words: list[jax.Array], node_index: jax.Array) -> jax.Array:
    """bool [R, C]: whether row r's node sees tree node node_index[c].

    words: W int32 arrays [R] (word w of every row); node_index: int32 [C], each in [0, 32 * W).
    Used inside the kernel on one tile, so it only uses elementwise integer ops.
    """
    word_of = node_index >> 5  # node_index // 32 for node_index >= 0
    shift = (node_index & (WORD_BITS - 1))[None, :]
    visible = None
    for w, word in enumerate(words):
        bit = ((word[:, None] >> shift) & 1) == 1
        hit = (word_of == w)[None, :] & bit
        visible = hit if visible is None else visible | hit
    return visible
