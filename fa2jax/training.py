"""Training a `Transformer` on packed text: optimizer, jitted step, eval, distillation, the loop.

- Loss: next-token cross entropy, counted only where the target is in the same document
  (segment) as the input token and is not padding; averaged over those tokens across all
  micro-batches of a step (so gradient accumulation gives the same update as one big batch).
- Precision: parameters and optimizer state in float32 (the model config's `param_dtype`), the
  forward/backward pass in the config's `dtype` (bfloat16 on GPU), logits in float32.
- Optimizer: AdamW (decay on matrices only) on a linear-warmup + cosine schedule, after global
  gradient-norm clipping.
- Distillation (`--teacher`): loss = (1 - w) * CE + w * T^2 * KL(teacher_T || student_T) over
  the same tokens (Hinton et al. 2015, "Distilling the knowledge in a neural network"). A draft
  trained this way matches the target's whole distribution, which is what the speculative
  acceptance rule rewards: with draft q and target p, a sampled draft token is accepted with
  probability sum_x min(p(x), q(x)) (Leviathan et al. 2023, "Fast inference from transformers
  via speculative decoding", §3), reported here as `acceptance_sampled`.
- The loop checkpoints every N steps and at the end; the batch of step s is a pure function of
  s (`fa2jax.data.BatchSchedule`), so `resume=True` continues bit-for-bit (on one device).

MFU uses the PaLM (Chowdhery et al. 2022, appendix B) count: 6 * matmul parameters + 12 * L * H
* D * T FLOPs per trained token, against the dense bf16 peak of the GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from fa2jax import checkpoint as ckpt
from fa2jax.config import RopeScaling, TransformerConfig
from fa2jax.data import BatchSchedule, PackedRows, eval_batches
from fa2jax.model import Transformer
from fa2jax.tokenizer import Tokenizer

# TrainConfig fields that do not change the arithmetic of training; a resumed run may change them.
_RESUME_FREE_FIELDS = frozenset({"eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                                 "log_every"})

# Dense bf16 tensor-core peak FLOP/s, by a substring of `jax.Device.device_kind` (most specific
# first). From the NVIDIA H100/H200 datasheets (SXM parts; the "with sparsity" figures halved).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: batch geometry, optimizer, schedule and bookkeeping intervals."""

    steps: int = 1000  # optimizer steps in the whole run (the schedule's length)
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # T, tokens per packed row
    learning_rate: float = 3e-4  # peak, reached after warmup
    min_lr_ratio: float = 0.1  # final learning rate / peak
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global gradient norm limit
    seed: int = 0  # initialisation and data order
    distill_weight: float = 0.0  # w in (1 - w) * CE + w * KL; used only with a teacher
    distill_temperature: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 16
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

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
class Preset:
    """A named model size with training settings and a BPE vocabulary that suit it."""

    model: TransformerConfig  # vocab_size is replaced by the tokenizer's
    train: TrainConfig
    bpe_vocab: int  # vocabulary to train the BPE tokenizer to


def presets() -> dict[str, Preset]:
    """tiny: minutes on a CPU. draft-20m / target-1b: the speculative pair, for one H100/H200."""
    return {
        "tiny": Preset(
            TransformerConfig.tiny(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                                   d_ff=384, max_len=256),
            TrainConfig(steps=300, batch_size=8, seq_len=256, learning_rate=2e-3, warmup_steps=30,
                        eval_every=100, checkpoint_every=100),
            bpe_vocab=4096,
        ),
        "draft-20m": Preset(
            TransformerConfig.draft_20m(),
            TrainConfig(steps=4000, batch_size=32, seq_len=1024, learning_rate=1e-3, warmup_steps=200,
                        eval_every=250, checkpoint_every=500),
            bpe_vocab=32000,
        ),
        "target-1b": Preset(
            TransformerConfig.target_1b(),
            TrainConfig(steps=4000, batch_size=4, grad_accum=16, seq_len=2048, learning_rate=3e-4,
                        warmup_steps=200, eval_every=250, eval_batches=8, checkpoint_every=250),
            bpe_vocab=32000,
        ),
    }


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken; also the position in the data order
    params: Any  # nnx.State of the model's nnx.Param variables, in param_dtype (float32)
    opt_state: Any  # optax state over `params`

    def to_tree(self) -> dict:
        """The checkpointed form (plain dict keys: stable, readable tree paths)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


# ------------------------------------------------------------------------------ optimizer & loss


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the warmup-cosine schedule (no decay on vectors)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )


def target_mask(segment_ids: jax.Array) -> jax.Array:
    """Which next-token targets count: same segment as the input token, not padding.

    Args:
      segment_ids: [B, T] int, 0 = padding.

    Returns:
      [B, T-1] bool, entry t is whether token t+1 is a valid target for position t.
    """
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)


def cross_entropy_sum(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over valid targets, and their count.

    Args:
      logits: [B, T, V] float32.
      tokens: [B, T] int32.
      segment_ids: [B, T] int32.

    Returns:
      (nll_sum [], count []) in float32.
    """
    mask = target_mask(segment_ids)  # [B, T-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])  # [B, T-1]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def distillation_kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, segment_ids: jax.Array,
                        temperature: float) -> jax.Array:
    """Sum over valid positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Args:
      student_logits, teacher_logits: [B, T, V] float32, same vocabulary.
      segment_ids: [B, T] int32; positions whose next token is not a valid target are skipped.
      temperature: T; the T^2 factor keeps gradient sizes comparable across temperatures.

    Returns:
      [] float32.
    """
    mask = target_mask(segment_ids)  # [B, T-1]
    log_q = jax.nn.log_softmax(student_logits[:, :-1] / temperature, axis=-1)  # [B, T-1, V]
    log_p = jax.nn.log_softmax(teacher_logits[:, :-1] / temperature, axis=-1)  # [B, T-1, V]
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, T-1]
    return temperature**2 * jnp.sum(jnp.where(mask, kl, 0.0))


def acceptance_sums(draft_logits: jax.Array, target_logits: jax.Array, segment_ids: jax.Array) -> dict:
    """Per-token speculative acceptance of a draft against a target, summed over valid positions.

    `sampled`: sum_x min(p(x), q(x)), the chance that a token sampled from the draft q survives
    the speculative-sampling test against the target p (temperature 1). `greedy`: whether the two
    argmaxes agree (greedy verification). Divide by `count` for rates.

    Args:
      draft_logits, target_logits: [B, T, V] float32.
      segment_ids: [B, T] int32.

    Returns:
      {"sampled": [], "greedy": [], "count": []} float32.
    """
    mask = target_mask(segment_ids)  # [B, T-1]
    q = jax.nn.softmax(draft_logits[:, :-1], axis=-1)  # [B, T-1, V]
    p = jax.nn.softmax(target_logits[:, :-1], axis=-1)  # [B, T-1, V]
    sampled = jnp.sum(jnp.minimum(p, q), axis=-1)  # [B, T-1]
    greedy = jnp.argmax(draft_logits[:, :-1], -1) == jnp.argmax(target_logits[:, :-1], -1)  # [B, T-1]
    return {
        "sampled": jnp.sum(jnp.where(mask, sampled, 0.0)),
        "greedy": jnp.sum(mask & greedy).astype(jnp.float32),
        "count": jnp.sum(mask).astype(jnp.float32),
    }


# ----------------------------------------------------------------------------------- model state


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParts:
    """A Transformer split for functional use: graphdef (static), params, other variables."""

    config: TransformerConfig
    graphdef: Any
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of every other variable (empty for the plain model)

    @classmethod
    def init(cls, config: TransformerConfig, seed: int, abstract: bool = False) -> ModelParts:
        """A freshly initialised model; `abstract=True` gives ShapeDtypeStruct params (no memory)
        to load a checkpoint into."""
        make = lambda: Transformer(config, rngs=nnx.Rngs(seed))  # noqa: E731
        graphdef, params, rest = nnx.split(nnx.eval_shape(make) if abstract else make(), nnx.Param, ...)
        if abstract and jax.tree.leaves(rest):  # non-parameter variables are not checkpointed
            rest = nnx.split(make(), nnx.Param, ...)[2]
        return cls(config, graphdef, params, rest)

    def module(self) -> Transformer:
        """The nnx Transformer with these parameters (e.g. for decoding after `load_model`)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def inference_module(self) -> Transformer:
        """The Transformer with its floating parameters cast once to the compute dtype: a bf16
        model then reads bf16 weights rather than casting its float32 masters on every step."""
        cast = lambda x: x.astype(self.config.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        return nnx.merge(self.graphdef, jax.tree.map(cast, self.params), self.rest)

    def logits(self, params: Any, rest: Any, batch: dict) -> jax.Array:
        """[B, T, V] float32 logits of a packed batch (tokens / segment_ids / positions [B, T])."""
        model = nnx.merge(self.graphdef, params, rest)
        return model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def training_flops_per_token(config: TransformerConfig, num_params: int, seq_len: int) -> float:
    """Forward + backward FLOPs per token (PaLM appendix B; causal masking not discounted)."""
    matmul_params = num_params - (0 if config.tie_embeddings else config.vocab_size * config.d_model)
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, or None (CPU, unknown part)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return None
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops
    return None


# ------------------------------------------------------------------------------------ jitted steps


def make_train_step(parts: ModelParts, cfg: TrainConfig, tx: optax.GradientTransformation,
                    teacher: ModelParts | None = None):
    """Builds `step(state, rest, batch, teacher_params, teacher_rest) -> (state, metrics)`, jitted.

    The `state` passed in is donated (its buffers are reused): use only the returned one.

    `batch` holds [grad_accum * batch_size, T] arrays; they are split into `grad_accum`
    micro-batches scanned in order, gradients summed, and divided by the total target count.
    Teacher arguments are None without a teacher.
    """
    distill = teacher is not None and cfg.distill_weight > 0
    schedule = learning_rate_schedule(cfg)

    def micro_loss(params, rest, micro, t_params, t_rest):
        logits = parts.logits(params, rest, micro)  # [B, T, V]
        nll, count = cross_entropy_sum(logits, micro["tokens"], micro["segment_ids"])
        if not distill:
            return nll, (nll, count, jnp.zeros(()))
        t_logits = jax.lax.stop_gradient(teacher.logits(t_params, t_rest, micro))  # [B, T, V]
        kl = distillation_kl_sum(logits, t_logits, micro["segment_ids"], cfg.distill_temperature)
        return (1 - cfg.distill_weight) * nll + cfg.distill_weight * kl, (nll, count, kl)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    # The old state is donated: a 1B model's params + AdamW moments are 13 GB not to hold twice.
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, rest, batch, t_params, t_rest):
        micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, cfg.batch_size, *x.shape[1:]), batch)

        def body(carry, mb):
            g_sum, nll_sum, count_sum, kl_sum = carry
            g, (nll, count, kl) = grad_fn(state.params, rest, mb, t_params, t_rest)
            g_sum = jax.tree.map(jnp.add, g_sum, g)
            return (g_sum, nll_sum + nll, count_sum + count, kl_sum + kl), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (g_sum, nll_sum, count, kl_sum), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": nll_sum / denom,
            "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
            "lr": schedule(state.step),
            "targets": count,
        }
        if distill:
            metrics["distill_kl"] = kl_sum / denom
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(parts: ModelParts):
    """Builds `eval_step(params, rest, batch) -> (nll_sum, count)`, jitted."""

    @jax.jit
    def eval_step(params, rest, batch):
        logits = parts.logits(params, rest, batch)
        return cross_entropy_sum(logits, batch["tokens"], batch["segment_ids"])

    return eval_step


def evaluate(parts: ModelParts, params: Any, rows: PackedRows, batch_size: int, max_batches: int,
             eval_step=None) -> dict:
    """Mean next-token loss and perplexity over the first `max_batches` batches of `rows`."""
    eval_step = eval_step or make_eval_step(parts)
    nll, count = 0.0, 0.0
    for batch in eval_batches(rows, batch_size, max_batches):
        n, c = eval_step(params, parts.rest, batch)
        nll, count = nll + float(n), count + float(c)
    if count == 0:
        raise ValueError(f"no validation targets in {rows.num_rows=} rows")
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def measure_acceptance(draft: ModelParts, draft_params: Any, target: ModelParts, rows: PackedRows,
                       batch_size: int, max_batches: int) -> dict:
    """Per-token speculative acceptance rates of `draft` against `target` on `rows`."""

    @jax.jit
    def sums(d_params, d_rest, t_params, t_rest, batch):
        return acceptance_sums(draft.logits(d_params, d_rest, batch), target.logits(t_params, t_rest, batch),
                               batch["segment_ids"])

    total = {"sampled": 0.0, "greedy": 0.0, "count": 0.0}
    for batch in eval_batches(rows, batch_size, max_batches):
        out = sums(draft_params, draft.rest, target.params, target.rest, batch)
        total = {k: total[k] + float(out[k]) for k in total}
    count = max(total["count"], 1.0)
    return {"acceptance_sampled": total["sampled"] / count, "acceptance_greedy": total["greedy"] / count}


# --------------------------------------------------------------------------------- checkpoints io


def model_config_from_dict(values: dict) -> TransformerConfig:
    """Rebuilds a TransformerConfig stored by `fa2jax.checkpoint.config_to_dict`."""
    values = dict(values)
    if isinstance(values.get("rope_scaling"), dict):
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    return ckpt.config_from_dict(TransformerConfig, values)


def load_model(path: str | os.PathLike, config: TransformerConfig | None = None) -> ModelParts:
    """A model from a training checkpoint folder (`step_*`) or run folder (its newest checkpoint).

    Args:
      path: checkpoint or run folder.
      config: overrides the stored model config (e.g. another attention_impl); must have the
        same parameter shapes.

    Returns:
      ModelParts holding the checkpoint's parameters.
    """
    path = resolve_checkpoint(path)
    meta = ckpt.read_metadata(path)
    config = config or model_config_from_dict(meta["model_config"])
    parts = ModelParts.init(config, seed=0, abstract=True)
    loaded, _ = ckpt.load_checkpoint(path, {"params": parts.params}, strict=False)
    return dataclasses.replace(parts, params=loaded["params"])


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """`path` itself if it is a checkpoint, else the newest checkpoint under it or its checkpoints/."""
    path = Path(path)
    if (path / ckpt.META_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = ckpt.latest_checkpoint(folder)
        if found is not None:
            return found
    raise ValueError(f"no checkpoint in {str(path)=}")


# ------------------------------------------------------------------------------- metrics and plots


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drops records after `last_step`: a resumed run rewrites the steps lost since its checkpoint."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_loss_curve(records: list[dict], path: str | os.PathLike) -> None:
    """Training and validation loss against step, as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------------------------- the loop


def _check_resume(meta: dict, model_config: TransformerConfig, cfg: TrainConfig, rows: PackedRows) -> None:
    saved_model = meta["model_config"]
    if saved_model != ckpt.config_to_dict(model_config):
        raise ValueError(f"resume with a different model config: {saved_model=}")
    now = ckpt.config_to_dict(cfg)
    changed = {k: (v, now.get(k)) for k, v in meta["train_config"].items()
               if now.get(k) != v and k not in _RESUME_FREE_FIELDS}
    if changed:
        raise ValueError(f"resume would not continue the same run; (saved, now): {changed=}")
    if meta["data_fingerprint"] != rows.fingerprint():
        raise ValueError(f"resume on different training data: {meta['data_fingerprint']=} != "
                         f"{rows.fingerprint()=}")


def train(
    model_config: TransformerConfig,
    cfg: TrainConfig,
    train_rows: PackedRows,
    val_rows: PackedRows,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    resume: bool = False,
    teacher: str | os.PathLike | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    stop_after_seconds: float | None = None,
) -> dict:
    """Trains (or continues training) a Transformer, writing checkpoints, metrics and a plot.

    Args:
      model_config: the model to train.
      cfg: training configuration; `cfg.seq_len` must equal the rows' T.
      train_rows, val_rows: packed data (`fa2jax.data.pack_documents`).
      out_dir: run folder: checkpoints/, metrics.jsonl, loss.png.
      tokenizer: saved into every checkpoint.
      resume: continue from the newest checkpoint in out_dir, if any (else start afresh).
      teacher: checkpoint or run folder of a model with the same vocabulary to distil from
        (requires cfg.distill_weight > 0 to change the loss; acceptance is reported either way).
      stop_at: leave the loop after this step (a checkpoint is written), as if killed there;
        the schedule still spans cfg.steps.
      progress: show a tqdm bar.
      stop_after_seconds: leave the loop (with a checkpoint) at the first logging step after this
        much wall time, so long runs fit in fixed-length jobs and continue with `resume`.

    Returns:
      The last metrics: step, loss, val_loss, val_ppl, and acceptance rates with a teacher.
    """
    from tqdm.auto import tqdm

    if train_rows.seq_len != cfg.seq_len or val_rows.seq_len != cfg.seq_len:
        raise ValueError(f"rows must have T = {cfg.seq_len=}: {train_rows.seq_len=} {val_rows.seq_len=}")
    if cfg.seq_len > model_config.max_len:
        raise ValueError(f"{cfg.seq_len=} exceeds {model_config.max_len=}")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    latest = ckpt.latest_checkpoint(ckpt_dir) if resume else None
    # Resuming needs only the shapes to load into: no initialisation of a model about to be replaced.
    parts = ModelParts.init(model_config, cfg.seed, abstract=latest is not None)
    tx = make_optimizer(cfg)
    init_opt = jax.eval_shape(tx.init, parts.params) if latest is not None else tx.init(parts.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=parts.params, opt_state=init_opt)
    # From here the parameters live only in `state` (donated by each step).
    parts = dataclasses.replace(parts, params=None)
    schedule = BatchSchedule(train_rows, cfg.rows_per_step, seed=cfg.seed)

    teacher_parts = None
    if teacher is not None:
        teacher_parts = load_model(teacher)
        if teacher_parts.config.vocab_size != model_config.vocab_size:
            raise ValueError(f"distillation needs one vocabulary: {teacher_parts.config.vocab_size=} != "
                             f"{model_config.vocab_size=}")
    meta = {
        "model_config": ckpt.config_to_dict(model_config),
        "train_config": ckpt.config_to_dict(cfg),
        "data_fingerprint": train_rows.fingerprint(),
        "teacher": None if teacher is None else str(teacher),
    }

    summary: dict[str, Any] = {}
    if latest is not None:
        _check_resume(ckpt.read_metadata(latest), model_config, cfg, train_rows)
        tree, saved_meta = ckpt.load_checkpoint(latest, state.to_tree())
        state = TrainState(**tree)
        summary.update(saved_meta.get("summary", {}))
        truncate_metrics(metrics_path, int(state.step))
    else:
        metrics_path.unlink(missing_ok=True)

    def acceptance(params):
        return measure_acceptance(parts, params, teacher_parts, val_rows, cfg.batch_size, cfg.eval_batches)

    if teacher_parts is not None and "acceptance_before" not in summary:
        before = acceptance(state.params)
        summary["acceptance_before"] = before
        append_metrics(metrics_path, {"step": int(state.step), **{f"{k}_before": v for k, v in before.items()}})

    train_step = make_train_step(parts, cfg, tx, teacher_parts)
    eval_step = make_eval_step(parts)
    t_params = teacher_parts.params if teacher_parts is not None else None
    t_rest = teacher_parts.rest if teacher_parts is not None else None
    flops_per_token = training_flops_per_token(model_config, count_params(state.params), cfg.seq_len)
    peak = peak_flops()

    def save(step):
        ckpt.save_checkpoint(ckpt_dir, step, state.to_tree(), {**meta, "summary": summary}, tokenizer,
                             keep=cfg.keep_checkpoints)

    start = int(state.step)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True)
    last = {"step": start}
    t0, interval = time.perf_counter(), []
    wall_start = t0
    for step in range(start, end):
        state, metrics = train_step(state, parts.rest, schedule.batch(step), t_params, t_rest)
        interval.append(metrics)  # device arrays: no wait here, steps keep queueing
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            host = jax.device_get(interval)  # waits for the last step to finish
            elapsed = time.perf_counter() - t0
            # Means over the interval (a single step's loss is noisy); the learning rate now.
            record = {"step": done, "epoch": schedule.epoch_of(step),
                      **{k: float(np.mean([m[k] for m in host])) for k in host[-1]},
                      "lr": float(host[-1]["lr"]),
                      "tokens_per_s": len(host) * cfg.tokens_per_step / elapsed}
            if peak is not None:
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
            append_metrics(metrics_path, record)
            last.update(record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "tokens_per_s", "mfu") if k in record})
            t0, interval = time.perf_counter(), []
        # A run stopped for time reports the model it leaves: evaluated (and its acceptance
        # measured) at the stopping step, not at the last scheduled evaluation.
        out_of_time = (stop_after_seconds is not None and done % cfg.log_every == 0
                       and time.perf_counter() - wall_start > stop_after_seconds)
        if done % cfg.eval_every == 0 or done == end or out_of_time:
            ev = evaluate(parts, state.params, val_rows, cfg.batch_size, cfg.eval_batches, eval_step)
            append_metrics(metrics_path, {"step": done, **ev})
            last.update(ev)
            bar.write(f"step {done}: val_loss {ev['val_loss']:.4f}  val_ppl {ev['val_ppl']:.2f}")
            t0 = time.perf_counter()  # eval time is not training throughput
        if done % cfg.checkpoint_every == 0 or done == end or out_of_time:
            if (done == cfg.steps or out_of_time) and teacher_parts is not None:
                summary["acceptance_after"] = acceptance(state.params)
                append_metrics(metrics_path, {"step": done, **{f"{k}_after": v
                                                              for k, v in summary["acceptance_after"].items()}})
            save(done)
            t0 = time.perf_counter()
        if out_of_time:
            bar.write(f"stopping after {time.perf_counter() - wall_start:.0f} s at step {done}: resume to continue")
            break
    bar.close()
    if start >= end and ckpt.latest_checkpoint(ckpt_dir) is None:
        save(start)
    plot_loss_curve(read_metrics(metrics_path), out_dir / "loss.png")
    return {**last, **summary}
