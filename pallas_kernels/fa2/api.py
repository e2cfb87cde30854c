"""`flash_attention`: validation, padding, block-size choice, backend dispatch and the custom VJP.

The portable Pallas kernels (`triton_fwd`, `triton_bwd`) run on every backend: lowered through
Triton on NVIDIA GPUs, interpreted on CPU. On Hopper GPUs the calls they cover run the Mosaic GPU
kernels (`mosaic_fwd`, `mosaic_bwd`: wgmma, TMA, warp specialisation) with tiles from the tuning
cache or their per-head-dim defaults; both forwards leave the same residuals, so either backward can
follow either forward. Arbitrary T, S and D are handled here by padding T and S
to block multiples and D to a power of two (zeros; padded keys are masked in the kernel, padded
queries and head-dim columns are sliced away), so the kernels only ever see whole tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common.device import device_kind, on_hopper, resolve_interpret
from pallas_kernels.common.numerics import backward_lse, next_power_of_two
from pallas_kernels.fa2 import mosaic_bwd, mosaic_fwd, triton_bwd, triton_fwd
from pallas_kernels.fa2.arguments import AttentionProblem, validate
from pallas_kernels.fa2.block_sizes import (MIN_BLOCK, BlockSizes, feature_names, lookup_block_sizes,
                                            lookup_mosaic_bwd, lookup_mosaic_fwd)
from pallas_kernels.fa2.kernel_common import KernelSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Everything static about one call: the kernels are specialised (and cached) on it."""

    problem: AttentionProblem
    blocks: BlockSizes
    # The forward's padded lengths (multiples of its tiles), then the backward's: each direction
    # pads to its own kernels' tiles, as a 3-consumer forward's 192-row CTAs and a backward's 128-row
    # tiles would otherwise pad both to multiples of 384 (12% more rows at 2048).
    padded_q_len: int
    padded_kv_len: int
    bwd_padded_q_len: int
    bwd_padded_kv_len: int
    padded_head_dim: int
    interpret: bool
    # The Hopper forward's tiles, or None when the portable forward runs.
    mosaic_config: mosaic_fwd.MosaicFwdConfig | None = None
    # The Hopper backward's tiles, or None when the portable backward runs.
    mosaic_bwd_config: mosaic_bwd.MosaicBwdConfig | None = None

    def for_backward(self) -> "_Launch":
        """This launch with the backward's padded lengths in the forward's fields, which the padding
        and extras helpers read."""
        return dataclasses.replace(self, padded_q_len=self.bwd_padded_q_len,
                                   padded_kv_len=self.bwd_padded_kv_len)

    @property
    def kernel_spec(self) -> KernelSpec:
        problem = self.problem
        return KernelSpec(
            mask_config=problem.mask_config,
            sm_scale=problem.sm_scale,
            num_heads=problem.num_heads,
            group_size=problem.group_size,
            dropout_rate=problem.dropout_rate,
            kv_padded=self.padded_kv_len != problem.kv_len,
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x, axis: int, size: int, mode: str = "constant", value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    if mode == "constant":
        return jnp.pad(x, widths, constant_values=value)
    return jnp.pad(x, widths, mode=mode)


def _tile_table(q_segments, kv_segments, mask, block_q: int, block_k: int):
    """int32 [Bt, Ht, nq, nk]: 1 where a tile may hold an attending pair, 0 where it surely holds none.

    Segments: a tile can only match if the id ranges of its query rows and key columns overlap.
    Dense mask: a tile with no True entry is skipped. Both are conservative (never skip a live tile).
    """
    table = None
    if q_segments is not None:
        B = q_segments.shape[0]
        q_blocks = q_segments.reshape(B, -1, block_q)
        k_blocks = kv_segments.reshape(B, -1, block_k)
        q_lo, q_hi = q_blocks.min(-1), q_blocks.max(-1)  # [B, nq]
        k_lo, k_hi = k_blocks.min(-1), k_blocks.max(-1)  # [B, nk]
        table = ((q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None]))[:, None]
    if mask is not None:
        Bm, Hm, Tp, Sp = mask.shape
        any_live = mask.reshape(Bm, Hm, Tp // block_q, block_q, Sp // block_k, block_k).any(axis=(3, 5))
        table = any_live if table is None else table & any_live
    return table.astype(jnp.int32)


def _padded_segment_ids(launch: _Launch, aux: dict):
    """(q_ids [B, Tp], kv_ids [B, Sp]) int32, or None without segment ids.

    Edge padding keeps the per-tile id ranges tight. A padded id may equal a real one, which is
    harmless in every kernel: padded keys are masked by position (k >= kv_len), and padded query
    rows are sliced away, their zero output-gradients adding nothing to dK/dV.
    """
    if aux.get("segment_ids") is None:
        return None
    q_ids, kv_ids = aux["segment_ids"]
    return (_pad_axis(q_ids, 1, launch.padded_q_len, mode="edge"),
            _pad_axis(kv_ids, 1, launch.padded_kv_len, mode="edge"))


def _prepare_extras(launch: _Launch, aux: dict, block_q: int, block_k: int):
    """Kernel inputs beyond q/k/v (padded), and the KernelSpec flags that go with them."""
    problem, spec = launch.problem, launch.kernel_spec
    Tp, Sp = launch.padded_q_len, launch.padded_kv_len
    extras = {}
    q_segments = kv_segments = mask = None
    if aux.get("segment_ids") is not None:
        q_segments, kv_segments = _padded_segment_ids(launch, aux)
        extras["q_segments"], extras["kv_segments"] = q_segments, kv_segments
        spec = dataclasses.replace(spec, has_segments=True)
    if aux.get("alibi") is not None:
        extras["alibi"] = aux["alibi"].reshape(-1)  # [B * H], read at b * H + h
        spec = dataclasses.replace(spec, has_alibi=True)
    if aux.get("mask") is not None:
        mask = _pad_axis(_pad_axis(aux["mask"], 2, Tp), 3, Sp)
        extras["mask"] = mask.astype(jnp.int8)
        spec = dataclasses.replace(spec, mask_heads=mask.shape[1], mask_batched=mask.shape[0] > 1)
    if q_segments is not None or mask is not None:
        tiles = _tile_table(q_segments, kv_segments, mask, block_q, block_k)
        extras["tiles"] = tiles
        spec = dataclasses.replace(spec, tile_heads=tiles.shape[1], tile_batched=tiles.shape[0] > 1)
    if problem.dropout_rate > 0:
        extras["seed"] = jnp.asarray(aux["seed"], jnp.int32).reshape(1)
    return extras, spec


def _pad_qkv(launch: _Launch, q, k, v):
    Dp = launch.padded_head_dim
    q = _pad_axis(_pad_axis(q, 3, Dp), 1, launch.padded_q_len)
    k = _pad_axis(_pad_axis(k, 3, Dp), 1, launch.padded_kv_len)
    v = _pad_axis(_pad_axis(v, 3, Dp), 1, launch.padded_kv_len)
    return q, k, v


def _mosaic_problem(problem: AttentionProblem) -> mosaic_fwd.MosaicProblem:
    config = problem.mask_config
    left, right = config.left_limit, config.right_limit
    return mosaic_fwd.MosaicProblem(
        q_len=problem.q_len, kv_len=problem.kv_len, q_offset=problem.kv_len - problem.q_len,
        window_left=-1 if left is None else left, window_right=-1 if right is None else right,
        sm_scale=problem.sm_scale,
        group_size=problem.group_size,
        softcap=problem.mask_config.softcap)


def _forward(q, k, v, aux, launch: _Launch):
    problem, blocks = launch.problem, launch.blocks
    qp, kp, vp = _pad_qkv(launch, q, k, v)
    if launch.mosaic_config is not None:
        out, lse = mosaic_fwd.forward(qp, kp, vp, _padded_segment_ids(launch, aux),
                                      problem=_mosaic_problem(problem), config=launch.mosaic_config,
                                      interpret=launch.interpret)
        return out[:, :problem.q_len, :, :problem.head_dim], lse
    extras, spec = _prepare_extras(launch, aux, blocks.block_q, blocks.block_k)
    out, lse = triton_fwd.forward(
        qp, kp, vp, extras, spec=spec, block_q=blocks.block_q, block_k=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=launch.interpret)
    out = out[:, :problem.q_len, :, :problem.head_dim]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, aux, launch: _Launch):
    out, lse = _forward(q, k, v, aux, launch)
    return out, lse[:, :, :launch.problem.q_len]


def _flash_fwd(q, k, v, aux, launch: _Launch):
    out, lse = _forward(q, k, v, aux, launch)
    return (out, lse[:, :, :launch.problem.q_len]), (q, k, v, aux, out, lse)


def _flash_bwd(launch: _Launch, residuals, cotangents):
    q, k, v, aux, out, lse = residuals
    dout, dlse = cotangents
    launch = launch.for_backward()
    problem, blocks = launch.problem, launch.blocks
    # FA2 preprocess: delta = rowsum(dO * O). A cotangent on the returned lse adds P * dlse to dS,
    # which is the same as subtracting it from delta.
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta = _pad_axis(delta - dlse.astype(jnp.float32), 2, launch.padded_q_len)
    # lse comes at the forward's padded length (or the real one, from `backward`). Padded query rows
    # get lse = -inf, which `backward_lse` turns into P = 0: they add nothing.
    T = problem.q_len
    lse = backward_lse(_pad_axis(lse[:, :, :T], 2, launch.padded_q_len, value=-jnp.inf))
    qp, kp, vp = _pad_qkv(launch, q, k, v)
    dop = _pad_qkv(launch, dout.astype(q.dtype), k, v)[0]
    D, S = problem.head_dim, problem.kv_len
    # Segment ids, slopes, mask and seed are not differentiated (integers, booleans, or by choice).
    aux_cotangent = jax.tree.map(lambda _: None, aux)
    if launch.mosaic_bwd_config is not None:
        dq, dk, dv = mosaic_bwd.backward(qp, kp, vp, dop, lse, delta, _padded_segment_ids(launch, aux),
                                         problem=_mosaic_problem(problem), config=launch.mosaic_bwd_config,
                                         interpret=launch.interpret)
        return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D], aux_cotangent
    extras_dkdv, spec = _prepare_extras(launch, aux, blocks.block_q_dkv, blocks.block_k_dkv)
    extras_dq, _ = _prepare_extras(launch, aux, blocks.block_q_dq, blocks.block_k_dq)
    dq, dk, dv = triton_bwd.backward(
        qp, kp, vp, dop, lse, delta, extras_dkdv, extras_dq, spec=spec,
        block_q_dkv=blocks.block_q_dkv, block_k_dkv=blocks.block_k_dkv,
        block_q_dq=blocks.block_q_dq, block_k_dq=blocks.block_k_dq,
        num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd, interpret=launch.interpret)
    return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D], aux_cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


BACKENDS = ("portable", "mosaic")
# Features the Hopper kernels cover but that the automatic choice does not send to them yet:
# backend="mosaic" reaches them. Segment ids pass the `gpu` tests (H100, jax 0.11.2: forward and both
# dQ modes), but a packed target-1b train step (512-token documents) through them did not finish
# within 110 s on that GPU (the same step on the portable kernels: 0.15 s); until that is understood
# (benchmarks/stall_probe.py), packed calls stay on the portable kernels. Softcap is in the Hopper
# kernels and checked in the CPU simulator and the sm90 lowering only; no GPU run has validated it
# (tanh lowers to tanh.approx there).
NOT_YET_ON_GPU: frozenset[str] = frozenset({"segments", "softcap"})


def _split_backend(backend):
    """backend -> (forward, backward) choices: one name for both, or a (forward, backward) pair."""
    pair = tuple(backend) if isinstance(backend, (tuple, list)) else (backend, backend)
    if len(pair) != 2 or any(b is not None and b not in BACKENDS for b in pair):
        raise ValueError(f"backend must be one of {BACKENDS}, None, or a (forward, backward) pair of "
                         f"those; got {backend=}")
    return pair


def _log_fallback(direction: str, problem: AttentionProblem, features) -> None:
    logger.info("flash_attention %s: the portable kernel runs (the Hopper kernel does not cover or "
                "is not preferred for dtype=%s, head_dim=%d, features=%s)", direction, problem.dtype,
                problem.head_dim, features)


def _tuning_kind(interpret: bool) -> str:
    """The device kind the tuning cache is read under ("cpu" in interpret mode)."""
    return "cpu" if interpret else device_kind()


def _choose_mosaic(backend, problem: AttentionProblem, features, interpret: bool, config=None):
    """The Hopper forward's config when it runs this call, else None: `config` when given (the
    autotuner's candidate), else the tuning cache's entry or the default tiles for the head dim."""
    backend = _split_backend(backend)[0]
    covered = mosaic_fwd.supports(dtype=problem.dtype, head_dim=problem.head_dim, features=features)
    if config is not None and backend == "portable":
        raise ValueError(f"mosaic_configs gives a Hopper forward config but the backend forces the portable "
                         f"forward: {backend=}, {config=}")
    if backend == "mosaic" or config is not None:
        if not covered:
            raise ValueError(
                f"backend='mosaic' covers bf16/f16, head dim 64, 128 or 256, causal, window, segment ids "
                f"and softcap only; got "
                f"dtype={problem.dtype}, head_dim={problem.head_dim}, features={features}")
        return config or lookup_mosaic_fwd(_tuning_kind(interpret), problem.dtype, problem.head_dim, features)
    if backend is None and not interpret and on_hopper():
        if covered and mosaic_fwd.preferred(head_dim=problem.head_dim) and not NOT_YET_ON_GPU & set(features):
            return lookup_mosaic_fwd(_tuning_kind(interpret), problem.dtype, problem.head_dim, features)
        _log_fallback("forward", problem, features)
    return None


def _choose_mosaic_bwd(backend, problem: AttentionProblem, features, interpret: bool, deterministic: bool = True,
                       config=None):
    """The Hopper backward's config when it runs this call's backward, else None: `config` when given
    (the autotuner's candidate), else the tuning cache's entry for the dQ mode `deterministic` asks
    for, or the default tiles of that mode."""
    strict = isinstance(backend, (tuple, list)) or config is not None  # the backward's kernel is named
    backend = _split_backend(backend)[1]
    covered = mosaic_bwd.supports(dtype=problem.dtype, head_dim=problem.head_dim, features=features)
    if config is not None:
        if backend == "portable":
            raise ValueError(f"mosaic_configs gives a Hopper backward config but the backend forces the "
                             f"portable backward: {backend=}, {config=}")
        if config.deterministic != deterministic:
            raise ValueError(f"mosaic_configs' backward config has {config.deterministic=}, the call asks "
                             f"{deterministic=}")
        backend = "mosaic"
    if backend == "mosaic" and not strict and not covered:
        # backend="mosaic" forces the Hopper forward; a backward it lacks (e.g. D=256 softcap) is portable.
        _log_fallback("backward", problem, features)
        return None
    if backend == "mosaic":
        if not covered:
            raise ValueError(
                f"backend='mosaic' (backward) covers bf16/f16, head dim 64 or 128 (causal, window, "
                f"segment ids and softcap) or 256 (the same less softcap) only; got dtype={problem.dtype}, "
                f"head_dim={problem.head_dim}, features={features}")
        return config or _tuned_mosaic_bwd(problem, features, interpret, deterministic)
    if backend is None and not interpret and on_hopper():
        if (covered and mosaic_bwd.preferred(head_dim=problem.head_dim)
                and not NOT_YET_ON_GPU & set(features)):
            return _tuned_mosaic_bwd(problem, features, interpret, deterministic)
        _log_fallback("backward", problem, features)
    return None


def _tuned_mosaic_bwd(problem: AttentionProblem, features, interpret: bool, deterministic: bool):
    """The cached (or default) backward config of the dQ mode asked for. deterministic=False is the
    caller's opt-in: only then may a reduce-add config be chosen, from its own cache section."""
    if not deterministic and not mosaic_bwd.atomic_dq_available():
        logger.info("flash_attention backward: deterministic=False asked for, but %s=0 turns the "
                    "reduce-add dQ kernel off; the deterministic dQ kernel runs", mosaic_bwd.ATOMIC_DQ_ENV)
        deterministic = True
    if not deterministic and problem.head_dim > 128:
        logger.info("flash_attention backward: the reduce-add dQ mode has no head dim %d kernel; the "
                    "deterministic kernels run", problem.head_dim)
        deterministic = True
    return lookup_mosaic_bwd(_tuning_kind(interpret), problem.dtype, problem.head_dim, features, deterministic)


def flash_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    segment_ids=None,
    softcap: float = 0.0,
    alibi_slopes: jax.Array | None = None,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_seed=None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | tuple[str | None, str | None] | None = None,
    deterministic: bool = True,
    mosaic_configs: tuple | None = None,
):
    """FlashAttention-2, forward and backward, as Pallas kernels.

    Args:
      q: [B, T, H, D] queries; k, v: [B, S, K, D] with H % K == 0 (GQA/MQA without repeating K/V).
        float32, bfloat16 or float16; D in 1..256; any T, S >= 1.
      causal: query i sees keys j <= i + S - T (bottom-right aligned when T != S).
      sm_scale: softmax scale, default 1/sqrt(D).
      window_size: (left, right): i + S - T - left <= j <= i + S - T + right; -1 = unbounded.
      segment_ids: (q_ids [B, T], kv_ids [B, S]) int, or one [B, T] array when T == S; pairs attend
        only within equal ids.
      softcap: > 0 replaces scores s by softcap * tanh(s / softcap).
      alibi_slopes: [H] or [B, H] float32; adds -slope * |i + S - T - j| to the scores.
      mask: bool [B|1, H|1, T, S]; False pairs do not attend; all-False tiles are skipped.
      dropout_rate, dropout_seed: dropout on the probabilities, generated in-kernel from a hash of
        (seed, batch, head, query, key); the same seed gives the same mask forward and backward.
      return_lse: also return the logsumexp [B, H, T] float32 (natural log; -inf for a fully
        masked row). Gradients flow through it.
      block_sizes: a `BlockSizes`; None looks up the tuning cache or the heuristic.
      interpret: run the kernels in interpret mode; None = True off GPU.
      deterministic: True sums dQ in a fixed order (bitwise reproducible). False lets the Hopper
        backward add dQ partials from its dK/dV kernel with TMA reduce-add (one kernel less; the
        order of additions varies between runs). The portable backward is deterministic always.
        On Hopper the kernels' tiles come from the tuning cache (`tuning.autotune_mosaic`), per dQ
        mode: a deterministic call never gets a reduce-add config.
      mosaic_configs: (MosaicFwdConfig | None, MosaicBwdConfig | None): the Hopper kernels' configs
        for this call instead of the tuning cache's (what the autotuner times); a config given runs
        its direction on the Hopper kernel (backend "portable" for that direction is an error); the
        backward's `deterministic` must equal the call's.
      backend: "portable" (the Triton/interpret kernels), "mosaic" (the Hopper kernels; raises
        ValueError for a forward they do not cover, runs the portable backward with a log line
        where the Hopper backward lacks the call, e.g. head dim 256 with softcap), None: "mosaic" on Hopper
        GPUs where it covers the call, else "portable" with one log line naming the reason; or a
        (forward, backward) pair of those choices, each forced strictly.

    Returns:
      out [B, T, H, D] in q's dtype (zeros for fully masked rows), and lse when `return_lse`.

    Raises:
      ValueError: for any malformed argument (a zero-size dimension, a non-finite softcap or
        sm_scale, ...), before a kernel is built.
      TypeError: for an argument of the wrong kind: a window entry that is not an int (1.5 is not
        truncated), or a traced softcap, sm_scale or dropout_rate (the kernels are specialised on
        them: under jit, pass them as static values, e.g. through functools.partial).
    """
    launch, aux = plan(q, k, v, causal=causal, sm_scale=sm_scale, window_size=window_size, segment_ids=segment_ids,
                       softcap=softcap, alibi_slopes=alibi_slopes, mask=mask, dropout_rate=dropout_rate,
                       dropout_seed=dropout_seed, block_sizes=block_sizes, interpret=interpret, backend=backend,
                       deterministic=deterministic, mosaic_configs=mosaic_configs)
    out, lse = _flash(q, k, v, aux, launch)
    return (out, lse) if return_lse else out


def plan(q, k, v, *, causal: bool = False, sm_scale: float | None = None, window_size=(-1, -1), segment_ids=None,
         softcap: float = 0.0, alibi_slopes=None, mask=None, dropout_rate: float = 0.0, dropout_seed=None,
         block_sizes: BlockSizes | None = None, interpret: bool | None = None, backend=None,
         deterministic: bool = True, mosaic_configs: tuple | None = None) -> tuple[_Launch, dict]:
    """Validates one call of `flash_attention` (same arguments) and fixes everything static about it.

    Returns:
      (launch, aux): the static launch (hashable) and the call's non-differentiated arrays, for
      `forward` and `backward`, which callers composing attention from blocks use (ring.py).
    """
    problem, segment_ids, alibi_slopes, mask = validate(
        q, k, v, causal=causal, sm_scale=sm_scale, window_size=window_size,
        segment_ids=segment_ids, softcap=softcap, alibi_slopes=alibi_slopes, mask=mask,
        dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a pallas_kernels.BlockSizes or None, got {block_sizes=}")
    interpret = resolve_interpret(interpret)
    features = feature_names(causal=causal, window_size=window_size, segment_ids=segment_ids,
                             softcap=softcap, alibi_slopes=alibi_slopes, mask=mask,
                             dropout_rate=dropout_rate)
    if block_sizes is None:
        block_sizes = lookup_block_sizes(_tuning_kind(interpret), problem.dtype, problem.head_dim, features)
    blocks = block_sizes.fitted(problem.q_len, problem.kv_len)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic=}")
    fwd_config, bwd_config = _split_mosaic_configs(mosaic_configs)
    mosaic_config = _choose_mosaic(backend, problem, features, interpret, fwd_config)
    mosaic_bwd_config = _choose_mosaic_bwd(backend, problem, features, interpret, deterministic, bwd_config)
    # Each direction's row and key multiples: least common multiples, as a Hopper forward with 3
    # consumers covers 192 rows per CTA, which power-of-two tiles do not divide.
    if mosaic_config is not None:
        fwd_multiples = (mosaic_config.cta_rows, mosaic_config.block_kv)
    else:
        fwd_multiples = (blocks.block_q, blocks.block_k)
    if mosaic_bwd_config is not None:
        bwd_multiples = (mosaic_bwd_config.q_multiple, mosaic_bwd_config.kv_multiple)
    else:
        bwd_multiples = (math.lcm(blocks.block_q_dkv, blocks.block_q_dq),
                         math.lcm(blocks.block_k_dkv, blocks.block_k_dq))
    launch = _Launch(
        problem=problem,
        blocks=blocks,
        padded_q_len=_round_up(problem.q_len, fwd_multiples[0]),
        padded_kv_len=_round_up(problem.kv_len, fwd_multiples[1]),
        bwd_padded_q_len=_round_up(problem.q_len, bwd_multiples[0]),
        bwd_padded_kv_len=_round_up(problem.kv_len, bwd_multiples[1]),
        padded_head_dim=max(MIN_BLOCK, next_power_of_two(problem.head_dim)),
        interpret=interpret,
        mosaic_config=mosaic_config,
        mosaic_bwd_config=mosaic_bwd_config,
    )
    aux = {"segment_ids": segment_ids, "alibi": alibi_slopes, "mask": mask,
           "seed": None if problem.dropout_rate == 0 else jnp.asarray(dropout_seed, jnp.int32)}
    return launch, aux


def _split_mosaic_configs(mosaic_configs):
    """mosaic_configs -> (MosaicFwdConfig | None, MosaicBwdConfig | None), checked."""
    if mosaic_configs is None:
        return None, None
    pair = tuple(mosaic_configs) if isinstance(mosaic_configs, (tuple, list)) else ()
    if (len(pair) != 2 or not isinstance(pair[0], (mosaic_fwd.MosaicFwdConfig, type(None)))
            or not isinstance(pair[1], (mosaic_bwd.MosaicBwdConfig, type(None)))):
        raise TypeError(f"mosaic_configs must be None or a (MosaicFwdConfig | None, MosaicBwdConfig | None) "
                        f"pair, got {mosaic_configs=}")
    return pair


def forward(q, k, v, aux: dict, launch: _Launch):
    """The forward kernels of a planned call, without a VJP.

    Returns:
      out [B, T, H, D] in q's dtype, lse [B, H, T] float32 (natural log, -inf for a row that sees no key).
    """
    out, lse = _forward(q, k, v, aux, launch)
    return out, lse[:, :, :launch.problem.q_len]


def backward(q, k, v, aux: dict, launch: _Launch, out, lse, dout, dlse=None):
    """The backward kernels of a planned call, from the given output and logsumexp.

    `out` and `lse` need not be this call's own: FA2's backward only needs the row statistics
    P = exp(S - lse) and delta = rowsum(dO * O) - dlse, so passing the output and lse of a larger
    attention that this call is one key block of gives this block's share of that attention's
    gradients (ring attention's backward).

    Args:
      out [B, T, H, D]; lse [B, H, T] float32 natural log; dout [B, T, H, D]; dlse [B, H, T] or None.

    Returns:
      (dq, dk, dv) in the dtypes of q, k, v.
    """
    lse = lse.astype(jnp.float32)
    if dlse is None:
        dlse = jnp.zeros(lse.shape[:2] + (launch.problem.q_len,), jnp.float32)
    dq, dk, dv, _ = _flash_bwd(launch, (q, k, v, aux, out, lse), (dout, dlse))
    return dq, dk, dv
