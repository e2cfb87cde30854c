"""Ring attention: FlashAttention-2 over a sequence split across devices (context parallelism).

Each device of a mesh axis holds one chunk of the queries and one of the keys/values. The K/V
chunks travel around the ring (`lax.ppermute`, n - 1 hops for n devices) while every device
attends its queries to the chunk it holds with our kernel, then merges the partial results with
their logsumexps (Liu et al., "Ring Attention with Blockwise Transformers", 2023; the merge is
FA2's online softmax at block granularity). Nothing gathers the sequence.

The backward runs the ring again: the K/V chunks travel with their dK/dV accumulators, and each
block pair's gradients come from our kernel's backward given the *global* output and logsumexp
(`api.backward`), which is exactly that block's share of the full attention's gradient; after n
hops every dK/dV accumulator is back on the device owning its chunk.

Causal attention is load-balanced by the zig-zag split (as in Llama 3's context parallelism and
"striped"/zig-zag ring attention): the sequence is cut into 2n equal pieces and device i holds
pieces i and 2n - 1 - i, for queries and keys alike. Then at every hop each device does the same
work, one (2c x c) or (c x 2c) non-causal block, c = T / 2n:
  * hop 0 (own chunk):  causal attention of the local pair to itself;
  * K/V from device j < i: all local queries see the first piece j, none sees piece 2n - 1 - j;
  * K/V from device j > i: only the second query piece 2n - 1 - i sees keys, and sees both.
`zigzag` / `unzigzag` put a sequence into that layout and back.

`ring_attention` is per-device code: call it inside `jax.shard_map` (or under `pmap`) with the
sequence axis of q, k, v split over `axis_name`. Arguments besides causality and segment ids
(softcap, scale, block sizes, backend) are passed to every block call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fa2 import api


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static part of one ring call (a nondiff argument of the custom VJP)."""

    axis_name: str
    causal: bool
    kernel_args: tuple  # sorted (name, value) pairs passed to every block call


def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
    """The permutation that lays a sequence out in zig-zag order for `num_shards` devices.

    x[:, zigzag_order(T, n)] split into n contiguous chunks gives device i the pieces i and
    2n - 1 - i of x's 2n equal pieces.

    Raises:
      ValueError: T is not a multiple of 2 * num_shards.
    """
    if num_shards < 1 or seq_len % (2 * num_shards):
        raise ValueError(f"zig-zag needs seq_len divisible by 2 * num_shards, got {seq_len=} {num_shards=}")
    pieces = np.arange(seq_len).reshape(2 * num_shards, -1)
    order = [p for i in range(num_shards) for p in (i, 2 * num_shards - 1 - i)]
    return pieces[order].reshape(-1)


def zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """`x` with its sequence axis in zig-zag order (see `zigzag_order`)."""
    return jnp.take(x, zigzag_order(x.shape[axis], num_shards), axis=axis)


def unzigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """The inverse of `zigzag`."""
    return jnp.take(x, np.argsort(zigzag_order(x.shape[axis], num_shards)), axis=axis)


def _block_args(ring: _Ring, causal: bool, q_ids, kv_ids) -> dict:
    ids = None if q_ids is None else (q_ids, kv_ids)
    return dict(ring.kernel_args, causal=causal, segment_ids=ids)


def _block_forward(ring: _Ring, q, k, v, q_ids, kv_ids, *, causal: bool):
    """One block pair's out [B, Tq, H, D] (q's dtype) and lse [B, H, Tq] float32."""
    launch, aux = api.plan(q, k, v, **_block_args(ring, causal, q_ids, kv_ids))
    return api.forward(q, k, v, aux, launch)


def _block_backward(ring: _Ring, q, k, v, q_ids, kv_ids, out, lse, dout, dlse, *, causal: bool):
    launch, aux = api.plan(q, k, v, **_block_args(ring, causal, q_ids, kv_ids))
    return api.backward(q, k, v, aux, launch, out, lse, dout, dlse)


def _half(x, axis: int, second: bool):
    if x is None:
        return None
    c = x.shape[axis] // 2
    return jax.lax.slice_in_dim(x, c if second else 0, 2 * c if second else c, axis=axis)


def _pad_half(x, axis: int, second: bool, value=0.0):
    """[.., c, ..] -> [.., 2c, ..] with x in the first or second half and `value` elsewhere."""
    fill = jnp.full_like(x, value)
    return jnp.concatenate([fill, x] if second else [x, fill], axis=axis)


def _off_diagonal_forward(ring: _Ring, earlier, q, k, v, q_ids, kv_ids):
    """A hop with another device's K/V: the zig-zag case it falls in, or a plain block."""
    if not ring.causal:
        return _block_forward(ring, q, k, v, q_ids, kv_ids, causal=False)

    def from_earlier(q, k, v, q_ids, kv_ids):  # every query sees the first key piece
        return _block_forward(ring, q, _half(k, 1, False), _half(v, 1, False), q_ids, _half(kv_ids, 1, False),
                              causal=False)

    def from_later(q, k, v, q_ids, kv_ids):  # the second query piece sees every key
        out, lse = _block_forward(ring, _half(q, 1, True), k, v, _half(q_ids, 1, True), kv_ids, causal=False)
        return _pad_half(out, 1, True), _pad_half(lse, 2, True, -jnp.inf)

    return jax.lax.cond(earlier, from_earlier, from_later, q, k, v, q_ids, kv_ids)


def _off_diagonal_backward(ring: _Ring, earlier, q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
    if not ring.causal:
        return _block_backward(ring, q, k, v, q_ids, kv_ids, out, lse, dout, dlse, causal=False)

    def from_earlier(q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
        dq, dk, dv = _block_backward(ring, q, _half(k, 1, False), _half(v, 1, False), q_ids,
                                     _half(kv_ids, 1, False), out, lse, dout, dlse, causal=False)
        return dq, _pad_half(dk, 1, False), _pad_half(dv, 1, False)

    def from_later(q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
        dq, dk, dv = _block_backward(ring, _half(q, 1, True), k, v, _half(q_ids, 1, True), kv_ids,
                                     _half(out, 1, True), _half(lse, 2, True), _half(dout, 1, True),
                                     _half(dlse, 2, True), causal=False)
        return _pad_half(dq, 1, True), dk, dv

    return jax.lax.cond(earlier, from_earlier, from_later, q, k, v, q_ids, kv_ids, out, lse, dout, dlse)


def _merge(out, lse, block_out, block_lse):
    """Online softmax over blocks: out, lse of (acc ∪ block). out [B, T, H, D] f32, lse [B, H, T]."""
    new = jnp.logaddexp(lse, block_lse)
    safe = jnp.where(new == -jnp.inf, 0.0, new)  # a row no block has seen stays 0 / -inf
    to_out = lambda w: jnp.transpose(w, (0, 2, 1))[..., None]  # noqa: E731  [B, H, T] -> [B, T, H, 1]
    out = out * to_out(jnp.exp(lse - safe)) + block_out.astype(jnp.float32) * to_out(jnp.exp(block_lse - safe))
    return out, new


def _shift(tree, axis_name: str, n: int):
    """Sends every array of `tree` to the next device of the ring (device i -> i + 1 mod n)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _check_causal_layout(q, k):
    if q.shape[1] != k.shape[1] or q.shape[1] % 2:
        raise ValueError(f"causal ring attention needs equal, even local lengths (two zig-zag pieces): "
                         f"{q.shape=} {k.shape=}")


def _ring_forward(ring: _Ring, q, k, v, q_ids, kv_ids):
    n = jax.lax.axis_size(ring.axis_name)
    me = jax.lax.axis_index(ring.axis_name)
    kv = (k, v, kv_ids)
    # Hop 0: the device's own K/V. The first send has no dependency on it, so the two overlap.
    out, lse = _block_forward(ring, q, k, v, q_ids, kv_ids, causal=ring.causal)
    out = out.astype(jnp.float32)
    if n == 1:
        return out.astype(q.dtype), lse
    kv = _shift(kv, ring.axis_name, n)

    def hop(s, carry):
        out, lse, kv = carry
        following = _shift(kv, ring.axis_name, n)  # in flight while this hop computes
        earlier = (me - s) % n < me
        block = _off_diagonal_forward(ring, earlier, q, *kv[:2], q_ids, kv[2])
        return (*_merge(out, lse, *block), following)

    out, lse, kv = jax.lax.fori_loop(1, n - 1, hop, (out, lse, kv))
    earlier = (me - (n - 1)) % n < me
    out, lse = _merge(out, lse, *_off_diagonal_forward(ring, earlier, q, *kv[:2], q_ids, kv[2]))
    return out.astype(q.dtype), lse


def _ring_backward(ring: _Ring, q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
    n = jax.lax.axis_size(ring.axis_name)
    me = jax.lax.axis_index(ring.axis_name)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    dq, dk, dv = map(f32, _block_backward(ring, q, k, v, q_ids, kv_ids, out, lse, dout, dlse, causal=ring.causal))
    if n == 1:
        return dq, dk, dv

    def hop(s, carry):
        # The K/V of device me - s arrive with the dK/dV summed for them so far.
        dq, k, v, kv_ids, dk, dv = carry
        k, v, kv_ids, dk, dv = _shift((k, v, kv_ids, dk, dv), ring.axis_name, n)
        earlier = (me - s) % n < me
        bq, bk, bv = _off_diagonal_backward(ring, earlier, q, k, v, q_ids, kv_ids, out, lse, dout, dlse)
        return dq + f32(bq), k, v, kv_ids, dk + f32(bk), dv + f32(bv)

    dq, _, _, _, dk, dv = jax.lax.fori_loop(1, n, hop, (dq, k, v, kv_ids, dk, dv))
    # Device me now holds the sums for the chunk of device me + 1: one more hop takes them home.
    dk, dv = _shift((dk, dv), ring.axis_name, n)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, q_ids, kv_ids):
    return _ring_forward(ring, q, k, v, q_ids, kv_ids)


def _ring_fwd(ring: _Ring, q, k, v, q_ids, kv_ids):
    out, lse = _ring_forward(ring, q, k, v, q_ids, kv_ids)
    return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, q_ids, kv_ids, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _ring_backward(ring, q, k, v, q_ids, kv_ids, out, lse, dout.astype(q.dtype),
                                dlse.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)

# flash_attention arguments a ring passes to every block call (the rest would need the global
# positions of each block: windows, ALiBi, masks; dropout's hash numbers positions per call).
RING_KERNEL_ARGS = ("sm_scale", "softcap", "block_sizes", "interpret", "backend", "deterministic")


def ring_attention(
    q: jax.Array,  # [B, Tl, H, D], this device's queries
    k: jax.Array,  # [B, Sl, K, D], this device's keys
    v: jax.Array,  # [B, Sl, K, D]
    *,
    axis_name: str,
    causal: bool = False,
    segment_ids=None,
    return_lse: bool = False,
    **kernel_args,
):
    """Attention of this device's queries to the keys of every device along `axis_name`.

    Call inside `jax.shard_map` with the sequence axis of q, k, v split over `axis_name`.

    Args:
      q: [B, Tl, H, D]; k, v: [B, Sl, K, D], the local chunks (H % K == 0).
      axis_name: the mesh axis the sequence is split over (n devices).
      causal: causal attention over the whole sequence, whose chunks must be in zig-zag layout
        (`zigzag`): then Tl == Sl, even, and device i holds pieces i and 2n - 1 - i. Without it
        the chunks may be in any order and of any lengths.
      segment_ids: None, or (q_ids [B, Tl], kv_ids [B, Sl]) of the local chunks (the key ids
        travel with their keys), or one [B, Tl] array when Tl == Sl.
      return_lse: also return the logsumexp [B, H, Tl] float32 over all keys.
      **kernel_args: `flash_attention` arguments in `RING_KERNEL_ARGS`.

    Returns:
      out [B, Tl, H, D] in q's dtype (and lse), differentiable in q, k, v.

    Raises:
      ValueError: an argument outside `RING_KERNEL_ARGS`, or a causal layout that cannot be zig-zag.
    """
    unknown = sorted(set(kernel_args) - set(RING_KERNEL_ARGS))
    if unknown:
        raise ValueError(f"ring_attention passes only {RING_KERNEL_ARGS} to its blocks, got {unknown=}")
    if causal:
        _check_causal_layout(q, k)
    q_ids = kv_ids = None
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        q_ids, kv_ids = jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)
    ring = _Ring(axis_name=axis_name, causal=causal, kernel_args=tuple(sorted(kernel_args.items())))
    out, lse = _ring(ring, q, k, v, q_ids, kv_ids)
    return (out, lse) if return_lse else out
