"""Speculative generation from the command line, timed against the target decoding alone.

  python examples/speculative_generate.py --target out/target --draft out/draft --prompt "import os"
  python examples/speculative_generate.py --target hf/llama --draft hf/small --tree 1,1,3,1,1,1,1,1
  python examples/speculative_generate.py ... --dynamic-tree 24 --verify stochastic --temperature 0.8
  python examples/speculative_generate.py ... --draft out/d1 --draft out/d2 --tree 1,1,3 --tree 2,1

A model is a run folder or checkpoint written by examples/train.py, or a Hugging Face Llama
folder (config.json + safetensors). Prints each continuation, then a table: tokens/s of the
incremental and the speculative decoding (each compiled by a first run, timed on a second),
the speedup, tokens per step, the acceptance histogram and, when greedy, whether the tokens equal
the incremental ones; and the cost model that predicts the speedup from timed pieces.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from fa2jax import Transformer, load_hf_llama
from fa2jax import checkpoint as ckpt
from fa2jax.model import with_invariant_rows
from fa2jax.tokenizer import ByteTokenizer, load_tokenizer
from fa2jax.training import load_model as load_trained
from fa2jax.training import model_config_from_dict, resolve_checkpoint
from spec import DynamicTree, ExpansionTree, MergedTree
from spec.comparison import Report, compare, format_report

# ------------------------------------------------------------------------------- models, tokenizers


def is_hf_dir(path) -> bool:
    return (Path(path) / "config.json").is_file()


class HFTokenizerFile:
    """A Hugging Face `tokenizer.json` behind the interface of `fa2jax.tokenizer`."""

    def __init__(self, directory):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self._inner = Tokenizer.from_file(str(directory / "tokenizer.json"))
        eos = json.loads((directory / "config.json").read_text()).get("eos_token_id")
        # Llama 3 configs list several end tokens; the first is the end of text.
        self.eos_id = eos[0] if isinstance(eos, list) else eos

    def encode(self, text: str) -> list[int]:
        # Special tokens included: Llama tokenizers prepend the BOS token the model was trained with.
        return self._inner.encode(text).ids

    def decode(self, ids) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=True)


def read_tokenizer(model_path, choice: str | None = None):
    """The tokenizer to encode prompts with.

    Args:
      model_path: the target's folder: its checkpoint's tokenizer, or a Hugging Face folder's
        tokenizer.json.
      choice: "bytes", a tokenizer file written by fa2jax, or None for the target's own.
    """
    if choice == "bytes":
        return ByteTokenizer()
    if choice is not None:
        return load_tokenizer(choice)
    if is_hf_dir(model_path):
        if not (Path(model_path) / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {str(model_path)=}; pass --tokenizer")
        return HFTokenizerFile(model_path)
    return ckpt.read_tokenizer(resolve_checkpoint(model_path))


def load_model(path, *, min_len: int = 0) -> Transformer:
    """A Transformer from a train.py run folder or checkpoint, or from a Hugging Face Llama folder.

    Args:
      path: the folder.
      min_len: cache slots the generation needs (prompt + new tokens + tree nodes). RoPE has no
        learned length, so a train.py model's `max_len`, set for training, is raised to it.
    """
    if is_hf_dir(path):
        return load_hf_llama(path)[1]
    config = model_config_from_dict(ckpt.read_metadata(resolve_checkpoint(path))["model_config"])
    return load_trained(path, config.replace(max_len=max(config.max_len, min_len))).module()


def decode(tokenizer, ids) -> str:
    """Text of `ids`; ids past the tokenizer's vocabulary (train.py rounds the model's up to a
    multiple of 128, and an untrained model may emit them) are dropped and counted."""
    size = getattr(tokenizer, "vocab_size", None)
    kept = [int(i) for i in ids if size is None or i < size]
    dropped = len(ids) - len(kept)
    return tokenizer.decode(kept) + (f" [{dropped} ids past the tokenizer's vocabulary]" if dropped else "")


def encode_prompts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids [B, P] int32 and lengths [B]."""
    ids = [tokenizer.encode(t) for t in texts]
    if any(len(x) == 0 for x in ids):
        raise ValueError(f"every prompt must encode to at least one token: {texts=}")
    lengths = np.array([len(x) for x in ids], np.int32)
    prompt = np.zeros((len(ids), lengths.max()), np.int32)
    for row, x in enumerate(ids):
        prompt[row, : len(x)] = x
    return prompt, lengths


# ------------------------------------------------------------------------------------------ trees


def build_tree(widths: list[str] | None, dynamic_nodes: int | None, num_drafts: int, depth: int = 5,
               top_k: int = 4):
    """The token tree of the CLI flags.

    Args:
      widths: "--tree" values like "1,1,3,1": one for every draft, or one per draft; None for
        SpecInfer's (1, 1, 3, 1, 1, 1, 1, 1).
      dynamic_nodes: node budget of a `DynamicTree` (one draft only), or None.
      num_drafts: how many drafts are loaded.
      depth, top_k: of the dynamic tree.
    """
    if dynamic_nodes is not None:
        if widths:
            raise ValueError(f"give either --tree or --dynamic-tree: {widths=} {dynamic_nodes=}")
        if num_drafts != 1:
            raise ValueError(f"a dynamic tree is grown by one draft: {num_drafts=}")
        return DynamicTree(num_nodes=dynamic_nodes, depth=depth, top_k=top_k)
    try:
        trees = [ExpansionTree(tuple(int(w) for w in s.split(","))) for s in widths or []]
    except ValueError:
        raise ValueError(f"--tree takes comma-separated positive ints, e.g. 1,1,3,1: {widths=}") from None
    trees = trees or [ExpansionTree.specinfer()]
    if len(trees) == 1:
        trees = trees * num_drafts
    if len(trees) != num_drafts:
        raise ValueError(f"give one --tree for every draft or one per draft: {len(trees)=} {num_drafts=}")
    return trees[0] if num_drafts == 1 else MergedTree(tuple(trees))


def describe(report: Report) -> str:
    return f"{report.verify} verification, {report.num_drafts} draft(s), {report.tree}"


# -------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="train.py run/checkpoint folder or Hugging Face Llama folder")
    p.add_argument("--draft", action="append", required=True, help="a draft model; repeat for several")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    prompts.add_argument("--prompt-file", help="a file whose whole text is the prompt")
    p.add_argument("--tokenizer", help='"bytes" or a fa2jax tokenizer file (default: the target\'s)')
    trees = p.add_mutually_exclusive_group()
    trees.add_argument("--tree", action="append",
                       help="expansion widths per depth, e.g. 1,1,3,1,1,1,1,1; one for all drafts or one each")
    trees.add_argument("--dynamic-tree", type=int, metavar="N", help="a DynamicTree of N nodes (one draft)")
    p.add_argument("--depth", type=int, default=5, help="levels of --dynamic-tree")
    p.add_argument("--top-k", type=int, default=4, help="children considered per node by --dynamic-tree")
    p.add_argument("--verify", choices=("greedy", "stochastic"), default="greedy")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run the target batch-invariant (config.invariant_rows = tree nodes), so that greedy "
                        "output over a chain tree equals incremental decoding bit for bit on a GPU in bf16")
    return p.parse_args(argv)


def main(argv=None) -> Report:
    args = parse_args(argv)
    texts = args.prompt or [Path(args.prompt_file).read_text(encoding="utf-8")]
    tokenizer = read_tokenizer(args.target, args.tokenizer)
    prompt, lengths = encode_prompts(tokenizer, texts)
    tree = build_tree(args.tree, args.dynamic_tree, len(args.draft), args.depth, args.top_k)
    needed = prompt.shape[1] + args.max_new_tokens + tree.num_nodes
    target = load_model(args.target, min_len=needed)
    if args.batch_invariant:
        target = with_invariant_rows(target, tree.num_nodes)
    drafts = [load_model(d, min_len=needed) for d in args.draft]
    eos = None if args.ignore_eos else tokenizer.eos_id
    report = compare(target, drafts, tree, prompt, lengths, verify=args.verify, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_id=eos)
    for text, ids in zip(texts, report.continuations()):
        print(f"--- prompt\n{text}\n--- continuation\n{decode(tokenizer, ids)}\n")
    print(describe(report))
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
