"""What the forward and backward kernels share: the static kernel spec and the per-tile score/mask.

Everything here runs inside Pallas kernels on one [block_q, block_k] tile and calls `masking` for
the semantics, so the kernels and the reference cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.numerics import LOG2E
from pallas_kernels.fa2 import masking


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static facts the kernels are specialised on (one compile per distinct spec).

    Attributes:
      mask_config: positions, causal, window, softcap.
      sm_scale: softmax scale applied to q . k.
      num_heads: H; ALiBi slopes and dropout streams are indexed by b * H + h.
      group_size: G = H // K; query head h reads KV head h // G.
      dropout_rate: 0 disables dropout.
      has_segments / has_alibi: whether those inputs are passed.
      mask_heads: 0 without a dense mask, else its head extent (1 or H).
      mask_batched: whether the dense mask has a batch extent of B (else 1).
      tile_heads: 0 without a tile-visit table, else its head extent (1 or H).
      tile_batched: whether the tile-visit table has a batch extent of B.
      kv_padded: S was padded up to a block multiple, so keys j >= S must be masked.
    """

    mask_config: masking.MaskConfig
    sm_scale: float
    num_heads: int
    group_size: int
    dropout_rate: float = 0.0
    has_segments: bool = False
    has_alibi: bool = False
    mask_heads: int = 0
    mask_batched: bool = False
    tile_heads: int = 0
    tile_batched: bool = False
    kv_padded: bool = False

    @property
    def has_dropout(self) -> bool:
        return self.dropout_rate > 0

    @property
    def needs_mask(self) -> bool:
        """Whether any tile can hold a masked pair; if not, the kernels skip mask arithmetic."""
        config = self.mask_config
        return (self.kv_padded or config.left_limit is not None or config.right_limit is not None
                or self.has_segments or self.mask_heads > 0)


def tile_scores(q, k, q_idx, k_idx, spec: KernelSpec, slope):
    """Scores of one tile in log2 units: q [bq, D], k [bk, D] -> f32 [bq, bk].

    Also returns d(score)/d(q.k * scale): the softcap's 1 - tanh^2, or None when softcap is off.
    """
    products = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if spec.mask_config.softcap <= 0 and slope is None:
        return products * (spec.sm_scale * LOG2E), None
    scores, softcap_grad = masking.apply_softcap(products * spec.sm_scale, spec.mask_config)
    scores = masking.apply_alibi(scores, q_idx, k_idx, spec.mask_config, slope)
    return scores * LOG2E, softcap_grad


def _div(x, block: int):
    """x // block for x >= 0: in Python for static ints, lax.div for traced ones (jnp's floor division
    does not lower to Triton, and a literal numerator trips the Triton lowering too)."""
    return x // block if isinstance(x, int) else lax.div(x, jnp.int32(block))


def _clip(x, lo, hi):
    if all(isinstance(v, int) for v in (x, lo, hi)):
        return min(max(x, lo), hi)
    return jnp.clip(x, lo, hi)


def block_ranges(span, full_span, block: int, spec: "KernelSpec"):
    """Splits the blocks covering `span` = [lo, hi) into (first, last, masked) loop ranges.

    Blocks wholly inside `full_span` (every pair visible by position) run without mask arithmetic;
    the ones at the band's edges are masked. With segments or a dense mask every tile needs its mask.
    """
    lo, hi = span
    first = _div(lo, block)
    last = _div(hi + (block - 1), block)
    last = max(first, last) if isinstance(first, int) and isinstance(last, int) else jnp.maximum(first, last)
    if not spec.needs_mask:
        return [(first, last, False)]
    if spec.has_segments or spec.mask_heads:
        return [(first, last, True)]
    full_lo, full_hi = full_span
    middle_first = _clip(_div(full_lo + (block - 1), block), first, last)
    middle_last = _clip(_div(full_hi, block), middle_first, last)
    return [(first, middle_first, True), (middle_first, middle_last, False), (middle_last, last, True)]


def tile_allowed(q_idx, k_idx, spec: KernelSpec, q_segments=None, kv_segments=None, dense_mask=None):
    """bool [bq, bk] of attending pairs, or None when nothing in this problem is ever masked.

    q_segments [bq], kv_segments [bk] int32; dense_mask [bq, bk] int8 (nonzero = attend).
    """
    if not spec.needs_mask:
        return None
    allowed = masking.position_mask(q_idx, k_idx, spec.mask_config)
    if spec.has_segments:
        allowed = allowed & (q_segments[:, None] == kv_segments[None, :])
    if spec.mask_heads:
        allowed = allowed & (dense_mask != 0)
    return jnp.broadcast_to(allowed, (q_idx.shape[0], k_idx.shape[1]))


def zero_nonfinite_rows(x):
    """Zeroes the rows of a tile that hold NaN/inf; returns (clean tile, int32 [rows] 1 where zeroed).

    Used in masked tiles on the operand of each second matmul (V in P.V, Q in dS^T.Q, K in dS.K):
    a masked pair has P = dS = 0, but 0 * NaN is NaN, so garbage in padding positions would leak
    through the matmul into real rows. Zeroing is exact wherever the row is unused; where it IS used,
    the NaN still arrives through S, P or dS (Q, K), or is restored by the caller (V in the forward).
    """
    row_sum = jnp.sum(x.astype(jnp.float32), axis=1)
    finite = jnp.abs(row_sum) < jnp.inf  # False for NaN and inf (Triton has no is_finite)
    return jnp.where(finite[:, None], x, jnp.zeros_like(x)), 1 - finite.astype(jnp.int32)


def tile_keep(spec: KernelSpec, stream, q_idx, k_idx):
    """Dropout keep-mask of one tile, rebuilt from indices (nothing stored between passes)."""
    return masking.dropout_keep(stream, q_idx, k_idx, spec.dropout_rate)


def scalar_specs(extras: dict) -> dict:
    """Whole-array BlockSpecs of the per-call inputs read by scalar index: ALiBi slopes and the seed."""
    return {name: pl.BlockSpec(extras[name].shape, lambda *_: (0,))
            for name in ("alibi", "seed") if name in extras}
