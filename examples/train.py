"""Train an fa2jax Transformer on real text with the FlashAttention-2 kernels.

  python examples/train.py --preset tiny                      # CPU, the stdlib as data, minutes
  python examples/train.py --preset target-1b --out out/target
  python examples/train.py ... --extra-train-data /path/to/site-packages/numpy --suffix .py
  python examples/train.py --preset draft-20m --teacher out/target --distill-weight 0.5
  python examples/train.py ... --teacher out/target --teacher-continuations 4096   # + the target's own text
  python examples/train.py ... --resume                       # continue the run in --out exactly

Every field of TrainConfig and the size fields of TransformerConfig are flags (--d-model,
--grad-accum, ...); unset flags keep the preset's value. Writes <out>/checkpoints/, metrics.jsonl
and loss.png. The logic lives in fa2jax.training (the command line in fa2jax.training.command,
which is also the `fa2jax-train` console script); this file only calls it.
"""
from fa2jax.training.command import main

if __name__ == "__main__":
    main()
