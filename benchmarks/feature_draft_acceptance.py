"""Greedy acceptance of drafts for a chat target: an EAGLE-style feature head against model drafts.

  python benchmarks/feature_draft_acceptance.py --target smollm2.gguf \
      --feature-head examples/checkpoints/smollm2-feature-draft --draft out/chat-draft \
      --prompts benchmarks/prompts/chat_eval.jsonl --num-prompts 8 --max-new-tokens 64

Each prompt becomes one user turn under the target's chat template; all prompts decode as one batch,
greedily, once incrementally and once speculatively per draft, on the same tree. Prints, per draft,
the mean tokens per step (accepted path + bonus token, averaged over every row and step), the
acceptance histogram and whether the tokens equal the incremental ones (they must), and writes the
numbers as JSON with --json. Acceptance does not depend on the device, so this runs on a CPU
(a SmolLM2-135M target, 8 prompts x 64 tokens: minutes); it times nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fa2jax import load_pretrained, load_tokenizer
from fa2jax.feature_head import load_feature_head
from fa2jax.model import with_min_len
from spec import DynamicTree, ExpansionTree, FeatureDrafter, SpeculativeDecoder, generate_incremental
from spec.cli import chat_ids, model_path
from spec.comparison import pad_prompts


def read_prompt_texts(path: str | Path, count: int) -> list[str]:
    """The first `count` "prompt" fields of a JSON Lines prompt file."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in lines[:count]]
    if not prompts:
        raise ValueError(f"no prompt in {str(path)=}")
    return prompts


def chat_prompts(tokenizer, path: str | Path, count: int) -> tuple[jax.Array, jax.Array]:
    """The first `count` prompts of a JSONL file as user turns under the chat template, right-padded:
    (prompt # [B, P] int32, lengths # [B] int32)."""
    prompt, lengths = pad_prompts([chat_ids(tokenizer, t) for t in read_prompt_texts(path, count)])
    return jnp.asarray(prompt), jnp.asarray(lengths)


def measure(target, draft, tree, prompt: jax.Array, lengths: jax.Array, baseline=None, **sampling) -> dict:
    """Greedy speculative decoding of `prompt` with `draft` on `tree`: {"mean_accepted_length" (tokens
    per verify step), "histogram" (steps emitting k tokens), "identical" (to `baseline`'s tokens, an
    incremental `GenerationResult`; None without one)}."""
    result = SpeculativeDecoder(target, draft, tree=tree).generate(prompt, lengths, **sampling)
    same = None if baseline is None else bool(np.array_equal(np.asarray(result.tokens), np.asarray(baseline.tokens)))
    return {"mean_accepted_length": float(result.stats.mean_accepted_length),
            "histogram": np.asarray(result.stats.accepted_histogram).tolist(), "identical": same}


def describe(name: str, record: dict) -> str:
    """Two lines: tokens per step, the histogram and the identity check of a `measure` record."""
    shown = "  ".join(f"{k}:{int(c)}" for k, c in enumerate(record["histogram"]) if k)
    same = {True: "yes", False: "NO", None: "not checked"}[record["identical"]]
    return (f"{name}\n    tokens per step {record['mean_accepted_length']:.2f}   steps emitting k tokens {shown}   "
            f"identical to incremental: {same}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the chat model (anything fa2jax.load_pretrained opens, or smollm2)")
    p.add_argument("--feature-head", action="append", default=[],
                   help="a feature head checkpoint (fa2jax.feature_head.save_feature_head); repeat for several")
    p.add_argument("--draft", action="append", default=[], help="an independent draft model; repeat for several")
    p.add_argument("--prompts", required=True, help='JSON Lines prompt file, one {"prompt": ...} per line')
    p.add_argument("--num-prompts", type=int, default=8, help="prompts taken from the top of the file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--tree", default="1,1,1,1,1", help="expansion widths per depth (default: a chain of 5)")
    p.add_argument("--dynamic-tree", type=int, metavar="N", help="a DynamicTree of N nodes instead of --tree")
    p.add_argument("--depth", type=int, default=5, help="levels of --dynamic-tree")
    p.add_argument("--tree-top-k", type=int, default=4, help="children considered per node by --dynamic-tree")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if not args.feature_head and not args.draft:
        p.error("give at least one --feature-head or --draft")

    args.target = model_path(args.target)  # "smollm2": the installed package's GGUF
    tokenizer = load_tokenizer(args.target)
    prompt, lengths = chat_prompts(tokenizer, args.prompts, args.num_prompts)
    tree = (DynamicTree(num_nodes=args.dynamic_tree, depth=args.depth, top_k=args.tree_top_k)
            if args.dynamic_tree else ExpansionTree.parse(args.tree))
    needed = prompt.shape[1] + args.max_new_tokens + tree.num_nodes
    target = with_min_len(load_pretrained(args.target, dtype=jnp.float32), needed)
    sampling = dict(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_ids)
    baseline = generate_incremental(target, prompt, lengths, **sampling)
    drafts = [(f"feature head {h}", FeatureDrafter(load_feature_head(h, dtype=jnp.float32), target))
              for h in args.feature_head]
    drafts += [(f"draft {d}", with_min_len(load_pretrained(d, dtype=jnp.float32), needed)) for d in args.draft]
    results = {"target": args.target, "prompts": args.prompts, "num_prompts": int(prompt.shape[0]),
               "max_new_tokens": args.max_new_tokens, "tree": repr(tree), "drafts": {}}
    print(f"{prompt.shape[0]} prompts, {args.max_new_tokens} new tokens, {tree}")
    for name, draft in drafts:
        results["drafts"][name] = measure(target, draft, tree, prompt, lengths, baseline, **sampling)
        print(describe(name, results["drafts"][name]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
