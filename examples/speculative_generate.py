"""Speculative generation from the command line, timed against the target decoding alone.

  python examples/speculative_generate.py --target out/target --draft out/draft --prompt "import os"
  python examples/speculative_generate.py --target hf/llama --draft hf/small --tree 1,1,3,1,1,1,1,1
  python examples/speculative_generate.py ... --dynamic-tree 24 --verify stochastic --temperature 0.8
  python examples/speculative_generate.py ... --draft out/d1 --draft out/d2 --tree 1,1,3 --tree 2,1

A model is a run folder or checkpoint written by examples/train.py, a Hugging Face folder
(config.json + safetensors) or a GGUF file. Prints each continuation, then a table: tokens/s of the
incremental and the speculative decoding (each compiled by a first run, timed on a second),
the speedup, tokens per step, the acceptance histogram and, when greedy, whether the tokens equal
the incremental ones; and the cost model that predicts the speedup from timed pieces.
The command lives in spec.cli (also the `fa2jax-generate` console script); this file only calls it.
"""
import sys

from spec.cli import cli_main, main  # noqa: F401  (main: tests call it in-process)

if __name__ == "__main__":
    sys.exit(cli_main())
