#!/usr/bin/env bash
# Every CUDA figure the README does not have yet, in one run on one GPU (pinned: CUDA_VISIBLE_DEVICES, default 0;
# about 10-15 minutes on an H100, the script prints what it took):
#
#   1. training at the Phi-3.5-mini dimensions (random weights, no download), 8-bit QLoRA + PET, seq_len 2048,
#      batch 1 x accumulation 2, gradient checkpointing: median step time, real tokens/s, peak
#      torch.cuda.max_memory_allocated and the LM loss, for transformers.Trainer + PEFT and for ours with and
#      without gates, with and without packing (bench/trainer_vs_hf.py --sizes phi35; example records, ~440 tokens);
#   2. does each profile fit a 12 GB card? One optimizer step on one record that fills seq_len, unpacked
#      (bench/_fit.py): full (seq 2048, r 64, gates on all 32 layers) and fast (seq 1024, r 32, 8 gated layers),
#      reentrant (what the trainer uses for a k-bit base) and non-reentrant checkpointing: max allocated, max
#      reserved, the card's used memory at the peak (mem_get_info: torch's reserve + the CUDA context), and a verdict
#      line per profile: "fits 12 GB: yes/no, peak X GiB";
#   3. the bake of that model to bf16 (LoRA r 16 on every target, gates on every layer), its verification
#      forwards on the GPU (services/baker/verify.py), timings, peak GPU memory and RSS;
#   4. one table of all, printed and written as JSON (<out>/gpu.json; the parts in trainer.json, fit-*.json,
#      bake.json), with the verdicts and the run's duration under it.
#
#   bench/gpu.sh [--out DIR] [--steps N]     on the GPU box, from the repository root or anywhere
#   bench/gpu.sh --dry-run [--out DIR]       the same chain on the CPU at the tiny size (what the tests run)
#
# Needs the project's Python (.venv/bin/python, or $PYTHON) and about 25 GB of free disk for the random base
# and the bake (a few MB with --dry-run).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="python3"; fi
fi
dry=0
out=""
steps=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
out="${out:-$repo/bench-gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/so8t-gpu-bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$repo"
export SO8T_PROGRESS=0 PYTHONUNBUFFERED=1

if [[ $dry -eq 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU box
  size=tiny preset=tiny
  trainer_args=(--steps "${steps:-2}" --warmup 1 --eval-records 2 --threads 1 --gate-ab 2)
  # profile: seq_len, LoRA r, gated layers (the tiny model has 2 layers; 8-bit runs on the CPU too)
  fits=("full 512 16 all" "fast 256 8 1")
else
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU: the figures are per card
  fits=("full 2048 64 all" "fast 1024 32 24,25,26,27,28,29,30,31")
  if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device visible to $py (use --dry-run to check the chain on the CPU)" >&2
    exit 2
  fi
  size=phi35 preset=full
  trainer_args=(--steps "${steps:-10}" --warmup 2 --eval-records 8 --gate-ab 12)
fi
t0=$SECONDS
echo ">> [$((SECONDS - t0)) s] random base ($preset) in $work/base" >&2
"$py" bench/_gpu.py base --preset "$preset" --out "$work/base"
echo ">> [$((SECONDS - t0)) s] training figures: bench/trainer_vs_hf.py --sizes $size" >&2
"$py" bench/trainer_vs_hf.py --sizes "$size" --model-dir "$work/base" --workdir "$work" \
  --variants hf ours ours+gates ours+packing ours+gates+packing "${trainer_args[@]}" \
  --json "$out/trainer.json" | tee "$out/trainer.txt"
for fit in "${fits[@]}"; do
  read -r profile seq r layers <<<"$fit"
  for mode in reentrant non-reentrant; do
    echo ">> [$((SECONDS - t0)) s] does $profile fit? one step on a $seq-token record, $mode checkpointing" >&2
    "$py" bench/_fit.py --model "$work/base" --seq "$seq" --quant 8bit --r "$r" --gates "$layers" \
      --checkpointing "$mode" --json "$out/fit-$profile-$mode.json" \
      || echo "{\"profile\": \"$profile\", \"checkpointing\": \"$mode\", \"failed\": true}" >"$out/fit-$profile-$mode.json"
  done
done
echo ">> [$((SECONDS - t0)) s] bake to bf16, verification on the GPU when there is one" >&2
"$py" bench/_gpu.py bake --base "$work/base" --work "$work/bake" --dtype bfloat16 --json "$out/bake.json"
echo ">> [$((SECONDS - t0)) s] done" >&2
report=(--seconds "$((SECONDS - t0))")
[[ $dry -eq 1 ]] && report+=(--dry-run)
"$py" bench/_gpu.py report --dir "$out" ${report[@]+"${report[@]}"} | tee "$out/table.md"
