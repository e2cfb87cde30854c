"""Train an fa2jax Transformer on real text with the FlashAttention-2 kernels.

  fa2jax-train --preset tiny                      # CPU, the stdlib as data, minutes
  fa2jax-train --preset target-1b --out out/target
  fa2jax-train ... --extra-train-data /path/to/site-packages/numpy --suffix .py
  fa2jax-train --preset draft-20m --teacher out/target --distill-weight 0.5
  fa2jax-train ... --teacher out/target --teacher-continuations 4096   # + the target's own text
  fa2jax-train --teacher model.gguf --jsonl corpus.jsonl --embedding-from-teacher   # a chat draft
  fa2jax-train ... --resume                       # continue the run in --out
  fa2jax-train ... --resume --steps 6000          # ... and extend it
  fa2jax-train --preset target-1b --mesh data=8   # across 8 devices (or data=2,fsdp=2,model=2, ...)
  fa2jax-train ... --seq-len 131072 --mesh data=2,context=4   # long rows split over 4 devices each
  fa2jax-train --draft-kind feature --teacher model.gguf --data corpus/ --out out/head   # an EAGLE head

`fa2jax-train` (this module's `cli_main`) and `python examples/train.py` are the same command; it
needs the `examples` extra: pip install 'fa2jax[examples]'. Every field of TrainConfig and the size
fields of TransformerConfig are flags (--d-model, --grad-accum, ...); unset flags keep the preset's
value, or with --resume the run's own (flags that would change the model are refused). Writes
<out>/checkpoints/, metrics.jsonl, loss.png and the tokenised corpus (tokenized.npz, reused by a
resume). SIGTERM or Ctrl-C checkpoints the current step and exits; a non-finite loss stops the run
with exit status 1 and saves nothing of it. With --draft-kind feature it trains an EAGLE-style
feature head on the --teacher's hidden states instead (`fa2jax.training.feature_draft`: no resume,
no mesh; --stop-after-minutes saves the head and ends). The training lives in the other
fa2jax.training modules; this one parses the command line (`build_parser`) and runs it (`main`,
`cli_main`).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from fa2jax import load_pretrained, sharding
from fa2jax.checkpoint import CheckpointError
from fa2jax.data import Corpus, find_documents, read_jsonl_documents, split_documents
from fa2jax.feature_head import FeatureHeadConfig, parse_feature_layers
from fa2jax.loading import load_config
from fa2jax.training import NonFiniteLossError, presets, teacher_continuations, train
from fa2jax.training import cli, token_cache
from fa2jax.training.feature_draft import FeatureLossConfig, train_feature_head
from fa2jax.training.init import projected_embedding

# Model flags that a feature head may set (its own attention and MLP); the others are the target's.
FEATURE_HEAD_FLAGS = ("num_heads", "num_kv_heads", "head_dim", "d_ff")
from fa2jax.training.progress import phase


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="fa2jax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets()), default="tiny", help="model size and training settings")
    p.add_argument("--data", nargs="+", help="text files or folders (default: this Python's stdlib)")
    p.add_argument("--jsonl", nargs="+",
                   help="JSON Lines files, one document per line (its 'text'), split by line; without --data "
                        "only these are read (e.g. examples/chat_corpus.py's corpus)")
    p.add_argument("--suffix", nargs="+", help="only files ending so, e.g. .py .md (default: all text)")
    p.add_argument("--extra-train-data", nargs="+",
                   help="more files or folders for the training split only (e.g. site-packages); the validation "
                        "split, and so the speculative benchmark's held-out prompts, stay those of --data")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the --data files held out")
    p.add_argument("--tokenizer", choices=("bpe", "bytes"),
                   help="a byte-level BPE trained on the training split (default), or raw bytes")
    p.add_argument("--bpe-vocab", type=int, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--out", help="run folder (default: out/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out (an error if there is none)")
    p.add_argument("--teacher", help="model folder to distil from, with the same tokenizer (a run or checkpoint "
                                     "of this script, or a Hugging Face folder)")
    p.add_argument("--teacher-continuations", type=int, default=0,
                   help="with --teacher: add this many of the teacher's greedy continuations of training text to "
                        "the training split (a draft then also learns from text that its target writes)")
    p.add_argument("--continuation-prompt-len", type=int, default=64, help="prompt tokens per continuation")
    p.add_argument("--continuation-len", type=int, default=192, help="new tokens per continuation")
    p.add_argument("--continuation-batch", type=int, default=256, help="continuations generated per call")
    p.add_argument("--embedding-from-teacher", action="store_true",
                   help="with --teacher: start the token embedding from the teacher's, projected onto its top "
                        "--d-model principal directions (fa2jax.training.init), not from noise")
    p.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (parameters stay float32)")
    p.add_argument("--attention-impl", choices=("pallas", "xla", "cudnn"),
                   help="default: pallas on GPU, automatic elsewhere")
    p.add_argument("--mesh", help="train across the devices of this mesh, e.g. data=8 or data=2,fsdp=2,model=2: "
                                   "data/fsdp split the batch (fsdp also the parameters), model splits heads, MLP "
                                   "and vocabulary, context splits the sequence (ring attention; --seq-len a "
                                   "multiple of 2 x its size) (fa2jax.sharding); --batch-size stays the global "
                                   "micro-batch. A run may resume on another mesh")
    p.add_argument("--draft-kind", choices=("model", "feature"), default="model",
                   help="model: train a Transformer (a target, or a draft distilled from --teacher); feature: train "
                        "an EAGLE-style feature head (one decoder layer) on the hidden states of --teacher, which it "
                        "drafts for with spec.FeatureDrafter")
    p.add_argument("--feature-weight", type=float, default=1.0,
                   help="--draft-kind feature: weight of the smooth-L1 loss on the target's next hidden state")
    p.add_argument("--token-weight", type=float, default=0.1,
                   help="--draft-kind feature: weight of the cross entropy against the target's next-token "
                        "distribution")
    p.add_argument("--input-noise", type=float, default=0.0,
                   help="--draft-kind feature: amplitude a of U(-a, a) noise on the target features the head reads")
    p.add_argument("--unroll-steps", type=int, default=1,
                   help="--draft-kind feature: passes of the head per batch; pass k >= 2 reads the head's own "
                        "predictions of pass k - 1, as it does below a draft tree's first level (a training-time "
                        "test); 1 is EAGLE's one-pass loss")
    p.add_argument("--unroll-weight", type=float, default=1.0,
                   help="--draft-kind feature: pass k's loss counts this ** (k - 1) times")
    p.add_argument("--unroll-gradient", action="store_true",
                   help="--draft-kind feature: backpropagate pass k's loss through the predictions it reads "
                        "(HASS); default: they are constants")
    p.add_argument("--feature-layers", default="",
                   help="--draft-kind feature: the teacher's inner layers the head reads besides its final hidden "
                        "state, fused (EAGLE-3): 'eagle3' (low, middle, high) or comma-separated indices; default: "
                        "none")
    p.add_argument("--save-dtype", help="--draft-kind feature: dtype of the saved head, e.g. bfloat16 "
                                        "(default: float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (and no tqdm import)")
    p.add_argument("--stop-after-minutes", type=float,
                   help="checkpoint and exit after this much training time (continue with --resume)")
    cli.add_config_flags(p, presets()["tiny"].model)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = presets()[args.preset]
    show = not args.no_progress
    # Everything that can fail on the command line alone fails here, before any data is read.
    out = cli.check_writable(args.out or f"out/{args.preset}")
    loss_cfg = _check_feature_flags(args) if args.draft_kind == "feature" else _refuse_feature_flags(args)
    try:
        mesh = sharding.parse_mesh(args.mesh) if args.mesh else None
    except ValueError as e:
        raise cli.UsageError(f"--mesh: {e}") from None
    needs_bpe = not args.resume and not args.teacher and (args.tokenizer or "bpe") == "bpe"
    cli.check_extras(["matplotlib", *(["tqdm"] if show else []), *(["tokenizers"] if needs_bpe else [])])
    resumed = cli.resumed_run(out, args, run) if args.resume else None
    if args.teacher_continuations and not args.teacher:
        raise cli.UsageError(f"--teacher-continuations {args.teacher_continuations} needs --teacher")

    if args.embedding_from_teacher and (not args.teacher or args.resume):
        raise cli.UsageError("--embedding-from-teacher starts a new run from a --teacher: give --teacher, drop --resume")
    docs = find_documents(args.data, args.suffix) if args.data or not args.jsonl else []
    docs += [d for path in args.jsonl or () for d in read_jsonl_documents(path)]
    corpus = split_documents(docs, args.val_fraction)
    extra = tuple(find_documents(args.extra_train_data, args.suffix)) if args.extra_train_data else ()
    corpus = Corpus(train=corpus.train + extra, val=corpus.val)
    print(f"{len(docs) + len(extra)} files: {len(corpus.train)} train ({len(extra)} training-only), "
          f"{len(corpus.val)} validation")

    if resumed is not None:  # the run's own configs and tokenizer, with the flags given applied
        model_cfg, train_cfg, tokenizer, latest = resumed
        print(f"resuming the run of {latest}")
    else:
        train_cfg = cli.train_config(run, args)
        tokenizer = cli.new_tokenizer(args.tokenizer or "bpe", (d.text for d in corpus.train),
                                      args.bpe_vocab or run.bpe_vocab, teacher=args.teacher, show_progress=show)
        vocab = load_config(args.teacher).vocab_size if args.teacher else cli.padded_vocab(tokenizer.vocab_size)
        model_cfg = cli.model_config(run, args, vocab_size=vocab, seq_len=train_cfg.seq_len, dtype=args.dtype,
                                     attention_impl=args.attention_impl)

    generated = {"teacher": args.teacher, "count": args.teacher_continuations, "prompt_len": args.continuation_prompt_len,
                 "len": args.continuation_len, "batch": args.continuation_batch} if args.teacher_continuations else {}
    key = token_cache.corpus_key(corpus, tokenizer, train_cfg.seq_len, generated)
    rows = token_cache.load(out, key)
    if rows is not None:
        print(f"read the tokenised corpus from {out / token_cache.CACHE_FILE}")
    else:
        if args.teacher_continuations:
            start = time.perf_counter()
            with phase("teacher continuations", show):
                continuations = teacher_continuations(
                    load_pretrained(args.teacher), tokenizer, corpus.train, count=args.teacher_continuations,
                    prompt_len=args.continuation_prompt_len, new_tokens=args.continuation_len,
                    batch=args.continuation_batch)
            corpus = Corpus(train=corpus.train + continuations, val=corpus.val)
            print(f"{len(continuations)} teacher continuations in {time.perf_counter() - start:.0f} s")
        rows = token_cache.tokenize_corpus(corpus, tokenizer, train_cfg.seq_len, show_progress=show)
        token_cache.save(out, key, rows)
    train_rows, val_rows = rows
    print(f"{train_rows.num_rows} x {train_cfg.seq_len} training rows, {val_rows.num_rows} validation rows, "
          f"vocabulary {tokenizer.vocab_size}")
    if loss_cfg is not None:
        return _train_feature_head(args, train_cfg, loss_cfg, train_rows, val_rows, out, tokenizer, show)
    embedding = None
    if args.embedding_from_teacher:
        embedding = projected_embedding(load_pretrained(args.teacher).embed.embedding[...], model_cfg.d_model)
    summary = train(model_cfg, train_cfg, train_rows, val_rows, out, tokenizer, resume=args.resume,
                    teacher=args.teacher, progress=show, embedding=embedding,
                    stop_after_seconds=args.stop_after_minutes and 60 * args.stop_after_minutes, mesh=mesh)
    for key in ("step", "loss", "val_loss", "val_ppl", "acceptance_before", "acceptance_after"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"wrote {out}/checkpoints, {out}/metrics.jsonl, {out}/loss.png")
    return summary


# Flags that only --draft-kind feature reads (dest names).
FEATURE_ONLY_FLAGS = ("feature_weight", "token_weight", "input_noise", "unroll_steps", "unroll_weight",
                      "unroll_gradient", "feature_layers", "save_dtype")


def _refuse_feature_flags(args) -> None:
    """--draft-kind model: a feature-head flag set to anything but its default would do nothing."""
    parser = build_parser()
    given = [cli._flag(dest) for dest in FEATURE_ONLY_FLAGS if getattr(args, dest) != parser.get_default(dest)]
    if given:
        raise cli.UsageError(f"{given} only apply to --draft-kind feature (this run trains a model: "
                             f"--draft-kind {args.draft_kind})")


def _check_feature_flags(args) -> FeatureLossConfig:
    """The loss config of --draft-kind feature, after refusing the flags it cannot honour."""
    if not args.teacher:
        raise cli.UsageError("--draft-kind feature needs --teacher: the target whose hidden states the head predicts")
    refused = [flag for flag, given in (("--resume", args.resume), ("--mesh", args.mesh)) if given]
    refused += [cli._flag(name) for name in cli.set_flags(args, cli.MODEL_FLAGS) if name not in FEATURE_HEAD_FLAGS]
    if refused:
        raise cli.UsageError(f"--draft-kind feature does not take {refused}: the head's width, vocabulary and "
                             f"embedding are the teacher's, and its short runs neither resume nor shard")
    try:  # before any data is read (the teacher's config alone gives its depth)
        parse_feature_layers(args.feature_layers, load_config(args.teacher).num_layers)
    except ValueError as e:
        raise cli.UsageError(f"--feature-layers: {e}") from None
    try:
        return FeatureLossConfig(args.feature_weight, args.token_weight, args.input_noise, args.unroll_steps,
                                 args.unroll_weight, args.unroll_gradient)
    except ValueError as e:
        raise cli.UsageError(f"--feature-weight/--token-weight/--input-noise/--unroll-steps/--unroll-weight: {e}") \
            from None


def _train_feature_head(args, train_cfg, loss_cfg, train_rows, val_rows, out, tokenizer, show) -> dict:
    """Trains and saves a feature head for --teacher (float32 masters, --dtype compute)."""
    teacher = load_pretrained(args.teacher, dtype=args.dtype or jnp.float32, attention_impl=args.attention_impl)
    # Checked against the teacher's depth by `_check_feature_flags` before any data was read.
    feature_layers = parse_feature_layers(args.feature_layers, teacher.config.num_layers)
    head_config = FeatureHeadConfig.for_target(teacher.config, param_dtype=jnp.float32, feature_layers=feature_layers,
                                               **cli.set_flags(args, FEATURE_HEAD_FLAGS))
    print(f"feature head for {args.teacher} (d_model {teacher.config.d_model}, vocabulary {teacher.config.vocab_size})")
    summary = train_feature_head(
        teacher, train_rows, out, train_cfg=train_cfg, loss_cfg=loss_cfg, head_config=head_config, val_rows=val_rows,
        tokenizer=tokenizer, save_dtype=args.save_dtype, show_progress=show,
        metadata={"teacher": str(args.teacher)},
        stop_after_seconds=args.stop_after_minutes and 60 * args.stop_after_minutes)
    for key in ("params", "step", "loss", "agree", "agree_k", "val_loss", "val_feature", "val_token", "val_agree",
                "val_agree_k", "checkpoint"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    return summary


def cli_main(argv=None) -> int:
    """`main` as a process: the exit status, with the expected failures as one line on stderr."""
    try:
        main(argv)
    except (cli.UsageError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
