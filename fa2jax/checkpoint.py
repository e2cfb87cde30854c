"""Training checkpoints: a pytree of arrays in msgpack, with JSON metadata and the tokenizer beside it.

Layout of one checkpoint, `<directory>/step_00000300/`:
  state.msgpack   every leaf of the saved pytree (params, optimizer state, step), keyed by its
                  tree path (`jax.tree_util.keystr`), written with flax.serialization
  meta.json       the step, configs (`dataclasses.asdict`), data fingerprint, anything JSON-able
  tokenizer.json  the tokenizer, so the folder alone is enough to resume, decode or distil from

A checkpoint is written into a hidden temporary folder and renamed into place, so a process
killed mid-write leaves the previous checkpoints intact and never a partial one under a
`step_*` name. Restoring checks every path, shape and dtype against a target pytree (built by
initialising the model and optimizer afresh, or with `jax.eval_shape`) and raises on any
difference rather than loading into the wrong structure.

A run folder of examples/train.py holds its checkpoints under checkpoints/; `resolve_checkpoint`
finds the newest, `load_transformer` builds its model (what `fa2jax.load_pretrained` calls for
this format), `export_params` copies one without the optimizer state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from fa2jax import sharding
from fa2jax.config import RopeScalingConfig, TransformerConfig
from fa2jax.model import Transformer
from fa2jax.tokenizer import Tokenizer, read_tokenizer_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.msgpack"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    try:
        # dtypes (jnp.bfloat16, np.float32, "float32") are stored by name.
        return np.dtype(value).name
    except TypeError:
        raise ValueError(f"cannot store {value=} of {type(value)=} in checkpoint metadata") from None


def config_to_dict(config: Any) -> dict:
    """A frozen dataclass config as JSON-able values (dtypes by name, tuples as lists)."""
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"{type(config)=} is not a dataclass")
    return _to_jsonable(config)


def config_from_dict(cls: type, values: dict) -> Any:
    """Rebuilds `cls(**values)` from `config_to_dict` output, ignoring fields `cls` lacks.

    JSON lists become tuples again (frozen configs must stay hashable to be static jit
    arguments); dtype names stay strings, which jnp.dtype() and flax accept.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    fix = lambda v: tuple(fix(x) for x in v) if isinstance(v, list) else v  # noqa: E731
    return cls(**{k: fix(v) for k, v in values.items() if k in known})


def model_config_from_dict(values: dict) -> TransformerConfig:
    """Rebuilds a TransformerConfig stored by `config_to_dict` (its RoPE scaling included)."""
    values = dict(values)
    if isinstance(values.get("rope_scaling"), dict):
        values["rope_scaling"] = RopeScalingConfig(**values["rope_scaling"])
    return config_from_dict(TransformerConfig, values)


def _flatten(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in leaves}
    if len(flat) != len(leaves):
        raise ValueError(f"tree paths are not unique: {len(flat)=} != {len(leaves)=}")
    return flat


def step_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `directory` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """`path` itself if it is a checkpoint, else the newest checkpoint under its checkpoints/ or
    under it (a run folder of examples/train.py, or the folder holding the `step_*`), else None."""
    path = Path(path)
    if (path / META_FILE).is_file() and (path / STATE_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """`find_checkpoint(path)`, or a ValueError naming the path."""
    found = find_checkpoint(path)
    if found is None:
        raise ValueError(f"no checkpoint in {str(path)!r}: expected a step_* folder ({STATE_FILE} + {META_FILE}), "
                         f"or a folder holding step_* folders directly or under checkpoints/")
    return found


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    metadata: dict,
    tokenizer: Tokenizer | None = None,
    keep: int | None = 3,
) -> Path:
    """Writes `state` (a pytree of arrays) and `metadata` as checkpoint `step`, atomically.

    Args:
      directory: the folder holding all `step_*` checkpoints of a run.
      step: the number of optimizer steps taken; names the checkpoint.
      state: pytree of jax/numpy arrays, e.g. {"params": ..., "opt_state": ...}.
      metadata: JSON-able values (dataclass configs are converted); "step" is added.
      tokenizer: saved as tokenizer.json inside the checkpoint when given.
      keep: how many newest checkpoints to keep (older ones are deleted); None keeps all.

    Returns:
      The checkpoint folder.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"{keep=} must be at least 1 or None")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    host = {k: np.asarray(v) for k, v in _flatten(jax.device_get(state)).items()}
    meta = _to_jsonable({**metadata, "step": step})
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp_step_{step}_"))
    try:
        (tmp / STATE_FILE).write_bytes(serialization.msgpack_serialize(host))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        final = step_dir(directory, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of checkpoint folder `path`."""
    return json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in checkpoint folder `path`."""
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise ValueError(f"checkpoint has no tokenizer: {str(file)=}")
    return read_tokenizer_file(file)


def load_checkpoint(path: str | os.PathLike, target: Any, strict: bool = True) -> tuple[Any, dict]:
    """Reads checkpoint folder `path` into the structure of `target`.

    Args:
      path: a `step_*` folder written by `save_checkpoint`.
      target: a pytree with the same structure as the saved state; leaves may be arrays or
        jax.ShapeDtypeStruct (their shape and dtype are used, and a NamedSharding they carry
        places the restored array, e.g. from `fa2jax.sharding.abstract_sharded`).
      strict: if False, saved leaves that `target` lacks are ignored (e.g. load only
        {"params": ...} from a full training checkpoint); missing leaves always raise.

    Returns:
      (state, metadata): state has target's structure with the saved values as jax arrays.
    """
    path = Path(path)
    saved = serialization.msgpack_restore((path / STATE_FILE).read_bytes())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    want = {jax.tree_util.keystr(p): leaf for p, leaf in leaves}
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or (extra and strict):
        raise ValueError(f"checkpoint does not match the target tree: {missing[:5]=} {extra[:5]=}")
    values = []
    for key, leaf in want.items():
        got = saved[key]
        if tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
            raise ValueError(
                f"checkpoint leaf {key}: saved {got.shape=} {got.dtype=}, "
                f"expected {leaf.shape=} {leaf.dtype=}"
            )
        placement = getattr(leaf, "sharding", None)
        # A target leaf placed on a mesh receives its shards directly (each device only its own).
        values.append(jax.device_put(got, placement) if isinstance(placement, jax.sharding.NamedSharding)
                      else jax.numpy.asarray(got))
    return jax.tree_util.tree_unflatten(treedef, values), read_metadata(path)


def read_model_config(path: str | os.PathLike) -> TransformerConfig:
    """The model config of a checkpoint (or of the newest one in a run folder)."""
    return model_config_from_dict(read_metadata(resolve_checkpoint(path))["model_config"])


def load_transformer(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The model of a checkpoint (or of the newest one in a run folder), parameters as stored.

    Args:
      path: anything `resolve_checkpoint` accepts.
      mesh: read every parameter straight into its shards on this mesh (`fa2jax.sharding`).

    Returns:
      A Transformer of the stored config holding the checkpoint's parameters (the optimizer
      state, if saved, is not read).
    """
    path = resolve_checkpoint(path)
    config = read_model_config(path)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(abstract).__name__} has variables besides nnx.Param that checkpoints do not hold")
    if mesh is not None:
        params = sharding.abstract_sharded(params, mesh)
    loaded, _ = load_checkpoint(path, {"params": params}, strict=False)
    return nnx.merge(graphdef, loaded["params"], rest)


def export_params(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copies the newest checkpoint of `run` without its optimizer state (a third of the size),
    which is all generation reads.

    Args:
      run: a checkpoint, or a folder `resolve_checkpoint` finds one in.
      out: folder to write the `step_*` checkpoint into.

    Returns:
      The written checkpoint folder.
    """
    path = resolve_checkpoint(run)
    meta = read_metadata(path)
    target = {"params": _abstract_params(model_config_from_dict(meta["model_config"]))}
    params, _ = load_checkpoint(path, target, strict=False)
    return save_checkpoint(out, meta["step"], params, meta, read_tokenizer(path), keep=1)


def _abstract_params(config: TransformerConfig) -> Any:
    """ShapeDtypeStructs of a Transformer's nnx.Param state: the target to restore parameters into."""
    return nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
