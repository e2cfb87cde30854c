"""Train an fa2jax Transformer on real text: the `fa2jax-train` command (fa2jax.training.command).

  python examples/train.py --preset tiny                      # CPU, the stdlib as data, minutes
  python examples/train.py --preset target-1b --out out/target
  python examples/train.py ... --resume --steps 6000          # continue the run in --out, extended
  python examples/train.py --preset target-1b --mesh data=8   # across 8 devices (or data=2,fsdp=2,model=2)
  python examples/train.py ... --seq-len 8192 --mesh data=1,context=4   # each row split over 4 devices

`python examples/train.py --help` lists every flag. Needs the `examples` extra:
pip install 'fa2jax[examples]'.
"""
import sys

from fa2jax.training.command import cli_main, main  # noqa: F401  (main: tests call it in-process)

if __name__ == "__main__":
    sys.exit(cli_main())
