"""What examples/train.py needs besides argparse: config flags, and the configs and tokenizer of a run.

Every TrainConfig field and the model fields in `MODEL_FLAGS` become flags that default to None,
so an unset flag keeps the preset's value.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp

from fa2jax import checkpoint as ckpt
from fa2jax.config import TransformerConfig
from fa2jax.loading import load_tokenizer
from fa2jax.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer
from fa2jax.training.presets import RunConfig, TrainConfig

# The TransformerConfig fields a run may set from the command line, with their help.
MODEL_FLAGS = {
    "d_model": "width of the residual stream",
    "num_layers": "decoder blocks",
    "num_heads": "query heads H",
    "num_kv_heads": "key/value heads K (H %% K == 0)",
    "head_dim": "width D of one head",
    "d_ff": "hidden width of the SwiGLU MLP",
    "rope_theta": "RoPE base",
    "norm_eps": "RMSNorm epsilon",
    "max_len": "longest sequence the model is meant for (the preset's is raised to --seq-len)",
    "tie_embeddings": "logits reuse the input embedding",
}
# Logit rows are rounded up to a multiple of this for the matmul tiles; the extra ids are never targets.
VOCAB_MULTIPLE = 128


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, model: TransformerConfig) -> None:
    """Adds a flag for every `MODEL_FLAGS` field (typed like `model`'s values) and TrainConfig field."""
    group = parser.add_argument_group("model (default: the preset's)")
    for name, help_text in MODEL_FLAGS.items():
        kind = type(getattr(model, name))
        if kind is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(_flag(name), type=kind, help=help_text)
    group = parser.add_argument_group("training (default: the preset's)")
    for f in dataclasses.fields(TrainConfig):
        group.add_argument(_flag(f.name), type=type(f.default), help=f.metadata["help"])


def set_flags(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """{name: value} of the flags among `names` given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def train_config(run: RunConfig, args: argparse.Namespace) -> TrainConfig:
    """The preset's TrainConfig with the given training flags applied."""
    return dataclasses.replace(run.train, **set_flags(args, (f.name for f in dataclasses.fields(TrainConfig))))


def padded_vocab(tokenizer_vocab: int) -> int:
    """The model's vocabulary for a tokenizer's: rounded up to a multiple of `VOCAB_MULTIPLE`."""
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(run: RunConfig, args: argparse.Namespace, *, vocab_size: int, seq_len: int, dtype=None,
                 attention_impl: str | None = None) -> TransformerConfig:
    """The preset's model with the given model flags, float32 parameters, `max_len` at least
    `seq_len`, and attention_impl "pallas" on a GPU unless given (automatic elsewhere)."""
    on_gpu = jax.default_backend() == "gpu"
    return run.model.replace(
        **{"max_len": max(run.model.max_len, seq_len), **set_flags(args, MODEL_FLAGS)},
        vocab_size=vocab_size, param_dtype=jnp.float32, dtype=dtype or run.model.dtype,
        attention_impl=attention_impl or ("pallas" if on_gpu else None))


def resumed_run(out: str | Path) -> tuple[TransformerConfig, TrainConfig, Tokenizer, Path] | None:
    """(model config, train config, tokenizer, checkpoint) of the newest checkpoint of run folder
    `out`, or None when it has none."""
    latest = ckpt.latest_checkpoint(Path(out) / "checkpoints")
    if latest is None:
        return None
    meta = ckpt.read_metadata(latest)
    return (ckpt.model_config_from_dict(meta["model_config"]), ckpt.config_from_dict(TrainConfig, meta["train_config"]),
            ckpt.read_tokenizer(latest), latest)


def new_tokenizer(kind: str, texts: Iterable[str], bpe_vocab: int, teacher: str | None = None) -> Tokenizer:
    """The teacher's tokenizer when distilling, else bytes, or a BPE trained on `texts`."""
    if teacher:
        return load_tokenizer(teacher)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts, bpe_vocab)
    raise ValueError(f"{kind=} is not 'bpe' or 'bytes'")
