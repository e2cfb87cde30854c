"""Every Hopper (Mosaic GPU) kernel lowers for sm90, checked on a CPU-only machine.

Interpret mode and Mosaic GPU's CPU simulator never run the Mosaic GPU lowering (wgmma, register
layouts, swizzled TMA tiles), so without this file a change that breaks the default fast path on
H100/H200 would pass `make test`. `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs
Pallas' lowering of each kernel to a Mosaic GPU MLIR module, with its layout inference and
verification, for compute capability 9.0 (what Mosaic GPU assumes when the default device reports
none: `jax.experimental.mosaic.gpu.core._infer_arch`). The passes after that (to PTX) run only when
XLA compiles on a GPU: that part is left to the `gpu` tests. Inputs are abstract (no memory, no run);
a case takes about a second.

Each entry of KERNELS is one way into the Hopper kernels with the custom calls its lowering must
contain; a new kernel is one more entry, or a changed count in an existing one.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention, flash_attention, tree_attention
from pallas_kernels.testing import random_tree

BF16, F16 = jnp.bfloat16, jnp.float16


def kernel_counts(lowered_text: str) -> dict[str, int]:
    """Custom calls in lowered StableHLO: Mosaic GPU kernels and Triton kernels (Pallas' Triton backend)."""
    return {"mosaic": len(re.findall(r"custom_call @mosaic_gpu\w*\(", lowered_text)),
            "triton": lowered_text.count("custom_call @__gpu$xla.gpu.triton(")}


def lower_for_sm90(fn, *abstract_args) -> dict[str, int]:
    lowered = jax.jit(fn).trace(*abstract_args).lower(lowering_platforms=("cuda",))
    return kernel_counts(lowered.as_text())


# -- FlashAttention ---------------------------------------------------------------------------------

FA_CASES = {  # (B, T, S, H, K, D, dtype), features: head dims 64 and 128, GQA/MQA, lengths off the tiles
    "d64-plain": ((1, 128, 128, 2, 2, 64, BF16), {}),
    "d128-causal-gqa": ((2, 200, 333, 8, 2, 128, BF16), dict(causal=True)),
    "d64-window-mqa-f16": ((1, 77, 129, 4, 1, 64, F16), dict(window_size=(40, 8))),
    "d128-causal-t>s": ((1, 130, 75, 4, 4, 128, BF16), dict(causal=True)),
    "d128-left-window-f16": ((1, 300, 517, 4, 2, 128, F16), dict(window_size=(100, -1))),
    "d64-causal-window-gqa": ((2, 96, 160, 6, 2, 64, BF16), dict(causal=True, window_size=(32, 0))),
    "d256-causal-gqa": ((1, 200, 300, 4, 2, 256, BF16), dict(causal=True)),
    "d256-plain-mqa": ((1, 77, 129, 4, 1, 256, BF16), {}),  # split-head-dim backward, padded keys
    "d256-window-segments-f16": ((2, 130, 200, 4, 2, 256, F16), dict(window_size=(40, 8), segments=True)),
    # segment ids (packed sequences): abstract [B, T] and [B, S] int32 arrays as two more arguments.
    # Alone (the id mask without a position mask), with a causal band and padding, with a window.
    "d64-segments": ((2, 128, 128, 2, 2, 64, BF16), dict(segments=True)),
    "d128-causal-gqa-segments": ((2, 200, 333, 8, 2, 128, BF16), dict(causal=True, segments=True)),
    "d64-window-mqa-segments-f16": ((1, 77, 129, 4, 1, 64, F16), dict(window_size=(40, 8), segments=True)),
    # logit softcapping (tanh on every score tile, and its derivative in both backward kernels)
    "d64-softcap": ((1, 128, 128, 2, 2, 64, BF16), dict(softcap=5.0)),
    "d128-causal-gqa-softcap": ((2, 200, 333, 8, 2, 128, BF16), dict(causal=True, softcap=30.0)),
    "d64-window-segments-softcap-f16": ((1, 77, 129, 4, 1, 64, F16),
                                        dict(window_size=(40, 8), segments=True, softcap=20.0)),
    "d256-causal-softcap": ((1, 200, 300, 4, 2, 256, BF16), dict(causal=True, softcap=50.0)),
}


def _fa_forward(features):
    return functools.partial(flash_attention, backend="mosaic", interpret=False, return_lse=True, **features)


def _fa_forward_backward(features, backend="mosaic", deterministic=True):
    attention = functools.partial(flash_attention, backend=backend, interpret=False,
                                  deterministic=deterministic, **features)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(do)
    return fwd_bwd


KERNELS = {  # name -> (builder of the lowered function, the custom calls its lowering holds)
    "fa2-forward": (_fa_forward, {"mosaic": 1, "triton": 0}),
    # The Hopper forward, then the Hopper dK/dV and dQ kernels.
    "fa2-forward+backward": (_fa_forward_backward, {"mosaic": 3, "triton": 0}),
    # The Hopper forward, then the portable backward (dK/dV and dQ, Triton).
    "fa2-forward+portable-backward": (
        functools.partial(_fa_forward_backward, backend=("mosaic", "portable")), {"mosaic": 1, "triton": 2}),
    # The Hopper forward, then one dK/dV kernel that also adds dQ by TMA reduce-add.
    "fa2-forward+atomic-backward": (
        functools.partial(_fa_forward_backward, deterministic=False), {"mosaic": 2, "triton": 0}),
}


def test_atomic_dq_switch_falls_back_to_the_dq_kernel(monkeypatch):
    """FA2JAX_ATOMIC_DQ=0 (the switch for a jax that breaks the reduce-add mode) gives the dQ kernel
    back: 3 Mosaic kernels where `deterministic=False` lowers 2; a value other than 0/1 is refused."""
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), BF16)
    monkeypatch.setenv("FA2JAX_ATOMIC_DQ", "0")  # a fresh function per setting: jit caches traces
    assert lower_for_sm90(_fa_forward_backward({}, deterministic=False), q, q, q, q) == {"mosaic": 3, "triton": 0}
    monkeypatch.setenv("FA2JAX_ATOMIC_DQ", "yes")
    with pytest.raises(ValueError, match="FA2JAX_ATOMIC_DQ"):
        lower_for_sm90(_fa_forward_backward({}, deterministic=False), q, q, q, q)


def _with_segment_ids(build, features):
    """The built function with the segment ids (q_ids, kv_ids) as its last two arguments."""
    def fn(*args):
        *arrays, q_ids, kv_ids = args
        return build(dict(features, segment_ids=(q_ids, kv_ids)))(*arrays)
    return fn


@pytest.mark.parametrize("case", list(FA_CASES))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_flash_attention_mosaic_lowers_for_sm90(kernel, case):
    (B, T, S, H, K, D, dtype), features = FA_CASES[case]
    build, expected = KERNELS[kernel]
    q = jax.ShapeDtypeStruct((B, T, H, D), dtype)
    kv = jax.ShapeDtypeStruct((B, S, K, D), dtype)
    args = (q, kv, kv, q) if kernel.endswith("backward") else (q, kv, kv)
    if D > 128 and kernel == "fa2-forward+atomic-backward":
        expected = {"mosaic": 3, "triton": 0}  # no reduce-add dQ at D=256: the deterministic dQ kernel runs
    if D > 128 and features.get("softcap") and kernel in ("fa2-forward+backward", "fa2-forward+atomic-backward"):
        expected = {"mosaic": 1, "triton": 2}  # the D=256 backward lacks softcap: backend="mosaic" runs the portable one
    fn = build(features)
    if features.get("segments"):
        features = {name: value for name, value in features.items() if name != "segments"}
        fn = _with_segment_ids(build, features)
        args += (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, S), jnp.int32))
    assert lower_for_sm90(fn, *args) == expected


@pytest.mark.parametrize("case", ["d128-causal-gqa", "d256-causal-gqa", "d256-plain-mqa", "d256-window-segments-f16"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_mosaic_backward_lowers_with_warpgroup_semantics(monkeypatch, case, deterministic):
    """The backward also lowers under Mosaic GPU's warpgroup semantics, jax 0.11's default (0.10.2
    lowers by lanes unless told): there every scalar must be an ir.Value, which a run_state product
    breaks when a ref it reads has a constant index (the D=256 kernels on the H100 with jax 0.11.2)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.fa2 import mosaic_bwd

    lane_options = mosaic_bwd._kernel_options

    def warpgroup_options(interpret):
        options = lane_options(interpret)
        options["compiler_params"] = dataclasses.replace(
            options["compiler_params"], lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
        return options

    monkeypatch.setattr(mosaic_bwd, "_kernel_options", warpgroup_options)
    (B, T, S, H, K, D, dtype), features = FA_CASES[case]
    q, kv = jax.ShapeDtypeStruct((B, T, H, D), dtype), jax.ShapeDtypeStruct((B, S, K, D), dtype)
    build = functools.partial(_fa_forward_backward, deterministic=deterministic)
    fn, args = build(features), (q, kv, kv, q)
    if features.get("segments"):
        fn = _with_segment_ids(build, {name: value for name, value in features.items() if name != "segments"})
        args += (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, S), jnp.int32))
    # D=128 with deterministic=False: one dK/dV kernel that reduce-adds dQ; D=256: the deterministic dQ.
    expected = 2 if D == 128 and not deterministic else 3
    assert lower_for_sm90(fn, *args) == {"mosaic": expected, "triton": 0}


# -- the forward's scheduling variants (MosaicFwdConfig, issue 17) ---------------------------------
# Lowered through `mosaic_fwd.forward` (`flash_attention` runs the default config), each must lower
# and must change the kernel: its Mosaic GPU module (read before serialisation, without source
# locations) differs from the default config's for the same call.

FWD_VARIANTS = {
    "early-k-wait": dict(early_k_wait=True),
    "fenced-sum": dict(row_sum_order="fenced"),
    "sum-during-pv": dict(row_sum_order="during_pv"),
    "persistent": dict(persistent=True),
    "all": dict(persistent=True, early_k_wait=True, row_sum_order="fenced"),
    "serpentine": dict(persistent=True, serpentine=True),
}
FWD_VARIANT_CASES = {  # (D, causal, real length of a 256-row padded T = S, segment ids)
    "d64": (64, False, 256, False),
    "d64-causal-odd": (64, True, 249, False),
    "d128": (128, False, 256, False),
    "d128-causal-segments": (128, True, 256, True),
}


def _mosaic_modules(fn, *abstract_args) -> list[str]:
    """The Mosaic GPU modules of fn's sm90 lowering as text without locations (a line moved in the
    Python source does not change them). Read where Mosaic GPU serialises them: a private function,
    the same from jax 0.10 to 0.11."""
    from jax.experimental.mosaic.gpu import core

    modules = []
    serialise = core._run_serde_pass

    def capture(module, **kwargs):
        if kwargs.get("serialize"):
            modules.append(module.operation.get_asm(enable_debug_info=False))
        return serialise(module, **kwargs)

    core._run_serde_pass = capture
    try:
        lowered = jax.jit(fn).trace(*abstract_args).lower(lowering_platforms=("cuda",))
    finally:
        core._run_serde_pass = serialise
    assert kernel_counts(lowered.as_text()) == {"mosaic": len(modules), "triton": 0}
    return modules


@functools.lru_cache(maxsize=None)
def _fwd_variant_modules(case, variant_name):
    from pallas_kernels.fa2 import mosaic_fwd

    D, causal, length, segments = FWD_VARIANT_CASES[case]
    B, T, H, K = 2, 256, 4, 2
    problem = mosaic_fwd.MosaicProblem(q_len=length, kv_len=length, q_offset=0, window_left=-1,
                                       window_right=0 if causal else -1, sm_scale=D ** -0.5, group_size=H // K)
    config = mosaic_fwd.MosaicFwdConfig(**(FWD_VARIANTS[variant_name] if variant_name else {}))
    args = (jax.ShapeDtypeStruct((B, T, H, D), BF16),) + (jax.ShapeDtypeStruct((B, T, K, D), BF16),) * 2
    if segments:
        args += (jax.ShapeDtypeStruct((B, T), jnp.int32),) * 2

    def fn(q, k, v, *ids):
        return mosaic_fwd.forward(q, k, v, tuple(ids) or None, problem=problem, config=config)
    return tuple(_mosaic_modules(fn, *args))


@pytest.mark.parametrize("case", list(FWD_VARIANT_CASES))
@pytest.mark.parametrize("variant", list(FWD_VARIANTS))
def test_forward_variants_lower_for_sm90(variant, case):
    ours = _fwd_variant_modules(case, variant)
    assert len(ours) == 1
    assert ours != _fwd_variant_modules(case, None), f"{variant} lowers to the default kernel"
    if variant == "serpentine":
        assert ours != _fwd_variant_modules(case, "persistent"), "serpentine lowers to the plain persistent kernel"


# -- three consumer warpgroups (MosaicFwdConfig.consumers=3: FA3's 192-row CTA at D=64) -------------
# Through `flash_attention` with the config, so that the API's padding (a multiple of 192 rows and of
# the key tile, joined with the backward's tiles) is part of the check; odd lengths everywhere.

THREE_CONSUMER_CASES = {  # (T, S, causal), MosaicFwdConfig fields beside consumers=3
    "kv128-turns": ((377, 377, False), dict(block_kv=128)),
    "kv128-causal-turns-s3": ((377, 500, True), dict(block_kv=128, num_stages=3)),
    "kv192-causal-no-ping-pong": ((200, 377, True), dict(block_kv=192, ping_pong=False)),
    "kv192-turns": ((377, 377, False), dict(block_kv=192)),
    "kv192-causal-persistent-early-k": ((377, 377, True), dict(block_kv=192, persistent=True, early_k_wait=True)),
}


@pytest.mark.parametrize("case", list(THREE_CONSUMER_CASES))
def test_three_consumer_forward_lowers_for_sm90(case):
    from pallas_kernels.fa2.mosaic_fwd import MosaicFwdConfig

    (T, S, causal), fields = THREE_CONSUMER_CASES[case]
    config = MosaicFwdConfig(consumers=3, **fields)
    q = jax.ShapeDtypeStruct((1, T, 4, 64), BF16)
    kv = jax.ShapeDtypeStruct((1, S, 2, 64), BF16)
    fn = functools.partial(flash_attention, backend="mosaic", interpret=False, return_lse=True, causal=causal,
                           mosaic_configs=(config, None))
    assert lower_for_sm90(fn, q, kv, kv) == {"mosaic": 1, "triton": 0}


def test_three_consumer_forward_lowers_with_the_mosaic_backward():
    """The backward's kernels on the rows the 3-consumer forward pads to: lcm(192, theirs), 768 for
    T=500 and S=550 (576, the next multiple of 192, is no multiple of the backward's 128)."""
    from pallas_kernels.fa2.mosaic_fwd import MosaicFwdConfig

    q = jax.ShapeDtypeStruct((1, 500, 2, 64), BF16)
    kv = jax.ShapeDtypeStruct((1, 550, 2, 64), BF16)
    build = functools.partial(_fa_forward_backward, backend="mosaic")
    fn = build(dict(causal=True, mosaic_configs=(MosaicFwdConfig(consumers=3, block_kv=192), None)))
    assert lower_for_sm90(fn, q, kv, kv, q) == {"mosaic": 3, "triton": 0}


# -- tree and decode attention ----------------------------------------------------------------------

TREE_CASES = {  # (B, N, H, K, D, S, dtype), keyword arguments, Triton kernels (the split merge)
    # a tree that starts mid-tile, one split: no merge
    "n21-d64-one-split": ((2, 21, 4, 2, 64, 300, BF16), dict(num_splits=1), 0),
    # several splits: their partial results merge in one Triton kernel
    "n21-d64-three-splits": ((2, 21, 4, 2, 64, 304, BF16), dict(num_splits=3), 1),
    # two node blocks per head pair, head dim 128
    "n100-d128-f16": ((1, 100, 4, 1, 128, 400, F16), dict(num_splits=2), 1),
    # the verification shape (H=32, K=8, N=64) with the split heuristic (4 splits at 132 SMs), a
    # cache that is no multiple of 8 (copied with padding)
    "n64-d128-gqa4-heuristic": ((2, 64, 32, 8, 128, 1101, BF16), {}, 1),
    # the whole sequence shorter than one 128-key tile
    "n8-d64-short-cache": ((2, 8, 2, 1, 64, 100, BF16), dict(num_splits=1), 0),
    # issue 18's H200 shape (two full node blocks, GQA 2), where NaN past the trees leaked
    "n128-d128-gqa2-issue18": ((2, 128, 16, 8, 128, 2048, BF16), dict(num_splits=2), 1),
}


@pytest.mark.parametrize("traced_mask", [False, True], ids=["static-mask", "traced-mask"])
@pytest.mark.parametrize("case", list(TREE_CASES))
def test_tree_attention_mosaic_lowers_for_sm90(case, traced_mask):
    (B, N, H, K, D, S, dtype), kwargs, merges = TREE_CASES[case]
    q = jax.ShapeDtypeStruct((B, N, H, D), dtype)
    cache = jax.ShapeDtypeStruct((B, S, K, D), dtype)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    attention = functools.partial(tree_attention, backend="mosaic", interpret=False, **kwargs)
    if traced_mask:  # packed into bit words inside the jit, by XLA
        fn, mask = attention, (jax.ShapeDtypeStruct((B, N, N), jnp.bool_),)
    else:  # packed at trace time
        static = np.stack([random_tree(seed, N) for seed in range(B)])
        fn, mask = (lambda q, k, v, lengths: attention(q, k, v, lengths, static)), ()
    assert lower_for_sm90(fn, q, cache, cache, lengths, *mask) == {"mosaic": 1, "triton": merges}


@pytest.mark.parametrize("T,num_splits,merges", [(1, 1, 0), (1, 4, 1), (4, 2, 1)])
def test_decode_attention_mosaic_lowers_for_sm90(T, num_splits, merges):
    q = jax.ShapeDtypeStruct((2, T, 8, 128), BF16)
    cache = jax.ShapeDtypeStruct((2, 1024, 2, 128), BF16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    fn = functools.partial(decode_attention, backend="mosaic", interpret=False, num_splits=num_splits)
    assert lower_for_sm90(fn, q, cache, cache, lengths) == {"mosaic": 1, "triton": merges}


# -- the reduce-add dQ variants of the Hopper backward ----------------------------------------------
# `flash_attention` runs the default variant; the others (MosaicBwdConfig.dq_buffers, dq_chunks,
# dq_with_dkdv), compared by benchmarks/mosaic_bwd_sweep.py --atomic-variants, are lowered through
# `mosaic_bwd.backward` directly. Mosaic GPU's CPU simulator cannot run the reduce-add mode on jax 0.10.2 (a KeyError on the
# mutable dQ ref), so this lowering is their only CPU check.

# (dq_buffers, dq_chunks, dq_with_dkdv): every combination
ATOMIC_VARIANTS = [(b, c, w) for b in (1, 2) for c in (1, 2) for w in (False, True)]


def _lower_backward(config, D, segments=False, causal=True):
    from pallas_kernels.fa2 import mosaic_bwd, mosaic_fwd

    B, T, H, K = 1, 256, 4, 2
    problem = mosaic_fwd.MosaicProblem(q_len=T - 7, kv_len=T - 7, q_offset=0, window_left=-1,
                                       window_right=0 if causal else -1, sm_scale=D ** -0.5, group_size=H // K)
    q = jax.ShapeDtypeStruct((B, T, H, D), BF16)
    kv = jax.ShapeDtypeStruct((B, T, K, D), BF16)
    stats = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    args = (q, kv, kv, q, stats, stats)
    if segments:
        args += (jax.ShapeDtypeStruct((B, T), jnp.int32),) * 2

    def fn(q, k, v, do, lse2, delta, *ids):
        return mosaic_bwd.backward(q, k, v, do, lse2, delta, tuple(ids) or None, problem=problem, config=config)
    return lower_for_sm90(fn, *args)


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dq_buffers,dq_chunks,dq_with_dkdv", ATOMIC_VARIANTS)
def test_atomic_dq_variants_lower_for_sm90(dq_buffers, dq_chunks, dq_with_dkdv, D, segments):
    """Each variant lowers to one Mosaic kernel (dK/dV with the reduce-add dQ) where its shared
    memory fits; at D=128 a second whole f32 dQ partial buffer does not (280 KB > 227 KB), and the
    backward says so before Mosaic GPU does."""
    from pallas_kernels.fa2 import mosaic_bwd

    config = mosaic_bwd.MosaicBwdConfig(deterministic=False, dq_buffers=dq_buffers, dq_chunks=dq_chunks,
                                        dq_with_dkdv=dq_with_dkdv)
    need = mosaic_bwd.dkdv_smem_bytes(config, head_dim=D, itemsize=2, segments=segments)
    if need > mosaic_bwd.SMEM_LIMIT_BYTES:
        assert (D, dq_buffers, dq_chunks) == (128, 2, 1)
        with pytest.raises(ValueError, match="shared memory"):
            _lower_backward(config, D, segments)
    else:
        assert _lower_backward(config, D, segments) == {"mosaic": 1, "triton": 0}


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
@pytest.mark.parametrize("dq_buffers", [1, 2])
def test_split_dq_variant_lowers_for_sm90(dq_buffers, segments):
    """dq_split (each consumer reduce-adds half of dQ's columns over both consumers' keys) lowers at
    D=128, and refuses D=64 (a half would be 32 columns, less than one swizzle span) by name."""
    from pallas_kernels.fa2 import mosaic_bwd

    config = mosaic_bwd.MosaicBwdConfig(deterministic=False, dq_buffers=dq_buffers, dq_split=True)
    assert _lower_backward(config, 128, segments) == {"mosaic": 1, "triton": 0}
    with pytest.raises(ValueError, match="dq_split"):
        _lower_backward(config, 64, segments)


def test_smem_estimate_is_a_lower_bound_of_mosaic_count(monkeypatch):
    """With our check off, Mosaic GPU refuses the D=128 double-buffered kernel by its own count,
    which our estimate does not exceed (it leaves out barriers and alignment): the check refuses
    nothing that would fit."""
    from pallas_kernels.fa2 import mosaic_bwd

    config = mosaic_bwd.MosaicBwdConfig(deterministic=False, dq_buffers=2)
    monkeypatch.setattr(mosaic_bwd, "SMEM_LIMIT_BYTES", 10 ** 9)
    with pytest.raises(Exception, match=r"smem_bytes=(\d+)") as error:
        _lower_backward(config, 128)
    counted = int(re.search(r"smem_bytes=(\d+)", str(error.value)).group(1))
    estimate = mosaic_bwd.dkdv_smem_bytes(config, head_dim=128, itemsize=2, segments=False)
    assert estimate <= counted < estimate + 1024, (estimate, counted)


@pytest.mark.parametrize("kwargs", [dict(dq_buffers=0), dict(dq_buffers=1.5), dict(dq_with_dkdv=1),
                                    dict(dq_chunks=3), dict(dq_chunks=2, deterministic=True),
                                    dict(dq_buffers=2, deterministic=True),
                                    dict(dq_with_dkdv=True, deterministic=True),
                                    dict(dq_split=1), dict(dq_split=True, deterministic=True),
                                    dict(dq_split=True, dq_chunks=2), dict(dq_split=True, dq_with_dkdv=True)])
def test_atomic_dq_variant_config_is_checked(kwargs):
    from pallas_kernels.fa2 import mosaic_bwd

    kwargs = dict(dict(deterministic=False), **kwargs)
    with pytest.raises((ValueError, TypeError), match="dq_"):
        mosaic_bwd.MosaicBwdConfig(**kwargs)
