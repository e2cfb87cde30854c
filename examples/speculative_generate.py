"""Speculative generation from the command line, timed against the target decoding alone.

  python examples/speculative_generate.py --target out/target --draft out/draft --prompt "import os"
  python examples/speculative_generate.py --target hf/llama --draft hf/small --tree 1,1,3,1,1,1,1,1
  python examples/speculative_generate.py ... --dynamic-tree 24 --verify stochastic --temperature 0.8
  python examples/speculative_generate.py ... --draft out/d1 --draft out/d2 --tree 1,1,3 --tree 2,1
  python examples/speculative_generate.py --target hf/smollm2 --draft hf/smollm2 --chat --prompt "Hi!" \
      --verify stochastic --temperature 0.7 --top-k 50 --min-p 0.05 --stop "<|im_end|>"

A model is a run folder or checkpoint written by examples/train.py, or a Hugging Face Llama
folder (config.json + safetensors). With one prompt, the speculative continuation is streamed to
stdout as its tokens are accepted; with several, each is printed when done. Then a table:
tokens/s of the incremental and the speculative decoding (each compiled by a first run, timed on a second),
the speedup, tokens per step, the acceptance histogram and, when greedy, whether the tokens equal
the incremental ones; and the cost model that predicts the speedup from timed pieces.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jinja2.sandbox
import jax

from fa2jax import load_pretrained, load_tokenizer
from fa2jax.model import with_invariant_rows, with_min_len
from fa2jax.tokenizer import ByteTokenizer
from spec import DynamicTree, ExpansionTree, MergedTree, SpeculativeDecoder
from spec.comparison import Report, check_verify, compare, decode_text, encode_prompts, format_report, pad_prompts
from spec.streaming import TextStreamer, cut_at_stop

def read_tokenizer(target, choice: str | None = None):
    """The tokenizer of the --tokenizer flag: "bytes", a model folder or tokenizer file, or None
    for the target's own."""
    return ByteTokenizer() if choice == "bytes" else load_tokenizer(choice or target)


def safe_decode(tokenizer):
    """decode(ids) that drops ids past the tokenizer's vocabulary (a model's may be rounded up past it)."""
    size = getattr(tokenizer, "vocab_size", None)
    return lambda ids: tokenizer.decode([int(i) for i in ids if size is None or i < size])


def cut_text(tokenizer, ids, stop_strings) -> str:
    """Text of a finished continuation, cut before its stop string."""
    return cut_at_stop(decode_text(tokenizer, ids), stop_strings or ())


# ------------------------------------------------------------------------------------------ chat


def render_chat_template(folder, messages: list[dict]) -> str:
    """The chat template of a Hugging Face folder (tokenizer_config.json's `chat_template`, or
    chat_template.jinja) rendered with jinja2, ending with the assistant's turn header.

    A fallback for tokenizers without `apply_chat_template` (fa2jax's, until they grow one)."""
    folder = Path(folder) if Path(folder).is_dir() else Path(folder).parent
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        raise ValueError(f"--chat needs a chat template: none in {str(folder)!r} (tokenizer_config.json "
                         f"chat_template or chat_template.jinja)")

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    # Templates are data from the model folder: the sandbox keeps them from reaching Python.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v is not None}
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


def chat_ids(tokenizer, folder, text: str) -> list[int]:
    """`text` as one user turn under the model's chat template, as token ids."""
    messages = [{"role": "user", "content": text}]
    if hasattr(tokenizer, "apply_chat_template"):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return tokenizer.encode(render_chat_template(folder, messages))


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
    trees = [ExpansionTree.parse(w) for w in widths or []] or [ExpansionTree.specinfer()]
    if len(trees) == 1:
        trees = trees * num_drafts
    if len(trees) != num_drafts:
        raise ValueError(f"give one --tree for every draft or one per draft: {len(trees)=} {num_drafts=}")
    return trees[0] if num_drafts == 1 else MergedTree(tuple(trees))


# -------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="train.py run/checkpoint folder or Hugging Face Llama folder")
    p.add_argument("--draft", action="append", required=True, help="a draft model; repeat for several")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    prompts.add_argument("--prompt-file", help="a file whose whole text is the prompt")
    p.add_argument("--tokenizer", help='"bytes", a model folder or a fa2jax tokenizer file (default: the target\'s)')
    trees = p.add_mutually_exclusive_group()
    trees.add_argument("--tree", action="append",
                       help="expansion widths per depth, e.g. 1,1,3,1,1,1,1,1; one for all drafts or one each")
    trees.add_argument("--dynamic-tree", type=int, metavar="N", help="a DynamicTree of N nodes (one draft)")
    p.add_argument("--depth", type=int, default=5, help="levels of --dynamic-tree")
    p.add_argument("--tree-top-k", type=int, default=4, help="children considered per node by --dynamic-tree")
    p.add_argument("--verify", choices=("greedy", "stochastic"), default="greedy",
                   help="greedy: the target's greedy tokens exactly; stochastic: its sampling distribution exactly")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="softmax temperature; 0 for greedy; > 0 needs --verify stochastic")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only; 0 keeps all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 keeps all")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the most likely one; 0 keeps all")
    p.add_argument("--stop", action="append",
                   help="end a continuation at this string (it is not printed); repeat for several")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of both decodings")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run the target batch-invariant (config.invariant_rows = tree nodes), so that greedy "
                        "output over a chain tree equals incremental decoding bit for bit on a GPU in bf16")
    return p.parse_args(argv)


def main(argv=None) -> Report:
    args = parse_args(argv)
    texts = args.prompt or [Path(args.prompt_file).read_text(encoding="utf-8")]
    tokenizer = read_tokenizer(args.target, args.tokenizer)
    check_verify(args.verify, args.temperature)
    if args.chat:
        prompt, lengths = pad_prompts([chat_ids(tokenizer, args.tokenizer or args.target, t) for t in texts])
    else:
        prompt, lengths = encode_prompts(tokenizer, texts)
    tree = build_tree(args.tree, args.dynamic_tree, len(args.draft), args.depth, args.tree_top_k)
    # RoPE has no learned length: a train.py model's max_len, set for training, is raised to what this run needs.
    needed = prompt.shape[1] + args.max_new_tokens + tree.num_nodes
    target = with_min_len(load_pretrained(args.target), needed)
    if args.batch_invariant:
        target = with_invariant_rows(target, tree.num_nodes)
    drafts = [with_min_len(load_pretrained(d), needed) for d in args.draft]
    eos = None if args.ignore_eos else getattr(tokenizer, "eos_ids", tokenizer.eos_id)
    decode = safe_decode(tokenizer)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, min_p=args.min_p, eos_id=eos, stop_strings=args.stop, decode=decode)
    if len(texts) == 1:
        # The same seed as the timed runs below: this is the speculative continuation they time.
        print(f"--- prompt\n{texts[0]}\n--- continuation", flush=True)
        streamer = TextStreamer(decode, lambda s: print(s, end="", flush=True), stop_strings=args.stop or ())
        SpeculativeDecoder(target, drafts, tree=tree, verify=args.verify).generate(
            prompt, lengths, rng=jax.random.key(args.seed), stream=streamer, **sampling)
        streamer.flush()
        print("\n")
    report = compare(target, drafts, tree, prompt, lengths, verify=args.verify, seed=args.seed, **sampling)
    if len(texts) > 1:
        for text, ids in zip(texts, report.continuations()):
            print(f"--- prompt\n{text}\n--- continuation\n{cut_text(tokenizer, ids, args.stop)}\n")
    print(report.title)
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
