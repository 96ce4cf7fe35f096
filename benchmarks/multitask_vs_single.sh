#!/usr/bin/env bash
# Issue 5 benchmark: the multi-task model against its three single-task models (MTMed3D's comparison).
# For the default CPU recipe (brats-cpu, resenc encoder) at 128x128x80 and for MTMed3D's configuration (brats-swin)
# at 96^3: parameters, FLOPs/MACs, CPU (and CUDA when present) latency and peak memory, and the multi / sum ratios.
# Usage: bash benchmarks/multitask_vs_single.sh OUTDIR [DATASET MINUTES]
#   OUTDIR/brats-cpu/benchmark.{md,json} and OUTDIR/brats-swin/benchmark.{md,json}
#   With DATASET and MINUTES, each of the four models of each recipe is also trained for MINUTES on fold 0 of
#   DATASET and the table gains Dice per region, AP@0.10 and AUC (brats-swin needs a GPU for that to mean much).
# CPU threads: OMP_NUM_THREADS (default 2, the 2-core machine of docs/benchmarks.md).
set -euo pipefail
out=${1:?usage: $0 OUTDIR [DATASET MINUTES]}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
train=()
if [ $# -ge 2 ]; then
    train=(--train "$2" --minutes "${3:?MINUTES is required with DATASET}")
fi
mkdir -p "$out"
rm -rf "$out/brats-cpu" "$out/brats-swin"  # a rerun measures afresh (training refuses a folder that holds a run)
medtriad benchmark -c brats-cpu --input-size 128 128 80 -o "$out/brats-cpu" "${train[@]}" -q
medtriad benchmark -c brats-swin --input-size 96 96 96 -o "$out/brats-swin" "${train[@]}" -q
