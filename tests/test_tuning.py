"""The tuning cache's Mosaic sections, the API's choice of Hopper configs from it, and the Mosaic
autotuner's selection -- all on CPU: no kernel runs (the API is only planned, and the autotuner times
a fake attention with a fake timer)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.fa2 import api, block_sizes, tuning
from pallas_kernels.fa2.block_sizes import BlockSizes, cache_key
from pallas_kernels.fa2.mosaic_bwd import MosaicBwdConfig
from pallas_kernels.fa2.mosaic_fwd import MosaicFwdConfig

KIND = "Test Hopper 80GB"  # a device kind no shipped entry has
FWD = MosaicFwdConfig(block_q=128, block_kv=64, num_stages=3, early_k_wait=True, row_sum_order="fenced",
                      persistent=True, num_ctas=7)
BWD = MosaicBwdConfig(block_q_dq=128, num_stages=3)
BWD_ATOMIC = MosaicBwdConfig(num_stages=2, deterministic=False, dq_buffers=2, dq_chunks=2)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """(user cache path, shipped cache path), both empty files of this test."""
    user, shipped = tmp_path / "user.json", tmp_path / "shipped.json"
    monkeypatch.setenv(block_sizes.USER_CACHE_ENV, str(user))
    monkeypatch.setattr(block_sizes, "SHIPPED_CACHE", shipped)
    return user, shipped


def test_mosaic_sections_round_trip(caches):
    user, _ = caches
    key = cache_key(KIND, jnp.bfloat16, 64, ("causal",))
    block_sizes.save_tuned(key, {block_sizes.MOSAIC_FWD: FWD, block_sizes.MOSAIC_BWD: BWD,
                                 block_sizes.MEASURED: {"mosaic_fwd": {"jax_version": "x"}}})
    block_sizes.save_block_sizes(key, BlockSizes(block_q=64))  # another section: the others stay
    block_sizes.save_tuned(key, {block_sizes.MOSAIC_BWD_NONDETERMINISTIC: BWD_ATOMIC})
    entry = json.loads(user.read_text())[key]
    assert entry["mosaic_fwd"]["row_sum_order"] == "fenced" and entry["mosaic_fwd"]["num_ctas"] == 7
    sections = block_sizes.entry_sections(entry)
    assert sections[block_sizes.MOSAIC_FWD] == FWD
    assert sections[block_sizes.MOSAIC_BWD] == BWD
    assert sections[block_sizes.MOSAIC_BWD_NONDETERMINISTIC] == BWD_ATOMIC
    assert sections[block_sizes.BLOCK_SIZES] == BlockSizes(block_q=64)
    assert sections[block_sizes.MEASURED] == {"mosaic_fwd": {"jax_version": "x"}}
    assert block_sizes.lookup_mosaic_fwd(KIND, jnp.bfloat16, 64, ("causal",)) == FWD
    assert block_sizes.lookup_mosaic_bwd(KIND, jnp.bfloat16, 64, ("causal",)) == BWD
    assert block_sizes.lookup_mosaic_bwd(KIND, jnp.bfloat16, 64, ("causal",), deterministic=False) == BWD_ATOMIC


def test_first_format_entry_reads_as_block_sizes(caches):
    user, _ = caches
    key = cache_key(KIND, jnp.bfloat16, 128, ())
    user.write_text(json.dumps({key: dataclasses.asdict(BlockSizes(block_q=32))}))
    assert block_sizes.lookup_block_sizes(KIND, jnp.bfloat16, 128, ()) == BlockSizes(block_q=32)
    assert block_sizes.lookup_mosaic_fwd(KIND, jnp.bfloat16, 128, ()) == MosaicFwdConfig.for_head_dim(128)


@pytest.mark.parametrize("entry, names", [
    ({"mosaic_fwd": {"block_q": 64, "warp_count": 3}}, "warp_count"),
    ({"mosaic_bwd": {"num_stages": 2, "dq_ring": 2}}, "dq_ring"),
    ({"mosaic_fwd": {}, "mosaic_tiles": {}}, "mosaic_tiles"),
    ({"block_q": 64, "blok_k": 64}, "blok_k"),
    # a reduce-add config where deterministic calls look: refused, never handed to them
    ({"mosaic_bwd": {"deterministic": False}}, "mosaic_bwd_nondeterministic"),
])
def test_unknown_or_misplaced_fields_are_refused(caches, entry, names):
    user, _ = caches
    user.write_text(json.dumps({cache_key(KIND, jnp.bfloat16, 64, ()): entry}))
    for lookup in (block_sizes.lookup_mosaic_fwd, block_sizes.lookup_mosaic_bwd, block_sizes.lookup_block_sizes):
        with pytest.raises(ValueError, match=names):
            lookup(KIND, jnp.bfloat16, 64, ())


def test_shipped_cache_decodes():
    cache = json.loads(block_sizes.SHIPPED_CACHE.read_text())
    for key, entry in cache.items():
        sections = block_sizes.entry_sections(entry, key)
        assert all(c.deterministic for name, c in sections.items() if name == block_sizes.MOSAIC_BWD)


def test_banded_feature_sets_fall_back_to_the_causal_entry(tmp_path, monkeypatch):
    """The shipped H100 entries at D=128: the persistent forward in item order for the plain set and
    the sets without a band; with the early K wait and the serpentine order (measured faster under
    a causal band, where the plain order loads the low CTAs with the longest items) for every banded set."""
    monkeypatch.setenv(block_sizes.USER_CACHE_ENV, str(tmp_path / "none.json"))
    h100 = "NVIDIA H100 80GB HBM3"
    for features, banded in [((), False), (("softcap",), False), (("segments",), False), (("causal",), True),
                             (("window",), True), (("causal", "window"), True),
                             (("causal", "segments", "softcap"), True)]:
        config = block_sizes.lookup_mosaic_fwd(h100, jnp.bfloat16, 128, features)
        assert config.persistent and (config.serpentine, config.early_k_wait) == (banded, banded), features


def _plan(D=64, **kwargs):
    q = jnp.zeros((1, 300, 2, D), jnp.bfloat16)
    return api.plan(q, q, q, interpret=False, **kwargs)[0]


@pytest.fixture
def hopper(monkeypatch):
    """The API planning as on a Hopper GPU of kind KIND (plan launches nothing)."""
    monkeypatch.setattr(api, "on_hopper", lambda: True)
    monkeypatch.setattr(api, "device_kind", lambda: KIND)


def test_api_takes_cached_configs(caches, hopper):
    user, shipped = caches
    plain, causal = (cache_key(KIND, jnp.bfloat16, 64, f) for f in ((), ("causal",)))
    shipped_fwd = dataclasses.replace(FWD, num_ctas=9)
    block_sizes.save_tuned(plain, {block_sizes.MOSAIC_FWD: shipped_fwd, block_sizes.MOSAIC_BWD: BWD,
                                   block_sizes.MOSAIC_BWD_NONDETERMINISTIC: BWD_ATOMIC}, shipped)
    block_sizes.save_tuned(causal, {block_sizes.MOSAIC_FWD: FWD}, user)
    launch = _plan(causal=True)
    assert launch.mosaic_config == FWD  # the user's entry for the feature set first
    assert launch.mosaic_bwd_config == BWD  # the shipped plain entry: the user's has no backward
    assert launch.padded_q_len % (2 * FWD.block_q) == 0 and launch.padded_q_len % BWD.q_multiple == 0
    assert _plan().mosaic_config == shipped_fwd  # plain: only the shipped entry has one
    # deterministic=False is the caller's opt-in; only then does the reduce-add section count
    assert _plan(deterministic=False).mosaic_bwd_config == BWD_ATOMIC
    assert _plan(backend="mosaic").mosaic_bwd_config == BWD


def test_api_falls_back_to_the_defaults(caches, hopper, monkeypatch):
    launch = _plan(D=128, causal=True)
    assert launch.mosaic_config == MosaicFwdConfig.for_head_dim(128)
    assert launch.mosaic_bwd_config == MosaicBwdConfig.for_head_dim(128)
    atomic = _plan(D=128, deterministic=False).mosaic_bwd_config
    assert atomic == dataclasses.replace(MosaicBwdConfig.for_head_dim(128), deterministic=False, num_stages=2)
    block_sizes.save_tuned(cache_key(KIND, jnp.bfloat16, 128, ()),
                           {block_sizes.MOSAIC_BWD_NONDETERMINISTIC: BWD_ATOMIC}, caches[1])
    monkeypatch.setenv("FA2JAX_ATOMIC_DQ", "0")  # reduce-add switched off: the deterministic default
    assert _plan(D=128, deterministic=False).mosaic_bwd_config == MosaicBwdConfig.for_head_dim(128)


def test_api_takes_given_configs(caches, hopper):
    launch = _plan(mosaic_configs=(FWD, BWD_ATOMIC), deterministic=False)
    assert (launch.mosaic_config, launch.mosaic_bwd_config) == (FWD, BWD_ATOMIC)
    assert _plan(mosaic_configs=(None, BWD)).mosaic_config == MosaicFwdConfig.for_head_dim(64)
    with pytest.raises(ValueError, match="deterministic"):
        _plan(mosaic_configs=(None, BWD_ATOMIC))
    with pytest.raises(ValueError, match="portable"):
        _plan(mosaic_configs=(FWD, None), backend="portable")
    with pytest.raises(TypeError, match="mosaic_configs"):
        _plan(mosaic_configs=(BWD, FWD))


def test_candidates_fit_shared_memory():
    at_64, at_128 = tuning.mosaic_fwd_candidates(64), tuning.mosaic_fwd_candidates(128)
    # D=64: the three-consumer default, 16 two-consumer configs, then four more with three consumers
    # (the fifth, 128 keys in two stages, is the default)
    assert at_64[0] == MosaicFwdConfig.for_head_dim(64) and at_64[0].consumers == 3 and len(at_64) == 21
    assert [c.consumers for c in at_64[1:]] == [2] * 16 + [3] * 4 and all(c.consumers == 2 for c in at_128)
    # (64, 128, 3) with a persistent kernel's O slot needs 256 KB at D=128
    assert len(at_128) == 14 and not any(c.persistent and c.num_stages == 3 for c in at_128)
    bwd = tuning.mosaic_bwd_candidates(128)
    assert bwd[0] == MosaicBwdConfig.for_head_dim(128) and {(c.num_stages, c.block_q_dq) for c in bwd} == {
        (2, 64), (3, 64), (2, 128), (3, 128)}
    atomic = tuning.mosaic_bwd_candidates(128, deterministic=False)
    assert all(not c.deterministic for c in atomic) and not any(c.num_stages == 3 and not c.dq_split for c in atomic)


def test_max_error_allows_rounding_only():
    ref = jnp.linspace(-4, 4, 64).astype(jnp.bfloat16)
    one_step = ref + (jnp.abs(ref) * 2.0 ** -8).astype(jnp.bfloat16)  # up to a step off
    error, tolerance = tuning.max_error((one_step,), (ref,))
    assert 0 < error <= tolerance
    error, tolerance = tuning.max_error((ref.at[3].add(0.5),), (ref,))
    assert error > tolerance
    assert tuning.max_error((ref.at[0].set(jnp.nan),), (ref,))[0] == float("inf")


class FakeKernels:
    """An attention whose configs decide its speed (`times`), whether it is right (`wrong`: off by
    0.25) or whether it builds (`broken`: raises while traced). It records the configs it traced."""

    def __init__(self, times, wrong=(), broken=()):
        self.times, self.wrong, self.broken, self.traced = times, set(wrong), set(broken), []

    def __call__(self, q, k, v, *, mosaic_configs, causal=False, deterministic=True):
        fwd, bwd = mosaic_configs
        config = bwd or fwd
        self.traced.append(config)
        if config in self.broken:
            raise RuntimeError("out of shared memory")
        s = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
        return (out + 0.25 * (config in self.wrong)).astype(q.dtype)

    def timer(self, fn):
        return self.times[self.traced[-1]]


def test_autotune_mosaic_selects_checks_and_saves(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "current_device_kind", lambda: KIND)
    fwd_default = MosaicFwdConfig()
    fast, faster_but_wrong, broken, barely = (dataclasses.replace(fwd_default, **f) for f in (
        dict(persistent=True), dict(block_q=128, block_kv=64), dict(early_k_wait=True), dict(num_stages=3)))
    bwd_default, bwd_fast = MosaicBwdConfig(), MosaicBwdConfig(num_stages=3)
    kernels = FakeKernels({fwd_default: 10.0, fast: 6.0, faster_but_wrong: 1.0, barely: 9.95,
                           bwd_default: 20.0, bwd_fast: 15.0},
                          wrong=[faster_but_wrong], broken=[broken])
    q = jax.random.normal(jax.random.key(1), (1, 32, 2, 64), jnp.float32).astype(jnp.bfloat16)
    path = tmp_path / "out.json"
    fwd, bwd = tuning.autotune_mosaic(
        [(q, q, q), (q[:, :16], q[:, :16], q[:, :16])], causal=True, attention=kernels, timer=kernels.timer,
        fwd_candidates=[fwd_default, faster_but_wrong, broken, fast, barely],
        bwd_candidates=[bwd_default, bwd_fast], path=path)
    assert (fwd, bwd) == (fast, bwd_fast)
    entry = block_sizes.entry_sections(json.loads(path.read_text())[cache_key(KIND, jnp.bfloat16, 64, ("causal",))])
    assert entry[block_sizes.MOSAIC_FWD] == fast and entry[block_sizes.MOSAIC_BWD] == bwd_fast
    notes = entry[block_sizes.MEASURED]["mosaic_fwd"]
    assert notes["candidates"] == {"ok": 3, "wrong": 1, "failed": 1} and notes["inputs"] == ["1x32x2x64", "1x16x2x64"]
    assert notes["us"] == [6e6, 6e6] and notes["jax_version"] == jax.__version__
    assert len(notes["rejected"]) == 1 and "block_q=128" in notes["rejected"][0]
    # a gain within MIN_GAIN keeps the default; autotune(backend="mosaic") is autotune_mosaic
    fwd, bwd = tuning.autotune(q, q, q, backend="mosaic", include_backward=False, save=False, attention=kernels,
                               timer=kernels.timer, fwd_candidates=[fwd_default, barely])
    assert (fwd, bwd) == (fwd_default, None)
    with pytest.raises(ValueError, match="deadline"):
        tuning.autotune_mosaic([(q, q, q)], attention=kernels, timer=kernels.timer, deadline=0.0, save=False)


def test_select_mosaic_takes_the_best_geometric_mean():
    def row(config, *seconds):
        return [tuning.MosaicTrial(config, "ok", s) for s in seconds]
    a, b, c = MosaicFwdConfig(), MosaicFwdConfig(num_stages=3), MosaicFwdConfig(persistent=True)
    trials = [row(a, 10, 10), row(b, 5, 12), row(c, 8, 8)]  # b: sqrt(0.5 * 1.2) = 0.77 < c: 0.8
    assert tuning.select_mosaic(trials) == 1
    trials[1][0] = tuning.MosaicTrial(b, "wrong")  # out on one input: out
    assert tuning.select_mosaic(trials) == 2


def test_forward_and_backward_pad_to_their_own_tiles(hopper):
    """A 3-consumer forward pads rows to multiples of its 192-row CTAs and the backward to its own
    tiles, not both to their least common multiple (384: 2304 rows instead of 2112 and 2048 here)."""
    q = jnp.zeros((1, 2048, 2, 64), jnp.bfloat16)
    fwd = MosaicFwdConfig(consumers=3)
    launch = api.plan(q, q, q, interpret=False, backend="mosaic", mosaic_configs=(fwd, None))[0]
    assert launch.mosaic_config == fwd
    assert (launch.padded_q_len, launch.padded_kv_len) == (2112, 2048)
    assert launch.bwd_padded_q_len == 2048 and launch.bwd_padded_q_len % launch.mosaic_bwd_config.q_multiple == 0
    backward = launch.for_backward()
    assert (backward.padded_q_len, backward.padded_kv_len) == (2048, 2048)
