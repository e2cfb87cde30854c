"""Training configuration: `TrainConfig` (how to train) and `RunConfig` (a named model + training setup).

Both are frozen dataclasses. Every `TrainConfig` field carries a one-line help string in its
metadata, which `fa2jax.training.cli` turns into a command-line flag.
"""
from __future__ import annotations

import dataclasses

from fa2jax.config import TransformerConfig


def _field(default, help: str):  # noqa: A002  (the argparse word)
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: batch geometry, optimizer, schedule and bookkeeping intervals."""

    steps: int = _field(1000, "optimizer steps in the whole run (the schedule's length)")
    batch_size: int = _field(8, "sequences per micro-batch")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    seq_len: int = _field(256, "T, tokens per packed row")
    learning_rate: float = _field(3e-4, "peak learning rate, reached after warmup")
    min_lr_ratio: float = _field(0.1, "final learning rate / peak")
    warmup_steps: int = _field(100, "linear warmup steps before the cosine decay")
    weight_decay: float = _field(0.1, "AdamW decay (matrices only)")
    b1: float = _field(0.9, "Adam beta1")
    b2: float = _field(0.95, "Adam beta2")
    clip_norm: float = _field(1.0, "global gradient norm limit")
    seed: int = _field(0, "initialisation and data order")
    distill_weight: float = _field(0.0, "w in (1 - w) * CE + w * KL; used only with a teacher")
    distill_temperature: float = _field(1.0, "softmax temperature of the distillation KL")
    log_every: int = _field(10, "steps between metric records")
    eval_every: int = _field(200, "steps between validation passes")
    eval_batches: int = _field(16, "batches per validation pass")
    checkpoint_every: int = _field(500, "steps between checkpoints")
    keep_checkpoints: int = _field(3, "newest checkpoints kept (older ones are deleted)")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.seq_len < 2:
            raise ValueError(f"{self.seq_len=} must be at least 2")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"{self.warmup_steps=} must be in [0, {self.steps=})")
        if not self.learning_rate > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need learning_rate > 0 and min_lr_ratio in [0, 1]: {self.learning_rate=} "
                             f"{self.min_lr_ratio=}")
        if not 0 <= self.distill_weight <= 1 or not self.distill_temperature > 0:
            raise ValueError(f"need distill_weight in [0, 1] and distill_temperature > 0: "
                             f"{self.distill_weight=} {self.distill_temperature=}")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A named model size with training settings and a BPE vocabulary that suit it."""

    model: TransformerConfig  # vocab_size is replaced by the tokenizer's
    train: TrainConfig
    bpe_vocab: int  # vocabulary to train the BPE tokenizer to

    @classmethod
    def tiny(cls) -> RunConfig:
        """Minutes on a CPU."""
        return cls(
            TransformerConfig.tiny(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                                   d_ff=384, max_len=256),
            TrainConfig(steps=300, batch_size=8, seq_len=256, learning_rate=2e-3, warmup_steps=30,
                        eval_every=100, checkpoint_every=100),
            bpe_vocab=4096,
        )

    @classmethod
    def draft_20m(cls) -> RunConfig:
        """The speculative pair's draft, for one H100/H200."""
        return cls(
            TransformerConfig.draft_20m(),
            TrainConfig(steps=4000, batch_size=32, seq_len=1024, learning_rate=1e-3, warmup_steps=200,
                        eval_every=250, checkpoint_every=500),
            bpe_vocab=32000,
        )

    @classmethod
    def target_1b(cls) -> RunConfig:
        """The speculative pair's target, for one H100/H200."""
        return cls(
            TransformerConfig.target_1b(),
            TrainConfig(steps=4000, batch_size=4, grad_accum=16, seq_len=2048, learning_rate=3e-4,
                        warmup_steps=200, eval_every=250, eval_batches=8, checkpoint_every=250),
            bpe_vocab=32000,
        )


def presets() -> dict[str, RunConfig]:
    """The named runs of examples/train.py's --preset."""
    return {"tiny": RunConfig.tiny(), "draft-20m": RunConfig.draft_20m(), "target-1b": RunConfig.target_1b()}
