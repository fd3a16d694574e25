#!/usr/bin/env bash
# The GPU checks of the throughput work, as one command for a short GPU lease (run from the repo root, with
# data/ml-1m prepared and SIDs built). Parts run in the order given, each writing its log under $OUT as it goes,
# so a command cut off at its limit still leaves what it did:
#   profile  $OUT/profile.log  where an eager training step's time goes (bench_throughput.py --profile): host ms in
#                              torch ops, device kernel ms and launches per step, the top ops
#   graphs   $OUT/graphs.log   the training table with trainer.compile_mode=reduce-overhead (CUDA graphs), batch
#                              widths padded to a multiple of 64 (one shape per stage: one graph, one compile)
#   compile  $OUT/compile.log  the same with trainer.compile_mode=default (inductor kernels, no graphs)
#   bench    $OUT/bench.log    the eager table: training tokens/s (ours, raw twin, full-logits step), host time per
#                              batch, ranking users/s vs HF generate, and ranking again in bf16 and tf32 against fp32
#   quick    $OUT/quick.log    python -m gti.benchmark configs/benchmark-gpu-quick.yaml until the budget runs out,
#                              and $OUT/quick-runs.tgz: its run folders without weights. Resumable: finished cells
#                              keep their weights in runs/ on the machine, so a second call on the same warm
#                              machine continues where the first stopped.
#   $OUT/util.csv  GPU utilisation and memory every 0.5 s (nvidia-smi), the whole command
# All at gpu-quick's batch sizes (grounding 256 x 64, fine-tuning 128 x 192, bf16-mixed, ML-1M).
# Usage: bash scripts/gpu_check.sh [BUDGET_SECONDS] [PART ...]   (default: 520 profile graphs compile bench quick)
#   one lease, the throughput figures:  bash scripts/gpu_check.sh 540 profile graphs compile bench
#   one lease, gpu-quick end to end:    bash scripts/gpu_check.sh 540 quick   (then again, same warm machine)
# OUT defaults to /tmp/gpu-check.
set -u
budget=${1:-520}
shift || true
parts=("$@")
((${#parts[@]})) || parts=(profile graphs compile bench quick)
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
sizes=(--accelerator gpu --dataset ml-1m --precision bf16-mixed --ground-batch 256 --ground-len 64
       --finetune-batch 128 --finetune-len 192 --history 20 --no-ttfs)
quiet() { grep --line-buffered -v "it/s\]"; }  # progress-bar redraws
bench() {  # bench LOG SECONDS ARGS...: one bench_throughput.py run, cut off at SECONDS or the budget
  local log=$1 limit=$2 left=$((budget - SECONDS))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 60)); then echo "[gpu_check] no time left for $log" | tee -a "$out/skipped.log"; return; fi
  timeout "$limit" python scripts/bench_throughput.py "${sizes[@]}" "$@" 2>&1 | quiet > "$out/$log"
  echo "[gpu_check] $log done at ${SECONDS}s" | tee -a "$out/$log"
}

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$out/util.csv" 2>&1 &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/device.txt"

for part in "${parts[@]}"; do
  case $part in
    profile) bench profile.log 150 --steps 5 --warmup 3 --no-rank --profile ;;
    graphs)  bench graphs.log 240 --steps 10 --warmup 6 --no-rank --compile reduce-overhead --pad-to-multiple-of 64 ;;
    compile) bench compile.log 200 --steps 10 --warmup 6 --no-rank --compile default --pad-to-multiple-of 64 ;;
    bench)   bench bench.log 240 --steps 10 --warmup 3 --rank-users 1024 --rank-batch 128 --beams 20 \
                   --rank-precision fp32 bf16 tf32 ;;
    quick)
      left=$((budget - SECONDS))
      if ((left > 60)); then
        echo "[gpu_check] gpu-quick gets ${left}s" >> "$out/quick.log"
        timeout "$left" python -m gti.benchmark configs/benchmark-gpu-quick.yaml 2>&1 | quiet >> "$out/quick.log"
        echo "[gpu_check] gpu-quick stopped at ${SECONDS}s" >> "$out/quick.log"
        tar czf "$out/quick-runs.tgz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='tokenizer.json' runs/benchmark-gpu-quick
      fi ;;
    *) echo "[gpu_check] unknown part '$part' (profile graphs compile bench quick)" >&2; exit 2 ;;
  esac
done
ls -la "$out"
