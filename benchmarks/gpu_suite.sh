#!/usr/bin/env bash
# The GPU suite: one table of what a GPU user sees, cmcseg against nnU-Net, in <= 8 minutes on one GPU.
#   1. a CMC training step against nnU-Net's on the same patch and batch, AMP bf16, without and with
#      torch.compile: s/it and peak GPU memory          (benchmarks/train_step_vs_nnunet.py)
#   2. prediction seconds per case, TTA off and on, against nnUNetPredictor   (benchmarks/predict_vs_nnunet.py)
#   3. preprocessing throughput, cases per second   (benchmarks/plan_vs_nnunet.py; planning runs on the CPU)
# Refuses to run without a CUDA GPU. `--dry-run` runs the same steps on the CPU at toy sizes (compile skipped),
# to check the script where there is no GPU.
# Usage: bash benchmarks/gpu_suite.sh [--dry-run]      (OUT=folder for the JSON files, PY=python to use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/out/gpu_suite}
if [ "${1:-}" = "--dry-run" ]; then
    DEVICE=cpu SIZE=tiny CASES=2 TRAIN_CASES=6 MEMORY_GB=0.25 ITERS=1 WARMUP=1 COMPILE_RUNS="off"
    echo "[gpu_suite] dry run on the CPU at toy sizes: the figures mean nothing, the steps are checked"
else
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_suite: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False). Fix: run it on a machine" \
             "with a GPU and a CUDA build of torch, or pass --dry-run to check the script on the CPU." >&2
        exit 2
    fi
    DEVICE=cuda SIZE=small CASES=4 TRAIN_CASES=8 MEMORY_GB=8 ITERS=20 WARMUP=5 COMPILE_RUNS="off on"
fi
mkdir -p "$OUT"
started=$SECONDS
for compile in $COMPILE_RUNS; do
    echo "[gpu_suite] ($((SECONDS - started)) s) training step, $DEVICE, amp bf16, compile $compile"
    "$PY" benchmarks/train_step_vs_nnunet.py --devices "$DEVICE" --amp bf16 --compile "$compile" --size "$SIZE" \
        --cases "$TRAIN_CASES" --memory-gb "$MEMORY_GB" --iters "$ITERS" --warmup "$WARMUP" --rounds 1 --workers 2 --tag "_${DEVICE}_bf16_compile_${compile}" \
        --out "$OUT" > "$OUT/train_step_${compile}.log" 2>&1 || { tail -20 "$OUT/train_step_${compile}.log"; exit 1; }
done
echo "[gpu_suite] ($((SECONDS - started)) s) prediction, $DEVICE, TTA on and off"
"$PY" benchmarks/predict_vs_nnunet.py --device "$DEVICE" --size "$SIZE" --cases "$CASES" --variants same cmc \
    --workers 2 --tag "_${DEVICE}" --out "$OUT" > "$OUT/predict.log" 2>&1 || { tail -20 "$OUT/predict.log"; exit 1; }
echo "[gpu_suite] ($((SECONDS - started)) s) preprocessing throughput (CPU work in both tools)"
"$PY" benchmarks/plan_vs_nnunet.py --size "$SIZE" --skip-brats --workers 2 --out "$OUT" > "$OUT/plan.log" 2>&1 \
    || { tail -20 "$OUT/plan.log"; exit 1; }
echo "[gpu_suite] ($((SECONDS - started)) s) done"
"$PY" benchmarks/gpu_suite_table.py "$OUT" --device "$DEVICE"
