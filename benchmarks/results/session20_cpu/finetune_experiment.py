"""Session 20's CPU experiment (a record, not a maintained tool): fine-tune the shipped SmolLM2
feature head, plain vs fused ('eagle3' feature layers, started by widen_head), on the same rows,
steps and seed; then greedy acceptance on 8 evaluation prompts x 64 tokens, DynamicTree(64, 5, 12).

The corpus is session 18's distill corpus (benchmarks/gpu_session.sh distill wrote it gzipped in
two parts; scratch/ is not in the repository). Run from the repository root:
    JAX_PLATFORMS=cpu python benchmarks/results/session20_cpu/finetune_experiment.py --out /tmp/ft/run
"""
import argparse, dataclasses, json, sys, time
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, ".")
from benchmarks.distill_on_gpu import read_corpus, pack, PROMPTS, SHIPPED_HEAD
from benchmarks.feature_draft_acceptance import chat_prompts, measure, describe
from fa2jax import load_pretrained, load_tokenizer
from fa2jax.data import read_prompts
from fa2jax.feature_head import FeatureHeadConfig, load_feature_head, parse_feature_layers
from fa2jax.model import with_min_len
from fa2jax.training import TrainConfig
from fa2jax.training.feature_draft import FeatureLossConfig, target_features, train_feature_head
from spec import DynamicTree, FeatureDrafter, generate_incremental
from spec.cli import model_path

p = argparse.ArgumentParser()
p.add_argument("--variants", default="plain,eagle3")
p.add_argument("--rows", type=int, default=384)
p.add_argument("--seq-len", type=int, default=256)
p.add_argument("--steps", type=int, default=400)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--unroll", type=int, default=2)
p.add_argument("--feature-weight", type=float, default=1.0)
p.add_argument("--token-weight", type=float, default=0.1)
p.add_argument("--out", required=True)
args = p.parse_args()
t0 = time.time()
say = lambda s: print(f"[{time.time()-t0:.0f}s] {s}", flush=True)
path = model_path("smollm2")
tok = load_tokenizer(path)
target = load_pretrained(path, dtype=jnp.float32)
records = read_corpus(["scratch/distill_corpus/distill_corpus.jsonl.gz.part-a",
                       "scratch/distill_corpus/distill_corpus.jsonl.gz.part-b"])
rng = np.random.default_rng(0)
records = [records[i] for i in rng.permutation(len(records))[: 12 * args.rows]]
prompts = read_prompts(str(PROMPTS / "chat_train.jsonl"))
rendered = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in prompts]
prompt_ids = [list(x) for x in tok.encode_batch(rendered, add_special_tokens=False)]
train_rows, val_rows = pack(records, prompt_ids, tok.eos_ids[0], args.seq_len, 25)
cut = lambda r, n: dataclasses.replace(r, **{k: getattr(r, k)[:n] for k in ("tokens", "segment_ids", "positions")})
train_rows, val_rows = cut(train_rows, args.rows), cut(val_rows, 24)
layers = parse_feature_layers("eagle3", target.config.num_layers)
say(f"rows {train_rows.num_rows} train {val_rows.num_rows} val")
tf = target_features(target, train_rows, 8, hidden_layers=layers, on_host=True)
vf = target_features(target, val_rows, 8, hidden_layers=layers, on_host=True)
say(f"features {tf.shape}")
d = target.config.d_model
shipped = load_feature_head(SHIPPED_HEAD, dtype=jnp.float32)
prompt, lengths = chat_prompts(tok, PROMPTS / "chat_eval.jsonl", 8)
long_target = with_min_len(target, prompt.shape[1] + 64 + 64)
base = generate_incremental(long_target, prompt, lengths, max_new_tokens=64)
from fa2jax.training.feature_draft import evaluate_feature_head
results = {"shipped": {"val": evaluate_feature_head(shipped, target, val_rows, 4, loss_cfg=FeatureLossConfig(
    args.feature_weight, args.token_weight, 0.0, args.unroll), features=np.ascontiguousarray(vf[..., -d:]))}}
say(f"shipped head on the val rows: {results['shipped']['val']}")
for variant in args.variants.split(","):
    fl = layers if variant == "eagle3" else ()
    cfg = FeatureHeadConfig.for_target(target.config, feature_layers=fl, dtype=jnp.float32, param_dtype=jnp.float32)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, learning_rate=args.lr,
                            warmup_steps=10, log_every=50, eval_every=args.steps, eval_batches=6,
                            checkpoint_every=args.steps)
    summary = train_feature_head(
        target, train_rows, f"{args.out}/{variant}", train_cfg=train_cfg,
        loss_cfg=FeatureLossConfig(args.feature_weight, args.token_weight, 0.1, args.unroll),
        head_config=cfg, val_rows=val_rows, train_features=tf if fl else np.ascontiguousarray(tf[..., -d:]),
        val_features=vf if fl else np.ascontiguousarray(vf[..., -d:]), show_progress=False, init_head=shipped,
        on_log=lambda r: say(f"{variant} {r}"))
    head = load_feature_head(f"{args.out}/{variant}/checkpoints", dtype=jnp.float32)
    rec = measure(long_target, FeatureDrafter(head, long_target), DynamicTree(num_nodes=64, depth=5, top_k=12),
                  prompt, lengths, baseline=base, max_new_tokens=64)
    say(describe(f"{variant} fine-tuned", rec))
    results[variant] = {"summary": summary, "acceptance": rec}
    json.dump({"args": vars(args), "results": results}, open(f"{args.out}/result.json", "w"), default=str, indent=1)
say("done")
