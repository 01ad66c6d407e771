#!/usr/bin/env bash
# Every CUDA figure the README does not have yet, in one run on one GPU (under 8 minutes on a modern GPU):
#
#   1. training at the Phi-3.5-mini dimensions (random weights, no download), 8-bit QLoRA + PET, seq_len 2048,
#      batch 1 x accumulation 2, gradient checkpointing: median step time, real tokens/s, peak
#      torch.cuda.max_memory_allocated and the LM loss, for transformers.Trainer + PEFT and for ours with and
#      without gates, with and without packing (bench/trainer_vs_hf.py --sizes phi35);
#   2. the bake of that model to bf16 (LoRA r 16 on every target, gates on every layer), its verification
#      forwards on the GPU (services/baker/verify.py), timings, peak GPU memory and RSS;
#   3. one table of both, printed and written as JSON (<out>/gpu.json; the parts in trainer.json, bake.json).
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
else
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
echo ">> [$((SECONDS - t0)) s] bake to bf16, verification on the GPU when there is one" >&2
"$py" bench/_gpu.py bake --base "$work/base" --work "$work/bake" --dtype bfloat16 --json "$out/bake.json"
echo ">> [$((SECONDS - t0)) s] done" >&2
report=()
[[ $dry -eq 1 ]] && report=(--dry-run)
"$py" bench/_gpu.py report --dir "$out" ${report[@]+"${report[@]}"} | tee "$out/table.md"
