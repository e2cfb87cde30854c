"""Training checkpoints on orbax-checkpoint: async atomic saves, checked restores, safe rotation.

Layout of one checkpoint, `<directory>/step_00000300/` (a step of an orbax CheckpointManager):
  state/                     the pytree (params, optimizer state, step), written by orbax's PyTree
                             handler through tensorstore: each process writes its own shards, so
                             no state is gathered on one host
  meta/meta.json             the step, configs (`dataclasses.asdict`), data fingerprint, anything
                             JSON-able, and per array leaf its shape, dtype and digest
  tokenizer/tokenizer.json   the tokenizer as its `save` writes it, so the folder alone is enough
                             to resume, decode or distil from

Saving (`CheckpointStore.save`): orbax writes into `step_*.orbax-checkpoint-tmp-*` and renames it
into place on commit. The call returns once the arrays are copied to host memory (so the next
train step may reuse their buffers); the files are written by a background thread while training
goes on. A process killed mid-write leaves only the temporary folder, which the next
`CheckpointStore` on that folder deletes. A state holding a NaN or infinity is refused.

Integrity: every array gets a 32-bit digest, computed on the devices that hold it (a sum of its raw
bits, each word times an odd weight drawn from its position, mod 2**32: one changed word always
changes it; it guards against storage faults, not against tampering). It is stored in meta.json and
recomputed after every restore; a checkpoint that fails to read or to match is reported by path and
step (`CorruptCheckpointError`), and `restore_newest` falls back to the newest one that is intact.

Rotation keeps the newest `keep` checkpoints and, besides them, the newest *verified* one (read back
and matched: at a restore, or just before a rotation would delete anything), so a checkpoint that
went bad on disk never costs the last good one. While a save is being written there may be one more.
Reading a checkpoint back costs one more copy of the state on its devices while it is checked.

Checkpoints written before orbax (state.msgpack) are still read, through `fa2jax.legacy_checkpoint`.
A run folder of examples/train.py holds its checkpoints under checkpoints/; `resolve_checkpoint`
finds the newest, `load_transformer` builds its model (what `fa2jax.load_pretrained` calls for this
format), `export_params` copies one without the optimizer state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fa2jax import legacy_checkpoint as legacy
from fa2jax import sharding
from fa2jax.config import RopeScalingConfig, TransformerConfig
from fa2jax.model import Transformer
from fa2jax.tokenizer import Tokenizer, read_tokenizer_file

STEP_PREFIX = "step"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Items of one checkpoint (sub-folders), and the file inside meta/ and tokenizer/.
STATE_ITEM, META_ITEM, TOKENIZER_ITEM = "state", "meta", "tokenizer"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "fa2jax-orbax-1"  # meta.json's "format": what wrote the folder
# Temporary folders a killed save leaves: orbax's, and those of the msgpack writer before it.
_TEMPORARY = re.compile(r"(\.orbax-checkpoint-tmp|^\.tmp_step_)")
# A corrupt checkpoint moved out of the step sequence keeps its data under this prefix.
CORRUPT_PREFIX = "corrupt_"


class CheckpointError(ValueError):
    """A checkpoint folder holds nothing that can be restored."""


class CorruptCheckpointError(CheckpointError):
    """One checkpoint failed to read or to match its digests."""

    def __init__(self, path: Path, step: int | None, reason: str):
        self.path, self.step, self.reason = Path(path), step, reason
        self.moved_to: Path | None = None  # where `CheckpointStore.restore_newest` put it aside
        super().__init__(f"checkpoint {str(path)!r} (step {step}) is corrupt: {reason}")


class NonFiniteStateError(ValueError):
    """A state to save holds NaN or infinity (a diverged run): it is not written."""


# ----------------------------------------------------------------------------- metadata as JSON


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


# --------------------------------------------------------------------------------------- digests


def _leaf_digest(x: jax.Array) -> jax.Array:
    """[] uint32: sum over the raw words w_i of x of w_i * (i * 0x9E3779B1 | 1), mod 2**32.

    The weight is odd, so w -> w * weight is a bijection mod 2**32 and changing any one word
    changes the sum. The position i is built from iotas, not a reshape, so a sharded x stays as
    it is laid out.
    """
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    elif x.dtype.itemsize in (1, 2, 4):
        word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    else:
        raise ValueError(f"cannot digest an array of {x.dtype=}")
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        stride = stride * bits.shape[axis] % 2**32
    weight = index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _digests(leaves: list) -> tuple[list, list]:
    """Digest and all-finite flag of each leaf, on the leaves' devices ([] arrays each)."""
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
              for x in leaves]
    return [_leaf_digest(x) for x in leaves], finite


def describe_leaves(tree: Any) -> dict[str, dict]:
    """{tree path: {"shape", "dtype", "digest"}} of every leaf, as stored in meta.json.

    Raises:
      NonFiniteStateError: a floating leaf holds NaN or infinity (named in the message).
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    if len(set(keys)) != len(keys):
        raise ValueError(f"tree paths are not unique: {len(set(keys))=} != {len(keys)=}")
    arrays = [jnp.asarray(x) for _, x in leaves]
    digests, finite = jax.device_get(_digests(arrays))
    bad = [k for k, ok in zip(keys, finite) if not ok]
    if bad:
        raise NonFiniteStateError(f"refusing to save a state with NaN or infinity in {len(bad)} arrays: {bad[:3]}")
    return {k: {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name, "digest": int(d)}
            for k, x, d in zip(keys, arrays, digests)}


# ---------------------------------------------------------------------------- finding checkpoints


def step_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"{STEP_PREFIX}_{step:08d}"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether folder `path` is one complete checkpoint (this format or the msgpack one)."""
    path = Path(path)
    return ((path / META_ITEM / META_FILE).is_file() and (path / STATE_ITEM).is_dir()) or \
        legacy.is_legacy_checkpoint(path)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `directory` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_checkpoint(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `directory` (not checked for corruption), or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def checkpoint_folder(path: str | os.PathLike) -> Path | None:
    """The folder holding the `step_*` checkpoints of `path`: `path/checkpoints` (a run folder of
    examples/train.py) or `path` itself, whichever holds one; None if neither does."""
    path = Path(path)
    for folder in (path / "checkpoints", path):
        if list_checkpoints(folder):
            return folder
    return None


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """`path` itself if it is a checkpoint, else the newest checkpoint under its checkpoints/ or
    under it (a run folder of examples/train.py, or the folder holding the `step_*`), else None."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    folder = checkpoint_folder(path)
    return None if folder is None else latest_checkpoint(folder)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """`find_checkpoint(path)`, or a CheckpointError naming the path."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {str(path)!r}: expected a step_* folder ({STATE_ITEM}/ + {META_ITEM}/{META_FILE}, or "
            f"{legacy.STATE_FILE} + {legacy.META_FILE}), or a folder holding step_* folders directly or under checkpoints/")
    return found


def checkpoint_nbytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the files of checkpoint folder `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _step_from_name(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------- reading


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of checkpoint folder `path`."""
    path = Path(path)
    if legacy.is_legacy_checkpoint(path):
        return legacy.read_metadata(path)
    return json.loads((path / META_ITEM / META_FILE).read_text(encoding="utf-8"))


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in checkpoint folder `path`."""
    path = Path(path)
    for file in (path / TOKENIZER_ITEM / TOKENIZER_FILE, path / legacy.TOKENIZER_FILE):
        if file.is_file():
            return read_tokenizer_file(file)
    raise CheckpointError(f"checkpoint {str(path)!r} holds no tokenizer ({TOKENIZER_ITEM}/{TOKENIZER_FILE})")


def _check_target(path: Path, target: Any, saved: dict[str, dict], strict: bool) -> None:
    """Raises a ValueError if `target`'s paths, shapes or dtypes differ from the saved leaves."""
    want = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or (extra and strict):
        raise ValueError(f"checkpoint {str(path)!r} does not match the target tree: {missing[:5]=} {extra[:5]=}")
    for key, leaf in want.items():
        got = saved[key]
        if tuple(got["shape"]) != tuple(leaf.shape) or np.dtype(got["dtype"]) != np.dtype(leaf.dtype):
            raise ValueError(f"checkpoint leaf {key}: saved shape {tuple(got['shape'])} dtype {got['dtype']}, "
                             f"expected {leaf.shape=} {leaf.dtype=}")


def _restore_args(target: Any) -> Any:
    """Orbax restore arguments placing each leaf with the target's sharding (the default device
    where the target has none: a ShapeDtypeStruct without one, or a numpy array)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(leaf):
        sharding = getattr(leaf, "sharding", None) or default
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)

    return jax.tree.map(one, target)


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def load_checkpoint(path: str | os.PathLike, target: Any, strict: bool = True) -> tuple[Any, dict]:
    """Reads checkpoint folder `path` into the structure of `target` and checks its digests.

    Args:
      path: a `step_*` folder (this format or the msgpack one).
      target: a pytree with the saved state's structure; leaves may be arrays or
        jax.ShapeDtypeStruct (shape, dtype, and the sharding to restore onto when it has one).
      strict: if False, saved leaves that `target` lacks are not read (e.g. only {"params": ...}
        of a full training checkpoint); missing leaves always raise.

    Returns:
      (state, metadata): state has target's structure with the saved values as jax arrays.

    Raises:
      CorruptCheckpointError: a file is unreadable or truncated, or an array's digest differs
        from the one saved (the message names the folder and its step).
      ValueError: the target's structure, shapes or dtypes differ from the saved ones.
    """
    path = Path(path).absolute()  # orbax refuses relative paths ("Checkpoint path should be absolute")
    step = _step_from_name(path)
    if legacy.is_legacy_checkpoint(path):
        try:
            meta = legacy.read_metadata(path)
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(path, step, f"unreadable {legacy.META_FILE}: {e}") from e
        try:
            return legacy.read_state(path, target, strict), meta
        except legacy.UndecodableStateError as e:
            raise CorruptCheckpointError(path, meta.get("step", step), str(e)) from e
    try:
        meta = read_metadata(path)
        saved = meta["leaves"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(path, step, f"unreadable {META_ITEM}/{META_FILE}: {type(e).__name__}: {e}") from e
    step = meta.get("step", step)
    _check_target(path, target, saved, strict)
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            state = checkpointer.restore(path / STATE_ITEM, args=ocp.args.PyTreeRestore(
                item=target, restore_args=_restore_args(target), partial_restore=not strict))
    except Exception as e:  # tensorstore and orbax raise many types for a truncated or garbled file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptCheckpointError(path, step, f"{STATE_ITEM}/ does not read: {type(e).__name__}: {first_line}") from e
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    digests, _ = jax.device_get(_digests([x for _, x in leaves]))
    for (p, _), digest in zip(leaves, digests):
        key = jax.tree_util.keystr(p)
        if int(digest) != saved[key]["digest"]:
            raise CorruptCheckpointError(path, step, f"array {key} reads back with digest {int(digest)}, "
                                                     f"saved with {saved[key]['digest']}")
    return state, meta


class Restored(NamedTuple):
    state: Any  # the target's structure
    metadata: dict
    path: Path  # the checkpoint restored
    skipped: tuple[CorruptCheckpointError, ...]  # newer checkpoints that were corrupt, newest first


def restore_newest(directory: str | os.PathLike, target: Any, strict: bool = True) -> Restored:
    """The newest checkpoint in `directory` that reads back intact, and the corrupt newer ones.

    Reads only: nothing in `directory` is changed (a training process may be writing there).

    Raises:
      CheckpointError: `directory` holds no checkpoint, or none is intact (the message names the
        folder and every corrupt checkpoint).
      ValueError: the target does not match the saved structure (not tried on older ones).
    """
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            state, meta = load_checkpoint(path, target, strict)
        except CorruptCheckpointError as e:
            skipped.append(e)
            continue
        return Restored(state, meta, path, tuple(skipped))
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {str(directory)!r}: " + "; ".join(map(str, skipped)))
    raise CheckpointError(f"no checkpoint in {str(directory)!r}")


# ------------------------------------------------------------------------------------- writing


class _TokenizerHandler(ocp.CheckpointHandler):
    """Orbax item handler writing a tokenizer as the one file its `save` writes."""

    def save(self, directory, args: TokenizerSave) -> None:
        if jax.process_index() == 0:
            args.tokenizer.save(Path(directory) / TOKENIZER_FILE)

    def restore(self, directory, args: TokenizerRestore | None = None) -> Tokenizer:
        return read_tokenizer_file(Path(directory) / TOKENIZER_FILE)

    def metadata(self, directory) -> None:
        return None


@ocp.args.register_with_handler(_TokenizerHandler, for_save=True)
@dataclasses.dataclass
class TokenizerSave(ocp.args.CheckpointArgs):
    tokenizer: Tokenizer


@ocp.args.register_with_handler(_TokenizerHandler, for_restore=True)
@dataclasses.dataclass
class TokenizerRestore(ocp.args.CheckpointArgs):
    pass


class CheckpointStore:
    """The checkpoints of one training run: async atomic saves, checked restores, rotation.

    Only the process that trains in `directory` should open one: opening deletes the temporary
    folders that killed saves left there. Use as a context manager, or call `close` (it waits for
    the last save to be written).
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, *, async_save: bool = True):
        """
        Args:
          directory: the folder holding the `step_*` checkpoints (created if missing).
          keep: how many newest checkpoints rotation keeps (and the newest verified one besides);
            None keeps all.
          async_save: write files in a background thread (`save` returns after the copy to host).
        """
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"{keep=} must be a positive int or None")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        # Orbax deletes its own leftovers on opening; we list them first to say so.
        self.removed_temporaries = sorted(p.name for p in self.directory.iterdir() if _TEMPORARY.search(p.name))
        for name in self.removed_temporaries:
            if name.startswith(".tmp_step_"):
                shutil.rmtree(self.directory / name, ignore_errors=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                step_prefix=STEP_PREFIX, step_format_fixed_length=8, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save),
            item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                           META_ITEM: ocp.JsonCheckpointHandler(filename=META_FILE),
                           TOKENIZER_ITEM: _TokenizerHandler()})
        self.keep = keep
        self.verified: int | None = None  # the newest step read back intact
        self._saved: tuple[int, Any] | None = None  # (step, restore target) of the newest save
        self.warnings: list[str] = []  # verifications that failed after a save

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (a save being written is not one yet)."""
        return [s for s, _ in list_checkpoints(self.directory)]

    def path(self, step: int) -> Path:
        return step_dir(self.directory, step)

    def save(self, step: int, state: Any, metadata: dict, tokenizer: Tokenizer | None = None) -> Path:
        """Starts writing `state` (a pytree of arrays) and `metadata` as checkpoint `step`.

        Waits for the previous save, rotates, then returns once the arrays are on the host; the
        files are complete after the next `save`, `wait` or `close`.

        Args:
          step: the number of optimizer steps taken; names the checkpoint.
          state: pytree of jax arrays, e.g. {"step": ..., "params": ..., "opt_state": ...}.
          metadata: JSON-able values (dataclass configs are converted); "step", "format" and
            "leaves" (each array's shape, dtype and digest) are added.
          tokenizer: saved with the checkpoint when given.

        Returns:
          The folder the checkpoint will have.

        Raises:
          NonFiniteStateError: `state` holds NaN or infinity; nothing is written.
          ValueError: checkpoint `step` exists already.
        """
        self.wait()
        if step in self.steps():
            raise ValueError(f"checkpoint {step=} exists already in {str(self.directory)!r}")
        self._rotate()
        meta = _to_jsonable({**metadata, "step": step, "format": FORMAT, "leaves": describe_leaves(state)})
        items = {STATE_ITEM: ocp.args.PyTreeSave(state), META_ITEM: ocp.args.JsonSave(meta)}
        if tokenizer is not None:
            items[TOKENIZER_ITEM] = TokenizerSave(tokenizer)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._saved = (step, abstract_tree(state))
        return self.path(step)

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is written (re-raising its error)."""
        self._manager.wait_until_finished()

    def restore(self, step: int, target: Any, strict: bool = True) -> tuple[Any, dict]:
        """`load_checkpoint` of checkpoint `step`; marks it verified."""
        state, meta = load_checkpoint(self.path(step), target, strict)
        self.verified = step if self.verified is None else max(self.verified, step)
        return state, meta

    def restore_newest(self, target: Any) -> Restored:
        """`restore_newest` of this folder; the restored checkpoint becomes the verified one, and
        the corrupt newer ones are moved aside (renamed `corrupt_step_*`, not deleted) so that the
        run can write those steps again."""
        restored = restore_newest(self.directory, target)
        self.verified = _step_from_name(restored.path)
        for e in restored.skipped:
            aside = e.path.with_name(CORRUPT_PREFIX + e.path.name)
            while aside.exists():
                aside = aside.with_name(aside.name + "_")
            e.path.rename(aside)
            e.moved_to = aside
        if restored.skipped:
            self._manager.reload()
        return restored

    def delete(self, step: int) -> None:
        """Deletes checkpoint `step`."""
        if legacy.is_legacy_checkpoint(self.path(step)):
            shutil.rmtree(self.path(step))
        else:
            self._manager.delete(step)

    def close(self) -> None:
        """Waits for the last save, rotates, and releases orbax's threads."""
        self.wait()
        self._rotate()
        self._manager.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rotate(self) -> None:
        """Deletes all but the newest `keep` checkpoints and the newest verified one.

        Before deleting anything the newest checkpoint, if this store wrote it, is read back onto the
        devices it was saved from (one more copy of the state there, briefly: on one device, the
        training step's activations are freed by then); a failure is recorded in `warnings` and
        leaves the older verified one protected. Nothing is deleted while no checkpoint is verified.
        """
        steps = self.steps()
        if self.keep is None or len(steps) <= self.keep:
            return
        if self._saved is not None and self._saved[0] == steps[-1] and self.verified != steps[-1]:
            try:
                self.restore(*self._saved)
            except CorruptCheckpointError as e:
                self.warnings.append(str(e))
                warnings.warn(f"{e}; older checkpoints are kept", stacklevel=3)
        if self.verified is None:
            return
        protected = set(steps[-self.keep:]) | {self.verified}
        for step in steps:
            if step not in protected:
                self.delete(step)


# ------------------------------------------------------------------------- one-call conveniences


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    metadata: dict,
    tokenizer: Tokenizer | None = None,
    keep: int | None = 3,
) -> Path:
    """Writes checkpoint `step` and waits for it (`CheckpointStore.save`, then rotation to `keep`).

    An existing checkpoint of the same step is replaced.

    Returns:
      The checkpoint folder.
    """
    with CheckpointStore(directory, keep) as store:
        if step in store.steps():
            store.delete(step)
        return store.save(step, state, metadata, tokenizer)


def read_model_config(path: str | os.PathLike) -> TransformerConfig:
    """The model config of a checkpoint (or of the newest one in a run folder)."""
    return model_config_from_dict(read_metadata(resolve_checkpoint(path))["model_config"])


def _load_params(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict, Path]:
    """(params, metadata, checkpoint) of checkpoint `path`, or of the newest intact checkpoint of a
    run folder (corrupt newer ones are skipped with a warning naming them); with a `mesh`, each
    parameter is read straight into its shards (`fa2jax.sharding`)."""
    path = Path(path)
    if is_checkpoint(path):
        meta = read_metadata(path)
        target = {"params": _abstract_params(model_config_from_dict(meta["model_config"]), mesh)}
        state, meta = load_checkpoint(path, target, strict=False)
        return state["params"], meta, path
    folder = checkpoint_folder(path)
    if folder is None:
        resolve_checkpoint(path)  # raises, naming the path
    config = model_config_from_dict(read_metadata(latest_checkpoint(folder))["model_config"])
    restored = restore_newest(folder, {"params": _abstract_params(config, mesh)}, strict=False)
    for e in restored.skipped:
        warnings.warn(f"{e}; using an older checkpoint", stacklevel=3)
    return restored.state["params"], restored.metadata, restored.path


def load_transformer(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The model of a checkpoint (or of the newest intact one in a run folder), parameters as stored.

    Args:
      path: anything `resolve_checkpoint` accepts.
      mesh: read every parameter straight into its shards on this mesh (`fa2jax.sharding`).

    Returns:
      A Transformer of the stored config holding the checkpoint's parameters (the optimizer
      state, if saved, is not read).
    """
    params, meta, _ = _load_params(path, mesh)
    abstract = nnx.eval_shape(lambda: Transformer(model_config_from_dict(meta["model_config"]), rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(abstract).__name__} has variables besides nnx.Param that checkpoints do not hold")
    return nnx.merge(graphdef, params, rest)


def export_params(run: str | os.PathLike, out: str | os.PathLike, dtype=None) -> Path:
    """Copies the newest intact checkpoint of `run` without its optimizer state (a third of the
    size), which is all generation reads.

    Args:
      run: a checkpoint, or a folder `resolve_checkpoint` finds one in.
      out: folder to write the `step_*` checkpoint into.
      dtype: cast the floating parameters to this dtype (e.g. bfloat16: half the size again); the
        saved model config then computes in it too. None keeps the stored dtype.

    Returns:
      The written checkpoint folder.
    """
    params, meta, path = _load_params(run)
    meta = {k: v for k, v in meta.items() if k not in ("leaves", "format")}
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{dtype=} must be a floating dtype")
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        config = model_config_from_dict(meta["model_config"]).replace(dtype=dtype, param_dtype=dtype)
        meta["model_config"] = config_to_dict(config)
    return save_checkpoint(out, meta["step"], {"params": params}, meta, read_tokenizer(path), keep=1)


def _abstract_params(config: TransformerConfig, mesh: jax.sharding.Mesh | None = None) -> Any:
    """ShapeDtypeStructs of a Transformer's nnx.Param state: the target to restore parameters into
    (placed on `mesh` by `fa2jax.sharding`'s rules when given)."""
    params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    return params if mesh is None else sharding.abstract_sharded(params, mesh)
