#!/usr/bin/env bash
# The speculative-decoding pair on one GPU, end to end: train the ~1B target on the stdlib with the
# FA2 kernels, measure the same model's training throughput with cuDNN attention, distil the ~20M
# draft from the target, then benchmark speculative vs incremental decoding on held-out prompts.
#
#   RUNS=/tmp/runs TARGET_MINUTES=6.5 bash benchmarks/gpu_speculative_pipeline.sh > /tmp/runs/log 2>&1
#
# Everything lands in $RUNS (metrics.jsonl, loss.png and checkpoints per run; speculative_*.json).
# Each training stage resumes from its newest checkpoint, so the script can be re-run after a stop.
# CUDNN_THROUGHPUT=0 skips the cuDNN training-throughput stage.
#
# Greedy identity in bf16: verifying N tokens in one pass and decoding them one by one round
# differently on a GPU (matmul algorithms follow the row count, attention splits the prefix
# length), so near-tie argmaxes can flip. The main greedy stage therefore runs a batch-invariant
# target (`--invariant-rows`, see `TransformerConfig.invariant_rows`): every cached call has
# INVARIANT_ROWS rows and the attention walks fixed tiles, which makes chain trees reproduce
# incremental decoding bit for bit. It also times the plain incremental baseline. A second stage
# runs the plain bf16 target on trees as a speed reference (identity not expected), and
# F32_TREES (empty by default) the float32 target at HIGHEST precision.
#
# Data: the stdlib (its validation files give the benchmark's held-out prompts) plus, for training
# only, the .py files of EXTRA_PACKAGES from site-packages. The stdlib alone is ~2.3M tokens here:
# a 20M draft trained for minutes on it memorised it (train loss 1.8, validation 4.4) and agreed
# with the target on too few held-out tokens. The draft also trains on TEACHER_CONTINUATIONS greedy
# continuations that the target writes from training-text windows: what it must predict later.
set -euo pipefail
RUNS=${RUNS:-/tmp/runs}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
EXTRA=()
for package in ${EXTRA_PACKAGES-torch numpy jax}; do
  if [ -d "$SITE/$package" ]; then EXTRA+=("$SITE/$package"); fi
done
DATA=()
if [ ${#EXTRA[@]} -gt 0 ]; then DATA=(--extra-train-data "${EXTRA[@]}" --suffix .py); fi

stage target
python3 examples/train.py --preset target-1b --out "$RUNS/target" --resume "${DATA[@]}" \
  --steps "${TARGET_STEPS:-170}" --warmup-steps 20 --eval-every 100 --checkpoint-every 1000 \
  --stop-after-minutes "${TARGET_MINUTES:-6.5}" --no-progress

if [ "${CUDNN_THROUGHPUT:-1}" = 1 ]; then
  stage target-cudnn-throughput
  python3 examples/train.py --preset target-1b --out "$RUNS/target-cudnn" --attention-impl cudnn --steps 20 \
    --warmup-steps 5 --log-every 5 --eval-every 1000 --checkpoint-every 1000 --no-progress \
    --stop-after-minutes 1.5
fi

stage draft
python3 examples/train.py --preset draft-20m --teacher "$RUNS/target" --out "$RUNS/draft" --resume "${DATA[@]}" \
  --steps "${DRAFT_STEPS:-1000}" --warmup-steps 80 --distill-weight 0.9 --eval-every 500 --checkpoint-every 5000 \
  --teacher-continuations "${TEACHER_CONTINUATIONS:-8192}" --continuation-batch 512 \
  --stop-after-minutes "${DRAFT_MINUTES:-3.5}" --no-progress

SPEC="python3 benchmarks/speculative.py --target-ckpt $RUNS/target --draft-ckpt $RUNS/draft --draft-dtype bfloat16 --prompts ${PROMPTS:-6}"
if [ -n "${F32_TREES:-}" ]; then
  stage speculative-greedy-float32-target
  $SPEC --trees "$F32_TREES" --modes greedy --target-dtype float32 --out "$RUNS/speculative_greedy_f32.json" \
    || echo "stage failed"
fi

stage speculative-greedy-bf16-invariant-target
$SPEC --trees "${INVARIANT_TREES:-chain,chain8}" --modes greedy --target-dtype bfloat16 \
  --invariant-rows "${INVARIANT_ROWS:-9}" --out "$RUNS/speculative_greedy_bf16_invariant.json" || echo "stage failed"

BF16_TREES=${BF16_TREES-chain,specinfer,dynamic16}  # set empty to skip the stage
if [ -n "$BF16_TREES" ]; then
  stage speculative-greedy-bf16-target
  $SPEC --trees "$BF16_TREES" --modes greedy --target-dtype bfloat16 \
    --out "$RUNS/speculative_greedy_bf16.json" || echo "stage failed"
fi

if [ "${STOCHASTIC:-0}" = 1 ]; then
  stage speculative-stochastic
  $SPEC --trees chain --modes stochastic --target-dtype bfloat16 --out "$RUNS/speculative_stochastic.json" \
    || echo "stage failed"
fi
stage done
