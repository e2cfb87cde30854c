"""Training a `Transformer` on packed text, one job per module:

  presets    TrainConfig and RunConfig (the named runs of examples/train.py)
  optimizer  the learning-rate schedule and the AdamW chain
  losses     cross entropy, distillation KL and speculative acceptance over packed batches
  state      ModelParts (a model split for functional use) and TrainState
  steps      the jitted train / eval steps and the validation passes built on them
  metrics    metrics.jsonl, the loss plot, FLOPs and MFU
  loop       `train`: checkpoints, resume, evaluation, distillation, stopping on faults and signals
  progress   progress bars and phase timers (tqdm only when shown)
  token_cache  the tokenised corpus of a run, kept in its folder for resumes
  cli        flag and setup helpers of examples/train.py
  continuations  a teacher's greedy continuations and sampled chat answers as training documents
  init       a draft's starting embedding from its teacher's
  feature_draft  an EAGLE-style feature head on a frozen target's hidden states
"""
from fa2jax._deprecation import renamed_attributes
from fa2jax.checkpoint import model_config_from_dict, resolve_checkpoint
from fa2jax.training.continuations import teacher_continuations
from fa2jax.training.losses import acceptance_sums, cross_entropy_sum, distillation_kl_sum, target_mask
from fa2jax.training.loop import NonFiniteLossError, check_resume, train
from fa2jax.training.metrics import (
    PEAK_BF16_FLOPS, append_metrics, count_params, peak_flops, plot_loss_curve, read_metrics,
    training_flops_per_token, truncate_metrics)
from fa2jax.training.optimizer import learning_rate_schedule, make_optimizer
from fa2jax.training.presets import RunConfig, TrainConfig, presets
from fa2jax.training.state import ModelParts, TrainState
from fa2jax.training.steps import evaluate, make_eval_step, make_train_step, measure_acceptance

__all__ = [
    "TrainConfig", "RunConfig", "presets",
    "learning_rate_schedule", "make_optimizer",
    "target_mask", "cross_entropy_sum", "distillation_kl_sum", "acceptance_sums",
    "ModelParts", "TrainState",
    "make_train_step", "make_eval_step", "evaluate", "measure_acceptance",
    "PEAK_BF16_FLOPS", "count_params", "training_flops_per_token", "peak_flops",
    "append_metrics", "read_metrics", "truncate_metrics", "plot_loss_curve",
    "train", "NonFiniteLossError", "check_resume", "teacher_continuations",
    # checkpoint-format helpers, re-exported where the training code used to define them
    "model_config_from_dict", "resolve_checkpoint",
]

# Renamed public names, still served with a DeprecationWarning.
__getattr__ = renamed_attributes(__name__, {"Preset": ("RunConfig", RunConfig)})
