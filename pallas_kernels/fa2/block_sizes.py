"""Kernel configs without a GPU at hand: the portable block sizes, defaults per head dim, and the cache.

FA2 leaves block sizes to hand tuning. Here `block_sizes=None` looks up a user cache written by the
autotuner (`tuning.autotune`, which sits above the API and writes through `save_tuned`), then the
cache shipped with the package (see BENCHMARKS.md for what was measured where), then falls back to
`heuristic_block_sizes`. The Hopper kernels' configs (`MosaicFwdConfig`, `MosaicBwdConfig`) live in
the same entries and are looked up the same way, falling back to their `for_head_dim` defaults.

The cache key is (device kind, dtype, head dim, feature set); an entry holds one section per kernel
family: {"block_sizes": {...}, "mosaic_fwd": {...}, "mosaic_bwd": {...},
"mosaic_bwd_nondeterministic": {...}, "measured": {...}}, each config as its dataclass fields by
name. Unknown sections or fields are refused with their names, never dropped. This module imports
only `common` and the config classes of the kernel modules, so the API and the autotuner both read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax.numpy as jnp

from pallas_kernels.common.numerics import next_power_of_two
from pallas_kernels.fa2.mosaic_bwd import MosaicBwdConfig
from pallas_kernels.fa2.mosaic_fwd import MosaicFwdConfig

SHIPPED_CACHE = pathlib.Path(__file__).with_name("tuning_cache.json")
USER_CACHE_ENV = "FA2JAX_TUNING_CACHE"
MIN_BLOCK = 16  # the smallest tile a GPU matrix instruction takes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the forward, dK/dV and dQ kernels.

    Every block is a power of two >= 16 (Triton tiles). `num_warps` / `num_stages` are ignored by
    interpret mode.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value=}")
            if field.name.startswith("block_") and (value < MIN_BLOCK or value & (value - 1)):
                raise ValueError(f"BlockSizes.{field.name} must be a power of two >= {MIN_BLOCK}, got {value=}")

    def fitted(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrinks blocks that exceed the (power-of-two rounded) sequence, so short inputs pad little."""
        q_cap = max(MIN_BLOCK, next_power_of_two(q_len))
        k_cap = max(MIN_BLOCK, next_power_of_two(kv_len))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, q_cap),
            block_k=min(self.block_k, k_cap),
            block_q_dkv=min(self.block_q_dkv, q_cap),
            block_k_dkv=min(self.block_k_dkv, k_cap),
            block_q_dq=min(self.block_q_dq, q_cap),
            block_k_dq=min(self.block_k_dq, k_cap),
        )


def heuristic_block_sizes(head_dim: int, dtype, device_kind: str) -> BlockSizes:
    """Block sizes that are good without measurement.

    Register pressure grows with the (padded) head dim: the forward accumulator is
    block_q x D float32, so large heads take smaller query tiles. CPU interpret mode gets small tiles
    to keep padding and Python-level work low.
    """
    if "cpu" in device_kind.lower():
        return BlockSizes(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32, block_k_dq=32)
    # Measured on an H100 (bf16, D=128, see BENCHMARKS.md): 128x128 forward tiles with 8 warps and
    # 3 stages, and 64x64 backward tiles with 4 warps beat every other candidate; 8-warp backward
    # tiles spill. Smaller heads afford the same tiles; D=256 halves them to stay in registers.
    if jnp.dtype(dtype).itemsize > 2:  # float32 tiles take twice the shared memory per stage
        return BlockSizes(block_q=64, block_k=64 if head_dim <= 64 else 32, num_warps=4, num_stages=2,
                          block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32,
                          num_warps_bwd=4, num_stages_bwd=1)
    if head_dim <= 128:
        return BlockSizes(block_q=128, block_k=128 if head_dim > 64 else 64, num_warps=8, num_stages=3,
                          block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                          num_warps_bwd=4, num_stages_bwd=2)
    return BlockSizes(block_q=64, block_k=64, num_warps=8, num_stages=2,
                      block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32,
                      num_warps_bwd=4, num_stages_bwd=1)


def feature_names(*, causal=False, window_size=(-1, -1), segment_ids=None, softcap=0.0,
                  alibi_slopes=None, mask=None, dropout_rate=0.0, **_) -> tuple[str, ...]:
    """The feature set of a call, as used in the tuning-cache key."""
    present = {
        "causal": causal,
        "window": tuple(window_size) != (-1, -1),
        "segments": segment_ids is not None,
        "softcap": softcap > 0,
        "alibi": alibi_slopes is not None,
        "mask": mask is not None,
        "dropout": dropout_rate > 0,
    }
    return tuple(name for name, on in present.items() if on)


def cache_key(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> str:
    """'NVIDIA H100 80GB HBM3|bfloat16|128|causal,segments' -- features sorted, empty for plain."""
    return "|".join([device_kind, jnp.dtype(dtype).name, str(head_dim), ",".join(sorted(features))])


def user_cache_path() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "fa2jax" / "tuning_cache.json"
    return pathlib.Path(os.environ.get(USER_CACHE_ENV, default))


def _read_cache(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# An entry's sections: each holds one config (its dataclass fields by name), or, for MEASURED, where
# and how the configs were measured (free-form, read by people). The reduce-add backward
# (deterministic=False) has a section of its own, so that a call with the default deterministic=True
# can never be handed a config that changes its dQ summation order.
BLOCK_SIZES = "block_sizes"
MOSAIC_FWD = "mosaic_fwd"
MOSAIC_BWD = "mosaic_bwd"
MOSAIC_BWD_NONDETERMINISTIC = "mosaic_bwd_nondeterministic"
MEASURED = "measured"
SECTIONS = {BLOCK_SIZES: BlockSizes, MOSAIC_FWD: MosaicFwdConfig, MOSAIC_BWD: MosaicBwdConfig,
            MOSAIC_BWD_NONDETERMINISTIC: MosaicBwdConfig}


def mosaic_bwd_section(deterministic: bool) -> str:
    """The section holding Hopper backward configs of this dQ mode."""
    return MOSAIC_BWD if deterministic else MOSAIC_BWD_NONDETERMINISTIC


def config_to_json(config) -> dict:
    """A config dataclass as {field name: value}."""
    return dataclasses.asdict(config)


def config_from_json(cls, data: dict, where: str = "tuning cache"):
    """cls(**data), refusing names that are not fields of cls: an entry written for fields this
    version lacks (or with a typo) must not load as something else. Missing fields take their
    defaults, which are the kernels' behaviour from before the field existed."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a {cls.__name__} entry must be a JSON object, got {data=}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown} (known: {sorted(known)}); "
                         f"the entry was written by another version: re-run the autotuner or delete it")
    return cls(**data)


def entry_sections(entry: dict, where: str = "tuning cache") -> dict:
    """{section: config or MEASURED dict} of one cache entry, every config decoded and checked.

    An entry of the first format (BlockSizes fields at top level, no sections) reads as its
    block_sizes section.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be a JSON object, got {entry=}")
    if entry and not set(entry) & (set(SECTIONS) | {MEASURED}):
        entry = {BLOCK_SIZES: entry}
    unknown = sorted(set(entry) - set(SECTIONS) - {MEASURED})
    if unknown:
        raise ValueError(f"{where}: unknown sections {unknown} (known: {sorted(SECTIONS) + [MEASURED]})")
    sections = {}
    for name, data in entry.items():
        if name == MEASURED:
            sections[name] = data
            continue
        config = config_from_json(SECTIONS[name], data, f"{where}[{name!r}]")
        if name in (MOSAIC_BWD, MOSAIC_BWD_NONDETERMINISTIC) and mosaic_bwd_section(config.deterministic) != name:
            raise ValueError(f"{where}[{name!r}] holds a backward config with {config.deterministic=}: "
                             f"that mode's configs go in {mosaic_bwd_section(config.deterministic)!r}")
        sections[name] = config
    return sections


def _cached(section: str, device_kind: str, dtype, head_dim: int, features: tuple[str, ...]):
    """The first config of `section` in: the user cache under this feature set, the shipped cache
    under it, then both under the causal set when this one has a band (causal or window), then both
    under the plain set; None when none has one. A banded call's nearest measured kin is the causal
    one: a band sets which tiles run and in what order (the persistent forward wins without one at
    D=128 and loses with one), so the plain set's entry may not suit it."""
    caches = [(f"user cache {user_cache_path()}", _read_cache(user_cache_path())),
              (f"shipped cache {SHIPPED_CACHE}", _read_cache(SHIPPED_CACHE))]
    banded = {"causal", "window"} & set(features)
    for key in dict.fromkeys([cache_key(device_kind, dtype, head_dim, features)]
                             + ([cache_key(device_kind, dtype, head_dim, ("causal",))] if banded else [])
                             + [cache_key(device_kind, dtype, head_dim, ())]):
        for name, cache in caches:
            if key in cache:
                config = entry_sections(cache[key], f"{name}[{key!r}]").get(section)
                if config is not None:
                    return config
    return None


def lookup_block_sizes(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> BlockSizes:
    """User cache, then the shipped cache, then the heuristic; a cached feature set falls back as
    `_cached` says (a banded one to causal, then plain)."""
    cached = _cached(BLOCK_SIZES, device_kind, dtype, head_dim, features)
    return cached if cached is not None else heuristic_block_sizes(head_dim, dtype, device_kind)


def default_mosaic_bwd_config(head_dim: int, deterministic: bool = True) -> MosaicBwdConfig:
    """The Hopper backward's config without measurement, per dQ mode."""
    config = MosaicBwdConfig.for_head_dim(head_dim)
    if deterministic:
        return config
    # The dS and dQ-partial buffers of the reduce-add mode leave no shared memory for a third
    # ring slot at D=128 (248 KB > 227 KB, seen in the sm90 lowering).
    return dataclasses.replace(config, deterministic=False, num_stages=2)


def lookup_mosaic_fwd(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> MosaicFwdConfig:
    """The Hopper forward's config: user cache, then the shipped cache (in `_cached`'s order of
    feature sets), then `MosaicFwdConfig.for_head_dim`."""
    cached = _cached(MOSAIC_FWD, device_kind, dtype, head_dim, features)
    return cached if cached is not None else MosaicFwdConfig.for_head_dim(head_dim)


def lookup_mosaic_bwd(device_kind: str, dtype, head_dim: int, features: tuple[str, ...],
                      deterministic: bool = True) -> MosaicBwdConfig:
    """The Hopper backward's config of the asked dQ mode: the caches' section of that mode (in the
    order of `lookup_mosaic_fwd`), then `default_mosaic_bwd_config`. The result's `deterministic`
    always equals the argument."""
    cached = _cached(mosaic_bwd_section(deterministic), device_kind, dtype, head_dim, features)
    return cached if cached is not None else default_mosaic_bwd_config(head_dim, deterministic)


def save_tuned(key: str, sections: dict, path: pathlib.Path | None = None) -> None:
    """Writes `sections` ({section: config, or MEASURED: {config section: notes}}) under `key` into
    the user cache (or `path`), keeping the entry's other sections; atomically (a temporary file,
    then a rename)."""
    path = user_cache_path() if path is None else pathlib.Path(path)
    cache = _read_cache(path)
    entry = _entry_json(entry_sections(cache[key], f"{path}[{key!r}]")) if key in cache else {}
    for name, value in sections.items():
        if name == MEASURED:
            entry[MEASURED] = {**entry.get(MEASURED, {}), **value}
        elif name not in SECTIONS or not isinstance(value, SECTIONS[name]):
            raise ValueError(f"section {name!r} takes a {SECTIONS.get(name)}, got {value=}")
        else:
            entry[name] = config_to_json(value)
    entry_sections(entry, f"{path}[{key!r}]")  # refuse what a lookup would refuse
    cache[key] = entry
    _write_cache(path, cache)


def save_block_sizes(key: str, blocks: BlockSizes, path: pathlib.Path | None = None) -> None:
    """Writes `blocks` under `key` into the user cache (or `path`), keeping the entry's other sections."""
    save_tuned(key, {BLOCK_SIZES: blocks}, path)


def merge_caches(source: pathlib.Path, target: pathlib.Path) -> list[str]:
    """Adds every entry of the cache file `source` into `target`, section by section (a section of
    source replaces target's, the others stay); keys starting with "_" (a tuning run's notes) are
    not entries and stay behind. Returns the merged keys."""
    merged = []
    for key, entry in _read_cache(pathlib.Path(source)).items():
        if key.startswith("_"):
            continue
        save_tuned(key, entry_sections(entry, f"{source}[{key!r}]"), pathlib.Path(target))
        merged.append(key)
    return merged


def _entry_json(sections: dict) -> dict:
    return {name: value if name == MEASURED else config_to_json(value) for name, value in sections.items()}


def _write_cache(path: pathlib.Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def candidate_block_sizes(head_dim: int) -> list[BlockSizes]:
    """The grid autotune searches: forward and backward tiles and launch parameters."""
    candidates = []
    for block_q, block_k in ((128, 64), (128, 128), (64, 64), (64, 128), (128, 32)):
        for num_warps in (4, 8):
            for num_stages in (2, 3):
                for bwd_q, bwd_k in ((64, 64), (64, 128), (128, 64), (32, 64)):
                    if head_dim > 128 and (block_q * block_k > 64 * 64 or bwd_q * bwd_k > 32 * 64):
                        continue
                    candidates.append(BlockSizes(
                        block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                        block_q_dkv=bwd_q, block_k_dkv=bwd_k, block_q_dq=bwd_k, block_k_dq=bwd_q,
                        num_warps_bwd=num_warps, num_stages_bwd=min(num_stages, 2)))
    return candidates
