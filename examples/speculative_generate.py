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
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import Transformer, load_hf_llama
from fa2jax import checkpoint as ckpt
from fa2jax.tokenizer import ByteTokenizer, load_tokenizer
from fa2jax.training import load_model as load_trained
from fa2jax.training import model_config_from_dict, resolve_checkpoint
from spec import DynamicTree, ExpansionTree, MergedTree, SpeculativeDecoder, generate_incremental
from spec.generation import call_model

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


def draft_passes(tree) -> list[int]:
    """Tree passes each draft runs per step: one per level it fills, plus one that writes the
    finished tree's K/V (`spec.draft`)."""
    if isinstance(tree, MergedTree):
        return [t.depth + 1 for t in tree.trees]
    return [tree.depth + 1]


# ----------------------------------------------------------------------------------------- timing


def timed(fn) -> tuple[object, float]:
    """(host result, seconds) of fn()'s second run: the first one compiles."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return jax.device_get(out), time.perf_counter() - start


def seconds_per_call(model: Transformer, method: str, tokens, *args, cache_len: int, context: int,
                     reps: int = 10) -> float:
    """Mean seconds of one jitted `model.method(tokens, *args, cache)` with `context` tokens cached."""
    graphdef, params = nnx.split(model)
    batch = tokens.shape[0]
    cache = model.init_cache(batch, cache_len)
    cache = cache.replace(lengths=cache.lengths + context)
    fn = jax.jit(lambda p, c: call_model(graphdef, p, method, tokens, *args, c)[0])
    jax.block_until_ready(fn(params, cache))
    start = time.perf_counter()
    for _ in range(reps):  # dispatch is asynchronous, so the calls queue back to back
        out = fn(params, cache)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


@dataclasses.dataclass(frozen=True)
class CostModel:
    """speedup ~= tokens per step x t_decode / (sum over drafts of passes x t_draft + t_verify)."""

    t_decode: float  # seconds of one target decode step (one token per row)
    t_verify: float  # seconds of one target pass over the N tree nodes
    t_draft: tuple[float, ...]  # per draft, seconds of one pass over the N tree nodes
    passes: tuple[int, ...]  # per draft, passes per step

    def speedup(self, tokens_per_step: float) -> float:
        step = sum(p * t for p, t in zip(self.passes, self.t_draft)) + self.t_verify
        return tokens_per_step * self.t_decode / step


def measure_cost_model(target, drafts, decoder: SpeculativeDecoder, batch: int, context: int) -> CostModel:
    """Times the pieces of one speculative step at a context of `context` cached tokens."""
    n = decoder.num_nodes
    nodes = jnp.zeros((batch, n), jnp.int32)
    # A chain mask: the shape of a tree pass is what costs, not which nodes are ancestors.
    mask = jnp.tril(jnp.ones((n, n), bool))
    cache_len = context + n
    return CostModel(
        t_decode=seconds_per_call(target, "decode", nodes[:, :1], cache_len=cache_len, context=context),
        t_verify=seconds_per_call(target, "verify_tree", nodes, mask, cache_len=cache_len, context=context),
        t_draft=tuple(seconds_per_call(d, "verify_tree", nodes, mask, cache_len=cache_len, context=context)
                      for d in drafts),
        passes=tuple(draft_passes(decoder.tree)))


# ------------------------------------------------------------------------------------- comparison


@dataclasses.dataclass(frozen=True)
class Report:
    """One incremental vs speculative comparison on the same prompts."""

    verify: str
    tree: object
    num_drafts: int
    prompt_lengths: np.ndarray  # [B]
    tokens: np.ndarray  # [B, P + max_new_tokens] speculative output
    lengths: np.ndarray  # [B]
    incremental_tokens: np.ndarray  # [B, P + max_new_tokens]
    incremental_lengths: np.ndarray  # [B]
    seconds: tuple[float, float]  # incremental, speculative
    new_tokens: tuple[int, int]  # incremental, speculative
    target_calls: tuple[int, int]  # incremental, speculative; prefill included
    histogram: np.ndarray  # histogram[k]: (row, step) pairs that emitted k tokens
    mean_accepted_length: float  # tokens emitted per speculative step
    cost: CostModel

    @property
    def tokens_per_s(self) -> tuple[float, float]:
        return tuple(n / s for n, s in zip(self.new_tokens, self.seconds))

    @property
    def speedup(self) -> float:
        return self.tokens_per_s[1] / self.tokens_per_s[0]

    @property
    def identical(self) -> bool | None:
        """Greedy: the speculative tokens equal the incremental ones. Sampling: None (the two draw
        different random numbers, only their distributions agree)."""
        if self.verify != "greedy":
            return None
        return bool(np.array_equal(self.lengths, self.incremental_lengths)
                    and np.array_equal(self.tokens, self.incremental_tokens))

    def continuations(self) -> list[np.ndarray]:
        return [self.tokens[b, p:n] for b, (p, n) in enumerate(zip(self.prompt_lengths, self.lengths))]


def compare(target, drafts, tree, prompt, prompt_lengths, *, verify: str = "greedy", max_new_tokens: int,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> Report:
    """Runs the incremental and the speculative decoding on the same prompts and times both.

    Args:
      target, drafts: models with one vocabulary.
      tree: ExpansionTree, MergedTree or DynamicTree.
      prompt, prompt_lengths: right-padded ids [B, P] and lengths [B].
      verify: "greedy" or "stochastic".
      max_new_tokens, temperature, top_p, eos_id: as `SpeculativeDecoder.generate`.
      seed: PRNG seed of both decodings.
    """
    if verify == "greedy" and temperature > 0:
        raise ValueError(f"greedy verification needs temperature 0: {temperature=}; use --verify stochastic")
    decoder = SpeculativeDecoder(target, drafts, tree=tree, verify=verify)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  rng=jax.random.key(seed), eos_id=eos_id)
    base, t_base = timed(lambda: generate_incremental(target, prompt, prompt_lengths, **kwargs))
    result, t_spec = timed(lambda: decoder.generate(prompt, prompt_lengths, **kwargs))
    prompt_lengths = np.asarray(prompt_lengths)
    new = lambda r: int((r.lengths - prompt_lengths).sum())  # noqa: E731
    context = int(prompt_lengths.max()) + max_new_tokens // 2  # the mean context of the run
    return Report(
        verify=verify, tree=decoder.tree, num_drafts=len(drafts), prompt_lengths=prompt_lengths,
        tokens=result.tokens, lengths=result.lengths, incremental_tokens=base.tokens,
        incremental_lengths=base.lengths, seconds=(t_base, t_spec), new_tokens=(new(base), new(result)),
        target_calls=(int(base.stats.target_calls), int(result.stats.target_calls)),
        histogram=np.asarray(result.stats.accepted_histogram),
        mean_accepted_length=float(result.stats.mean_accepted_length),
        cost=measure_cost_model(target, drafts, decoder, prompt.shape[0], context))


def format_report(report: Report) -> str:
    """The comparison as a text table."""
    inc, spe = report.tokens_per_s
    rows = [
        ("", "incremental", "speculative"),
        ("generated tokens", report.new_tokens[0], report.new_tokens[1]),
        ("target forward passes", report.target_calls[0], report.target_calls[1]),
        ("seconds", f"{report.seconds[0]:.3f}", f"{report.seconds[1]:.3f}"),
        ("tokens/s", f"{inc:.1f}", f"{spe:.1f}"),
        ("speedup", "", f"{report.speedup:.2f}x"),
        ("tokens per step", "1.00", f"{report.mean_accepted_length:.2f}"),
    ]
    lines = [f"{a:<24}{b:>12}{c:>14}" for a, b, c in rows]
    hist = "  ".join(f"{k}:{int(c)}" for k, c in enumerate(report.histogram) if k >= 1)
    lines.append(f"{'steps emitting k tokens':<24}  {hist}")
    if report.identical is not None:
        lines.append(f"tokens identical to incremental: {'yes' if report.identical else 'NO'}")
    c = report.cost
    drafts = " + ".join(f"{p} x {t * 1e3:.2f} ms" for p, t in zip(c.passes, c.t_draft))
    lines.append(
        f"cost model: {report.mean_accepted_length:.2f} tokens/step x t_decode {c.t_decode * 1e3:.2f} ms / "
        f"(draft passes {drafts} + t_verify {c.t_verify * 1e3:.2f} ms) = "
        f"{c.speedup(report.mean_accepted_length):.2f}x predicted, {report.speedup:.2f}x measured")
    return "\n".join(lines)


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
    return p.parse_args(argv)


def main(argv=None) -> Report:
    args = parse_args(argv)
    texts = args.prompt or [Path(args.prompt_file).read_text(encoding="utf-8")]
    tokenizer = read_tokenizer(args.target, args.tokenizer)
    prompt, lengths = encode_prompts(tokenizer, texts)
    tree = build_tree(args.tree, args.dynamic_tree, len(args.draft), args.depth, args.top_k)
    needed = prompt.shape[1] + args.max_new_tokens + tree.num_nodes
    target = load_model(args.target, min_len=needed)
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
