#!/usr/bin/env bash
# The GPU checks of the throughput work, as one command for a short GPU lease (run from the repo root, with
# data/ml-1m prepared and SIDs built). Parts run in the order given, each writing its log under $OUT as it goes,
# so a command cut off at its limit still leaves what it did:
#   profile  $OUT/profile.log  where an eager training step's time goes (bench_throughput.py --profile): host ms in
#                              torch ops, device kernel ms and launches per step, how often the host waited for the
#                              device (expected: none but logging steps), the top ops
#   graphs   $OUT/compile.log  the training table with trainer.compile_mode=reduce-overhead (CUDA graphs), batch
#                              widths padded to a multiple of 64 (one shape per stage: one graph, one compile)
#   compile  $OUT/compile.log  the same with trainer.compile_mode=default (inductor kernels, no graphs), appended
#   rank     $OUT/bench.log    ranking users/s, ours vs HF generate in fp32, and ours again in bf16 and tf32 against
#                              fp32 (speed, top-10 agreement); 1,024 ML-1M test users, beam 20, batch 128, then ours
#                              alone at batch 256 in each arithmetic
#   bench    $OUT/bench.log    the eager table: training tokens/s (ours, raw twin, full-logits step), host time per
#                              batch, and the ranking of `rank` (measured on an H200 on 2026-11-27, ranking in fp32)
#   stages   $OUT/stages.log   the real stages as a user runs them, with CUDA graphs (configs/ground-full.yaml's
#                              settings) at gpu-quick's batches: gti.ground 300 steps, then gti.finetune 300 steps
#                              from it ranking 1,024 test users; progress lines every 50 steps, to read steps/s and
#                              util.csv's busy share against
#   quick    $OUT/quick.log    python -m gti.benchmark configs/benchmark-gpu-quick.yaml until the budget runs out,
#                              and $OUT/quick-runs.tgz: its run folders without weights. Resumable: finished cells
#                              keep their weights in runs/ on the machine, so a second call on the same warm
#                              machine continues where the first stopped. Arguments with "=" are its overrides,
#                              e.g. ground.trainer.compile=true (speed settings leave finished cells finished)
#   $OUT/gpu_check.log the device, and when each part ended or why it did not run
#   $OUT/util.csv      GPU utilisation and memory every 0.5 s (nvidia-smi), the whole command
# Up to eight files of its own and ../shared/gpu/run.sh's gpu-util.csv: the device tool brings back eight, so run
# quick (quick.log, quick-runs.tgz) without stages, or leave one of the other logs out.
# All at gpu-quick's batch sizes (grounding 256 x 64, fine-tuning 128 x 192, bf16-mixed, ML-1M).
# Usage: bash scripts/gpu_check.sh [BUDGET_SECONDS] [PART ...] [KEY=VALUE ...]   (default: 520 profile graphs rank compile quick)
#   one lease, the throughput figures:  bash scripts/gpu_check.sh 540 profile graphs rank compile
#     (done on one H100, 2026-11-27, as 545 rank graphs profile: the README's Speed at scale)
#   the real stages with CUDA graphs:   bash scripts/gpu_check.sh 540 stages profile   (~7 min of stages on a fresh machine)
#   one lease, gpu-quick end to end:    bash scripts/gpu_check.sh 540 quick   (then again, same warm machine)
#   ... with CUDA graphs in both stages: bash scripts/gpu_check.sh 540 quick {ground,finetune}.trainer.compile=true \
#          {ground,finetune}.trainer.compile_mode=reduce-overhead {ground,finetune}.trainer.pad_to_multiple_of=64
# OUT defaults to /tmp/gpu-check.
set -u
budget=${1:-520}
shift || true
parts=() overrides=()
for arg in "$@"; do
  if [[ $arg == *=* ]]; then overrides+=("$arg"); else parts+=("$arg"); fi
done
((${#parts[@]})) || parts=(profile graphs rank compile quick)
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
sizes=(--accelerator gpu --dataset ml-1m --precision bf16-mixed --ground-batch 256 --ground-len 64
       --finetune-batch 128 --finetune-len 192 --history 20 --no-ttfs)
stamp() {  # each line stamped with the clock, to read util.csv against (a last line without a newline too)
  while IFS= read -r line || [[ -n $line ]]; do printf '%(%T)T %s\n' -1 "$line"; done
}
quiet() { grep --line-buffered -v "it/s\]" | stamp; }  # progress-bar redraws out
say() { echo "$(date +%T) [gpu_check] $*" | tee -a "$out/gpu_check.log"; }
bench() {  # bench PART LOG SECONDS ARGS...: one bench_throughput.py run appended to LOG, cut off at SECONDS or the budget
  local part=$1 log=$2 limit=$3 left=$((budget - SECONDS))
  shift 3
  ((left < limit)) && limit=$left
  if ((limit < 60)); then say "$part: not run, ${left}s left"; return; fi
  echo "[gpu_check] $part: bench_throughput.py $*" >> "$out/$log"
  timeout "$limit" python scripts/bench_throughput.py "${sizes[@]}" "$@" 2>&1 | quiet >> "$out/$log"
  say "$part done at ${SECONDS}s (exit ${PIPESTATUS[0]}) -> $log"
}
# stage MODULE ARGS...: one stage process appended to stages.log, progress bars as lines, cut off at the budget;
# returns the stage's exit status
stage() {
  local left=$((budget - SECONDS)) status
  if ((left < 60)); then say "$1: not run, ${left}s left"; return 1; fi
  echo "[gpu_check] python -m $*" >> "$out/stages.log"
  timeout "$left" python -m "$@" 2>&1 | stdbuf -oL tr '\r' '\n' \
    | grep --line-buffered -E -v '^\s*$|(it|examples)/s\]\s*$' | stamp >> "$out/stages.log"
  status=${PIPESTATUS[0]}
  say "$1 done at ${SECONDS}s (exit $status) -> stages.log"
  return "$status"
}

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$out/util.csv" 2>&1 &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
say "$(nvidia-smi --query-gpu=name --format=csv,noheader); budget ${budget}s; parts: ${parts[*]}${overrides:+; quick overrides: ${overrides[*]}}"

for part in "${parts[@]}"; do
  case $part in
    profile) bench profile profile.log 150 --steps 5 --warmup 3 --no-rank --profile ;;
    graphs)  bench graphs compile.log 300 --steps 10 --warmup 6 --no-rank --compile reduce-overhead --pad-to-multiple-of 64 ;;
    compile) bench compile compile.log 200 --steps 10 --warmup 6 --no-rank --compile default --pad-to-multiple-of 64 ;;
    rank)    bench rank bench.log 150 --no-train --rank-users 1024 --rank-batch 128 256 --beams 20 --rank-precision fp32 bf16 tf32 ;;
    bench)   bench bench bench.log 240 --steps 10 --warmup 3 --rank-users 1024 --rank-batch 128 --beams 20 \
                   --rank-precision fp32 bf16 tf32 ;;
    stages)
      graphs=(trainer.accelerator=gpu trainer.precision=bf16-mixed trainer.log_every_n_steps=50 trainer.max_steps=300
              trainer.compile=true trainer.compile_mode=reduce-overhead trainer.pad_to_multiple_of=64 data.name=ml-1m sids.codes=64)
      stage gti.ground "${graphs[@]}" max_length=64 optim.batch_size=256 optim.lr=3e-3 optim.warmup_steps=25 output_dir=runs/gpu-check-ground &&
      stage gti.finetune configs/finetune.yaml "${graphs[@]}" init_from=runs/gpu-check-ground data.max_history=20 max_length=192 \
            optim.batch_size=128 optim.lr=3e-4 optim.warmup_steps=25 eval.num_beams=20 eval.batch_size=128 eval.max_users=1024 eval.valid=false output_dir=runs/gpu-check-finetune ;;
    quick)
      left=$((budget - SECONDS))
      if ((left > 60)); then
        echo "[gpu_check] quick: gpu-quick gets ${left}s; overrides: ${overrides[*]:-none}" >> "$out/quick.log"
        timeout "$left" python -m gti.benchmark configs/benchmark-gpu-quick.yaml "${overrides[@]}" 2>&1 | quiet >> "$out/quick.log"
        say "quick stopped at ${SECONDS}s (exit ${PIPESTATUS[0]}; 124: the budget ended it, run it again to continue)"
        tar czf "$out/quick-runs.tgz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='tokenizer.json' runs/benchmark-gpu-quick
      else
        say "quick: not run, ${left}s left"
      fi ;;
    *) echo "[gpu_check] unknown part '$part' (profile graphs rank compile bench stages quick)" >&2; exit 2 ;;
  esac
done
ls -la "$out"
