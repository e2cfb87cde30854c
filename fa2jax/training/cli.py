"""What examples/train.py needs besides argparse: config flags, the configs and tokenizer of a new or
resumed run, and the checks that fail fast (before any tokenising) on a bad command line.

Every TrainConfig field and the model fields in `MODEL_FLAGS` become flags that default to None,
so an unset flag keeps the preset's value, or on `--resume` the run's own.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp

from fa2jax import checkpoint as ckpt
from fa2jax.config import TransformerConfig
from fa2jax.loading import load_tokenizer
from fa2jax.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer
from fa2jax.training import progress
from fa2jax.training.loop import RESUME_FREE_MODEL_FIELDS
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
# What examples/train.py imports lazily, from the `examples` extra.
EXTRAS_INSTALL = "pip install 'fa2jax[examples]'  (from a checkout: pip install -e '.[examples]')"


class UsageError(ValueError):
    """A command line that cannot run; the message names the flag."""


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


def _fit_warmup(values: dict, explicit: dict) -> dict:
    """`values` with a warmup that the preset (or the resumed run) set and that no longer fits in
    `steps` cut to a tenth of the steps, saying so; an explicit --warmup-steps is left to fail."""
    if "warmup_steps" in explicit or values["warmup_steps"] < values["steps"]:
        return values
    fitted = values["steps"] // 10
    print(f"--warmup-steps: {values['warmup_steps']} (not given on the command line) does not fit in "
          f"--steps {values['steps']}; warming up for {fitted} steps instead")
    return {**values, "warmup_steps": fitted}


def train_config(run: RunConfig, args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: the preset's TrainConfig) with the given training flags applied."""
    explicit = set_flags(args, (f.name for f in dataclasses.fields(TrainConfig)))
    values = {**dataclasses.asdict(base or run.train), **explicit}
    return TrainConfig(**_fit_warmup(values, explicit))


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


def check_writable(out: str | Path) -> Path:
    """Creates run folder `out` if needed and checks a file can be written there."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"--out {str(out)!r} is not a writable folder: {e.strerror or e}") from e
    return out


def check_extras(modules: Iterable[str]) -> None:
    """Raises a UsageError naming the install command if any of `modules` is not installed."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise UsageError(f"examples/train.py needs {missing}: {EXTRAS_INSTALL}")


def resumed_run(out: str | Path, args: argparse.Namespace, run: RunConfig
                ) -> tuple[TransformerConfig, TrainConfig, Tokenizer, Path]:
    """(model config, train config, tokenizer, checkpoint) to continue run folder `out`: the newest
    checkpoint's configs with the flags given on the command line applied.

    Training flags override the saved values (`--steps` extends the run; warmup is refitted if it
    no longer fits). Model flags may change only what `RESUME_FREE_MODEL_FIELDS` allows; --dtype
    and --attention-impl apply.

    Raises:
      UsageError: there is nothing to resume, or a flag would change the model (named).
    """
    folder = Path(out) / "checkpoints"
    readable = []
    for _, path in reversed(ckpt.list_checkpoints(folder)):
        try:
            readable.append((ckpt.read_metadata(path), ckpt.read_tokenizer(path), path))
            break
        except (OSError, ValueError):  # a corrupt newest checkpoint: train() reports it and falls back
            continue
    if not readable:
        raise UsageError(f"--resume: nothing to resume in {str(folder)!r} (no readable checkpoint); check --out, or "
                         f"drop --resume to start a new run")
    meta, tokenizer, path = readable[0]
    saved_model = ckpt.model_config_from_dict(meta["model_config"])
    for name, value in set_flags(args, MODEL_FLAGS).items():
        if name not in RESUME_FREE_MODEL_FIELDS and value != getattr(saved_model, name):
            raise UsageError(f"{_flag(name)} {value} would change the model of the run being resumed "
                             f"({name}={getattr(saved_model, name)!r}); drop it to resume")
    kind = "bytes" if isinstance(tokenizer, ByteTokenizer) else "bpe"
    if getattr(args, "tokenizer", None) not in (None, kind):
        raise UsageError(f"--tokenizer {args.tokenizer} would change the vocabulary of the run being resumed "
                         f"(a {kind} tokenizer); drop it to resume")
    if getattr(args, "bpe_vocab", None) not in (None, tokenizer.vocab_size):
        raise UsageError(f"--bpe-vocab {args.bpe_vocab} would change the vocabulary of the run being resumed "
                         f"({tokenizer.vocab_size} ids); drop it to resume")
    model_overrides = {k: v for k, v in set_flags(args, MODEL_FLAGS).items() if k in RESUME_FREE_MODEL_FIELDS}
    if getattr(args, "dtype", None):
        model_overrides["dtype"] = args.dtype
    if getattr(args, "attention_impl", None):
        model_overrides["attention_impl"] = args.attention_impl
    train_cfg = train_config(run, args, base=ckpt.config_from_dict(TrainConfig, meta["train_config"]))
    for name in ("seed", "seq_len"):
        saved = meta["train_config"][name]
        if getattr(train_cfg, name) != saved:
            raise UsageError(f"{_flag(name)} {getattr(train_cfg, name)} would change the data of every step of the "
                             f"run being resumed ({name}={saved}); drop it to resume")
    model_cfg = saved_model.replace(**model_overrides) if model_overrides else saved_model
    if train_cfg.seq_len > model_cfg.max_len:
        model_cfg = model_cfg.replace(max_len=train_cfg.seq_len)
    return model_cfg, train_cfg, tokenizer, path


def new_tokenizer(kind: str, texts: Iterable[str], bpe_vocab: int, teacher: str | None = None,
                  show_progress: bool = False) -> Tokenizer:
    """The teacher's tokenizer when distilling, else bytes, or a BPE trained on `texts`."""
    if teacher:
        return load_tokenizer(teacher)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        with progress.phase(f"training a {bpe_vocab}-token BPE", show_progress):
            return BPETokenizer.train(texts, bpe_vocab)
    raise ValueError(f"{kind=} is not 'bpe' or 'bytes'")
