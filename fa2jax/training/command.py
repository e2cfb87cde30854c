"""`fa2jax-train`: train an fa2jax Transformer on real text with the FlashAttention-2 kernels.

  fa2jax-train --preset tiny                      # CPU, the stdlib as data, minutes
  fa2jax-train --preset target-1b --out out/target
  fa2jax-train ... --extra-train-data /path/to/site-packages/numpy --suffix .py
  fa2jax-train --preset draft-20m --teacher out/target --distill-weight 0.5
  fa2jax-train ... --teacher out/target --teacher-continuations 4096   # + the target's own text
  fa2jax-train ... --resume                       # continue the run in --out exactly

Every field of TrainConfig and the size fields of TransformerConfig are flags (--d-model,
--grad-accum, ...); unset flags keep the preset's value. Writes <out>/checkpoints/, metrics.jsonl
and loss.png. The training itself lives in the other fa2jax.training modules; this one parses
the command line (`build_parser`) and runs it (`main`); `python examples/train.py` is the same command.
"""
from __future__ import annotations

import argparse
import time

from fa2jax import load_pretrained
from fa2jax.data import Corpus, find_documents, pack_corpus, split_documents
from fa2jax.loading import load_config
from fa2jax.training import presets, teacher_continuations, train
from fa2jax.training import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="fa2jax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets()), default="tiny", help="model size and training settings")
    p.add_argument("--data", nargs="+", help="text files or folders (default: this Python's stdlib)")
    p.add_argument("--suffix", nargs="+", help="only files ending so, e.g. .py .md (default: all text)")
    p.add_argument("--extra-train-data", nargs="+",
                   help="more files or folders for the training split only (e.g. site-packages); the validation "
                        "split, and so the speculative benchmark's held-out prompts, stay those of --data")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the --data files held out")
    p.add_argument("--tokenizer", choices=("bpe", "bytes"), default="bpe",
                   help="a byte-level BPE trained on the training split, or raw bytes")
    p.add_argument("--bpe-vocab", type=int, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--out", help="run folder (default: out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--teacher", help="model folder to distil from, with the same tokenizer (a run or checkpoint "
                                     "of this script, or a Hugging Face folder)")
    p.add_argument("--teacher-continuations", type=int, default=0,
                   help="with --teacher: add this many of the teacher's greedy continuations of training text to "
                        "the training split (a draft then also learns from text that its target writes)")
    p.add_argument("--continuation-prompt-len", type=int, default=64, help="prompt tokens per continuation")
    p.add_argument("--continuation-len", type=int, default=192, help="new tokens per continuation")
    p.add_argument("--continuation-batch", type=int, default=256, help="continuations generated per call")
    p.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (parameters stay float32)")
    p.add_argument("--attention-impl", choices=("pallas", "xla", "cudnn"),
                   help="default: pallas on GPU, automatic elsewhere")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after-minutes", type=float,
                   help="checkpoint and exit after this much training time (continue with --resume)")
    cli.add_config_flags(p, presets()["tiny"].model)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Runs `fa2jax-train` with `argv` (default: sys.argv[1:]); returns the run's summary."""
    args = build_parser().parse_args(argv)
    run = presets()[args.preset]
    out = args.out or f"out/{args.preset}"
    train_cfg = cli.train_config(run, args)
    docs = find_documents(args.data, args.suffix)
    corpus = split_documents(docs, args.val_fraction)
    extra = tuple(find_documents(args.extra_train_data, args.suffix)) if args.extra_train_data else ()
    corpus = Corpus(train=corpus.train + extra, val=corpus.val)
    print(f"{len(docs) + len(extra)} files: {len(corpus.train)} train ({len(extra)} training-only), "
          f"{len(corpus.val)} validation")

    resumed = cli.resumed_run(out) if args.resume else None
    if resumed is not None:  # the run's own configs and tokenizer: exact continuation
        model_cfg, train_cfg, tokenizer, latest = resumed
        print(f"resuming from {latest} (size and training flags are taken from it)")
    else:
        tokenizer = cli.new_tokenizer(args.tokenizer, (d.text for d in corpus.train), args.bpe_vocab or run.bpe_vocab,
                                      teacher=args.teacher)
        vocab = load_config(args.teacher).vocab_size if args.teacher else cli.padded_vocab(tokenizer.vocab_size)
        model_cfg = cli.model_config(run, args, vocab_size=vocab, seq_len=train_cfg.seq_len, dtype=args.dtype,
                                     attention_impl=args.attention_impl)
    if args.teacher_continuations:
        if not args.teacher:
            raise ValueError(f"--teacher-continuations {args.teacher_continuations} needs --teacher")
        start = time.perf_counter()
        continuations = teacher_continuations(
            load_pretrained(args.teacher), tokenizer, corpus.train, count=args.teacher_continuations,
            prompt_len=args.continuation_prompt_len, new_tokens=args.continuation_len, batch=args.continuation_batch)
        corpus = Corpus(train=corpus.train + continuations, val=corpus.val)
        print(f"{len(continuations)} teacher continuations in {time.perf_counter() - start:.0f} s")
    train_rows, val_rows = pack_corpus(corpus, tokenizer, train_cfg.seq_len)
    print(f"{train_rows.num_rows} x {train_cfg.seq_len} training rows, {val_rows.num_rows} validation rows, "
          f"vocabulary {tokenizer.vocab_size}")
    summary = train(model_cfg, train_cfg, train_rows, val_rows, out, tokenizer, resume=args.resume,
                    teacher=args.teacher, progress=not args.no_progress,
                    stop_after_seconds=args.stop_after_minutes and 60 * args.stop_after_minutes)
    for key in ("step", "loss", "val_loss", "val_ppl", "acceptance_before", "acceptance_after"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"wrote {out}/checkpoints, {out}/metrics.jsonl, {out}/loss.png")
    return summary

