"""Reading the checkpoints fa2jax wrote before it moved to orbax (read-only).

Layout of one such checkpoint, `<directory>/step_00000300/`:
  state.msgpack   every leaf of the saved pytree, keyed by its tree path (`jax.tree_util.keystr`),
                  written with flax.serialization
  meta.json       the step, configs, data fingerprint
  tokenizer.json  the tokenizer

The committed demo models (examples/checkpoints/) and run folders of older versions are in this
format; `fa2jax.checkpoint` reads them through this module and writes only its own format. These
files carry no checksum: what is checked is the tree structure, every shape and dtype, and that
the msgpack stream decodes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

STATE_FILE = "state.msgpack"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


class UndecodableStateError(ValueError):
    """state.msgpack is truncated or garbled."""


def is_legacy_checkpoint(path: str | os.PathLike) -> bool:
    """Whether folder `path` holds a msgpack checkpoint."""
    path = Path(path)
    return (path / STATE_FILE).is_file() and (path / META_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))


def read_state(path: str | os.PathLike, target: Any, strict: bool = True) -> Any:
    """The saved pytree of checkpoint folder `path` in the structure of `target`.

    Args:
      path: a folder for which `is_legacy_checkpoint` holds.
      target: pytree of arrays or jax.ShapeDtypeStruct (shape and dtype, and a NamedSharding a
        leaf carries places its array).
      strict: if False, saved leaves that `target` lacks are ignored; missing leaves always raise.

    Returns:
      `target`'s structure holding the saved values as jax arrays (on the default device, or
      sharded as the target says).
    """
    path = Path(path)
    try:
        saved = serialization.msgpack_restore((path / STATE_FILE).read_bytes())
    except Exception as e:  # msgpack raises its own types for a truncated or garbled stream
        raise UndecodableStateError(f"cannot decode {str(path / STATE_FILE)!r}: {type(e).__name__}: {e}") from e
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    want = {jax.tree_util.keystr(p): leaf for p, leaf in leaves}
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or (extra and strict):
        raise ValueError(f"checkpoint {str(path)!r} does not match the target tree: {missing[:5]=} {extra[:5]=}")
    values = []
    for key, leaf in want.items():
        got = saved[key]
        if tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
            raise ValueError(f"checkpoint leaf {key}: saved {got.shape=} {got.dtype=}, "
                             f"expected {leaf.shape=} {leaf.dtype=}")
        placement = getattr(leaf, "sharding", None)
        # A leaf placed on a mesh receives its shards directly (each device only its own).
        values.append(jax.device_put(got, placement) if isinstance(placement, jax.sharding.NamedSharding)
                      else jax.numpy.asarray(got))
    return jax.tree_util.tree_unflatten(treedef, values)
