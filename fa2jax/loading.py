"""`load_pretrained` and `load_tokenizer`: one entry point for the model formats on disk.

A format is an entry of `FORMATS`, tried in order; the first whose `matches` accepts the path
opens it:
  fa2jax     a checkpoint folder written by fa2jax (`step_*`: orbax's state/, meta/meta.json,
             tokenizer/tokenizer.json; or the older state.msgpack, meta.json, tokenizer.json), or a
             folder holding them directly or under checkpoints/ (a run folder of examples/train.py):
             its newest intact checkpoint (`fa2jax.checkpoint`)
  hf         a Hugging Face model folder (config.json, *.safetensors, tokenizer.json); its
             config.json's `model_type` picks the family in `fa2jax.hf_families.HF_FAMILIES`
  gguf       a llama.cpp GGUF file (`*.gguf`): weights dequantised, tokenizer from its metadata
  tokenizer  a tokenizer file: a Hugging Face tokenizer.json or one written by a fa2jax
             tokenizer's `save` (tokenizers only)
Another file format is one more `ModelFormat` entry; another Hugging Face family one
more `HF_FAMILIES` entry. The loaders build the model abstractly and fill in the stored arrays,
so no random initialisation of a large model runs first.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from fa2jax import checkpoint as ckpt
from fa2jax import gguf_llama, hf, sharding
from fa2jax.config import TransformerConfig
from fa2jax.model import Transformer, replace_config
from fa2jax.tokenizer import HFTokenizer, Tokenizer, read_tokenizer_file

# TransformerConfig fields that set parameter shapes: a loaded model keeps the stored ones.
SHAPE_FIELDS = frozenset({"vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                          "tie_embeddings"})


@dataclasses.dataclass(frozen=True)
class ModelFormat:
    """One on-disk format: how to recognise it and how to open its model and its tokenizer."""

    name: str
    expects: str  # what a path of this format holds, for error messages
    matches: Callable[[Path], bool]
    # (path, dtype or None) -> Transformer; dtype None keeps the stored dtypes. None: no model.
    load_model: Callable[[Path, Any], Transformer] | None
    load_config: Callable[[Path], TransformerConfig] | None  # the model's config, no arrays read
    load_tokenizer: Callable[[Path], Tokenizer] | None
    # (path, dtype or None, mesh) -> Transformer with each parameter read into its shards; None:
    # load_pretrained(mesh=) loads with load_model and then places the parameters.
    load_sharded: Callable[[Path, Any, Mesh], Transformer] | None = None


FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat(
        name="fa2jax",
        expects="a fa2jax checkpoint folder (step_*: state/ + meta/meta.json, or state.msgpack + meta.json) or a "
                "folder holding them directly or under checkpoints/ (an examples/train.py run folder)",
        matches=lambda path: ckpt.find_checkpoint(path) is not None,
        load_model=lambda path, dtype: ckpt.load_transformer(path),
        load_config=ckpt.read_model_config,
        load_tokenizer=lambda path: ckpt.read_tokenizer(ckpt.resolve_checkpoint(path)),
        load_sharded=lambda path, dtype, mesh: ckpt.load_transformer(path, mesh=mesh),
    ),
    ModelFormat(
        name="hf",
        expects="a Hugging Face model folder (config.json + *.safetensors, and tokenizer.json for the tokenizer)",
        matches=lambda path: (path / "config.json").is_file(),
        load_model=lambda path, dtype: hf.load_hf(path, dtype=dtype, param_dtype=dtype)[1],
        load_config=hf.read_config,
        load_tokenizer=HFTokenizer.from_folder,
    ),
    ModelFormat(
        name="gguf",
        expects="a llama.cpp GGUF file (*.gguf)",
        matches=lambda path: path.is_file() and path.suffix == ".gguf",
        load_model=lambda path, dtype: gguf_llama.load_gguf(path, dtype=dtype, param_dtype=dtype)[1],
        load_config=gguf_llama.read_config,
        load_tokenizer=lambda path: HFTokenizer.from_gguf(gguf_llama.read_metadata(path)),
    ),
    ModelFormat(
        name="tokenizer",
        expects="a tokenizer file (a Hugging Face tokenizer.json, or one saved by a fa2jax tokenizer)",
        matches=lambda path: path.is_file() and path.suffix == ".json",
        load_model=None,
        load_config=None,
        load_tokenizer=read_tokenizer_file,
    ),
)


def _find_format(path: str | os.PathLike, what: str) -> tuple[Path, ModelFormat]:
    """The first format of `FORMATS` that matches `path`, if it can load `what` ("model", "config",
    "tokenizer") from it; a ValueError naming the path and what was expected otherwise."""
    path = Path(path)
    attribute = f"load_{what}"
    able = [f for f in FORMATS if getattr(f, attribute) is not None]
    expected = "; or ".join(f.expects for f in able)
    if not path.exists():
        raise ValueError(f"cannot load a {what} from {str(path)!r}: no such file or folder. Expected {expected}")
    for fmt in FORMATS:
        if fmt.matches(path):
            if getattr(fmt, attribute) is None:
                raise ValueError(f"{str(path)!r} is {fmt.expects}, which holds no {what}")
            return path, fmt
    raise ValueError(f"cannot load a {what} from {str(path)!r}: expected {expected}")


def _check_overrides(overrides: dict) -> None:
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    for name in overrides:
        if name not in known:
            raise ValueError(f"{name=} is not a TransformerConfig field")
        if name in SHAPE_FIELDS:
            raise ValueError(f"{name=} sets parameter shapes, which a loaded model takes from its checkpoint")
        if name in ("dtype", "param_dtype"):
            raise ValueError(f"pass dtype= to load_pretrained, not {name}= (one dtype for compute and parameters)")


def load_pretrained(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None, **overrides) -> Transformer:
    """A `Transformer` from any format in `FORMATS`, ready for inference.

    Args:
      path: a fa2jax checkpoint or run folder, a Hugging Face model folder, or a GGUF file.
      dtype: the compute dtype, which the floating parameters are cast to as well (once, so a
        bf16 model reads bf16 weights); None keeps the stored compute dtype (a fa2jax checkpoint's
        float32 training masters are then cast to it).
      mesh: place the parameters on this mesh by `fa2jax.sharding`'s rules (tensor parallel over
        "model", FSDP over "fsdp", replicated over "data"); a fa2jax checkpoint is read straight
        into the shards, other formats are loaded and then placed.
      **overrides: TransformerConfig fields that keep the parameter shapes, e.g. `max_len`,
        `attention_impl`, `invariant_rows`.

    Returns:
      The model, with config.dtype == config.param_dtype == the dtype above.

    Raises:
      ValueError: the path is in no known format (the message names it and what was expected),
        or an override is unknown or would change a parameter's shape.
    """
    _check_overrides(overrides)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{dtype=} must be a floating dtype")
    path, fmt = _find_format(path, "model")
    if mesh is not None and fmt.load_sharded is not None:
        model = fmt.load_sharded(path, dtype, mesh)
    else:
        model = fmt.load_model(path, dtype)
        if mesh is not None:
            sharding.shard_model(model, mesh)
    if fmt.name == "fa2jax" and "tokenizer_vocab_size" not in overrides:
        overrides["tokenizer_vocab_size"] = _tokenizer_vocab(path, fmt, model.config)
    dtype = jnp.dtype(model.config.dtype if dtype is None else dtype)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    # Cast arrays in place of the stored ones: the float32 copies are freed as the model is replaced.
    nnx.update(model, jax.tree.map(cast, nnx.state(model, nnx.Param)))
    return replace_config(model, dtype=dtype, param_dtype=dtype, **overrides)


def _tokenizer_vocab(path: Path, fmt: ModelFormat, config: TransformerConfig) -> int | None:
    """The stored tokenizer's vocabulary when the model's is padded past it (examples/train.py pads
    to a multiple: those logit rows are untrained), else the config's own setting."""
    try:
        vocab = fmt.load_tokenizer(path).vocab_size
    except ValueError:  # a checkpoint saved without its tokenizer
        return config.tokenizer_vocab_size
    return vocab if vocab < config.vocab_size else config.tokenizer_vocab_size


def load_config(path: str | os.PathLike) -> TransformerConfig:
    """The stored TransformerConfig of a model folder in any format of `FORMATS` (no arrays are read)."""
    path, fmt = _find_format(path, "config")
    return fmt.load_config(path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model folder in any format of `FORMATS`, or of a tokenizer file.

    Args:
      path: a fa2jax checkpoint or run folder (its saved tokenizer), a Hugging Face model folder
        (its tokenizer.json; eos ids from generation_config.json, config.json and
        tokenizer_config.json; chat template from tokenizer_config.json), a GGUF file (its
        tokenizer.ggml.* metadata and tokenizer.chat_template), or a tokenizer file.

    Raises:
      ValueError: the path holds no tokenizer in a known format.
    """
    path, fmt = _find_format(path, "tokenizer")
    return fmt.load_tokenizer(path)
