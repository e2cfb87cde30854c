"""What the tests and the kernel benchmarks share: the timing helper, the random-input builders and
the error rule that judges a kernel against the f32 reference.

Needs only jax and numpy (no test or plotting packages), so both `tests/` and `benchmarks/` import it.
Axis letters: B batch, T query len, S key len / cache slots, H heads, K kv heads, D head dim, N tree
nodes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common.timing import median_time
from pallas_kernels.tree.reference import tree_visibility

__all__ = ["ancestor_mask", "attention_inputs", "median_time", "random_tree", "tree_attention_in_dtype",
           "tree_inputs", "within_xla_error"]


def attention_inputs(seed: int, B: int, T: int, S: int, H: int, K: int, D: int, dtype):
    """Standard-normal q [B, T, H, D], k and v [B, S, K, D] and a cotangent do [B, T, H, D], drawn in
    float32 and cast to dtype."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, do


def ancestor_mask(parents) -> np.ndarray:
    """bool [N, N] ancestor-or-self closure of a parent array (-1: a root)."""
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def random_tree(rng, num_nodes: int, num_padding: int = 0) -> np.ndarray:
    """Ancestor-or-self mask of a random tree on the first num_nodes - num_padding nodes (each parent
    index below its child's), then padding nodes that see only themselves.

    rng: a `numpy.random.Generator`, or an int seed for a fresh one.
    """
    rng = np.random.default_rng(rng)
    real = num_nodes - num_padding
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, real)] + [-1] * num_padding
    return ancestor_mask(parents[:num_nodes])


def tree_inputs(rng, *, B: int, N: int, H: int, K: int, D: int, S: int, dtype, lengths=None,
                poison: bool = True):
    """Random q [B, N, H, D], caches [B, S, K, D] and lengths [B] int32 for tree attention.

    lengths: committed tokens per row; None draws them in [0, S - N], with row 0 empty and row 1 (if
    any) full. poison: set the cache slots past each row's tree to NaN, which must never reach a
    result. rng: a `numpy.random.Generator` or an int seed.
    """
    rng = np.random.default_rng(rng)
    keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))), 3)
    q = jax.random.normal(keys[0], (B, N, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), jnp.float32).astype(dtype)
    if lengths is None:
        lengths = rng.integers(0, S - N + 1, size=B)
        lengths[0] = 0
        if B > 1:
            lengths[1] = S - N
    lengths = jnp.asarray(lengths, jnp.int32)
    if poison:
        unused = jnp.arange(S)[None, :] >= (lengths + N)[:, None]  # [B, S]
        k = jnp.where(unused[:, :, None, None], jnp.nan, k).astype(dtype)
        v = jnp.where(unused[:, :, None, None], jnp.nan, v).astype(dtype)
    return q, k, v, lengths


def tree_attention_in_dtype(q, k, v, lengths, mask, *, sm_scale=None, softcap=0.0):
    """Tree attention done by XLA in the input dtype: the error basis kernels are held to (2x its
    error against the float32 reference). Returns (out [B, N, H, D], lse [B, H, N])."""
    B, N, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    dtype = q.dtype
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    visible = tree_visibility(lengths, mask, S)  # [B, N, S]
    used = jnp.any(visible, axis=1)[:, :, None, None]
    k = jnp.where(used, k, jnp.zeros_like(k))
    v = jnp.where(used, v, jnp.zeros_like(v))
    scores = jnp.einsum("bnkgd,bskd->bkgns", q.reshape(B, N, K, H // K, D), k, preferred_element_type=dtype)
    scores = scores * jnp.asarray(sm_scale, dtype)
    if softcap > 0:
        scores = jnp.asarray(softcap, dtype) * jnp.tanh(scores / jnp.asarray(softcap, dtype))
    scores = jnp.where(visible[:, None, None], scores, jnp.asarray(-jnp.inf, dtype))
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgns,bskd->bnkgd", probs, v, preferred_element_type=dtype)
    return out.reshape(B, N, H, D), lse.reshape(B, H, N)


def within_xla_error(actual, exact, same_dtype, dtype) -> dict:
    """The project's tolerance: |actual - exact| <= 2 |xla_in_dtype - exact| + 16 ulp(dtype) * max|exact|
    (elementwise maxima), and actual all finite. Returns {"err", "xla_err", "floor", "finite", "ok"}."""
    actual, exact, same_dtype = (np.asarray(x, np.float32) for x in (actual, exact, same_dtype))
    err = float(np.max(np.abs(actual - exact)))
    base = float(np.max(np.abs(same_dtype - exact)))
    floor = 16 * float(jnp.finfo(dtype).eps) * max(1.0, float(np.max(np.abs(exact))))
    finite = bool(np.all(np.isfinite(actual)))
    return {"err": err, "xla_err": base, "floor": floor, "finite": finite,
            "ok": finite and err <= 2 * base + floor}
