#!/usr/bin/env bash
# The GPU checks of the throughput work, as one command for a short GPU lease (run from the repo root, with
# data/ml-1m prepared and SIDs built). It writes as it goes, so a command cut off at its limit still leaves:
#   $OUT/bench.log         bench_throughput.py at configs/benchmark-gpu-quick.yaml's batch sizes: training tokens/s
#                          (ours, raw twin, full-logits step), host time per batch, ranking users/s vs HF generate
#   $OUT/bench-compile.log the training half again with trainer.compile=true (torch.compile of the training forward)
#   $OUT/quick.log         python -m gti.benchmark configs/benchmark-gpu-quick.yaml until BUDGET seconds have passed
#   $OUT/quick-runs.tgz    that benchmark's run folders without weights (metrics, predictions, diagnostics, report)
#   $OUT/util.csv          GPU utilisation and memory every 0.5 s (nvidia-smi)
# Usage: bash scripts/gpu_check.sh [BUDGET_SECONDS]   (default 520; OUT defaults to /tmp/gpu-check)
# Skip a part with SKIP="compile quick" (any of: bench compile quick).
set -u
budget=${1:-520}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
skip=" ${SKIP:-} "
sizes=(--accelerator gpu --dataset ml-1m --precision bf16-mixed --ground-batch 256 --ground-len 64
       --finetune-batch 128 --finetune-len 192 --history 20 --no-ttfs)
quiet() { grep --line-buffered -v "it/s\]"; }  # progress-bar redraws

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$out/util.csv" 2>&1 &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/bench.log"

if [[ $skip != *" bench "* ]]; then
  timeout 240 python scripts/bench_throughput.py "${sizes[@]}" --steps 10 --warmup 3 \
    --rank-users 1024 --rank-batch 128 --beams 20 2>&1 | quiet >> "$out/bench.log"
  echo "[gpu_check] bench done at ${SECONDS}s" | tee -a "$out/bench.log"
fi
if [[ $skip != *" compile "* ]]; then
  timeout 240 python scripts/bench_throughput.py "${sizes[@]}" --steps 10 --warmup 6 --compile --no-rank \
    2>&1 | quiet > "$out/bench-compile.log"
  echo "[gpu_check] compiled bench done at ${SECONDS}s" | tee -a "$out/bench-compile.log"
fi
left=$((budget - SECONDS))
if [[ $skip != *" quick "* ]] && ((left > 60)); then
  echo "[gpu_check] gpu-quick gets ${left}s" > "$out/quick.log"
  timeout "$left" python -m gti.benchmark configs/benchmark-gpu-quick.yaml 2>&1 | quiet >> "$out/quick.log"
  echo "[gpu_check] gpu-quick stopped at ${SECONDS}s" >> "$out/quick.log"
  tar czf "$out/quick-runs.tgz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='tokenizer.json' runs/benchmark-gpu-quick
fi
ls -la "$out"
