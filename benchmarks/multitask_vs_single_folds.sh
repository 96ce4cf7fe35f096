#!/usr/bin/env bash
# Issue 5, quality half: the multi-task model and its three single-task variants trained with the same time budget
# on several folds of a dataset, then the per-fold validation metrics pooled into mean and spread per model and the
# multi-task minus single-task differences (benchmarks/compare_folds.py).
# Two folds train at a time, one CPU thread each (a 2-core machine kept busy evenly: every model of a fold trains
# beside the same model of the other fold, so all four variants see the same contention).
# Latency figures in the per-fold reports are taken under that contention: use benchmarks/multitask_vs_single.sh
# (uncontended) for cost.
# Usage: bash benchmarks/multitask_vs_single_folds.sh DATASET MINUTES OUTDIR [CONFIG] [FOLDS...]
#   e.g. bash benchmarks/multitask_vs_single_folds.sh /tmp/medtriad-bench/dataset 10 /tmp/mvs-folds brats-cpu 0 1
set -euo pipefail
dataset=${1:?usage: $0 DATASET MINUTES OUTDIR [CONFIG] [FOLDS...]}
minutes=${2:?MINUTES}
out=${3:?OUTDIR}
config=${4:-brats-cpu}
shift $(( $# < 4 ? $# : 4 ))
folds=("$@")
[ ${#folds[@]} -gt 0 ] || folds=(0 1)
mkdir -p "$out"
size=(128 128 80)  # a BraTS volume at 2 mm; the Swin encoder needs multiples of 32
[ "$config" != brats-swin ] || size=(96 96 96)
run_fold() {
    rm -rf "$out/fold$1"  # a rerun measures afresh (training refuses a folder that holds a run)
    OMP_NUM_THREADS=1 medtriad benchmark -c "$config" --input-size "${size[@]}" -o "$out/fold$1" \
        --train "$dataset" --minutes "$minutes" --fold "$1" --set training.validate_every=1000 -q \
        > "$out/fold$1.log" 2>&1
}
failed=()
for (( i = 0; i < ${#folds[@]}; i += 2 )); do
    pids=()
    run_fold "${folds[i]}" & pids+=("$!:${folds[i]}")
    if (( i + 1 < ${#folds[@]} )); then run_fold "${folds[i + 1]}" & pids+=("$!:${folds[i + 1]}"); fi
    for p in "${pids[@]}"; do wait "${p%%:*}" || failed+=("${p#*:}"); done
done
if [ ${#failed[@]} -gt 0 ]; then  # pooling the others would hide it
    echo "fold(s) ${failed[*]} failed; see $out/fold<K>.log" >&2
    exit 1
fi
python "$(dirname "$0")/compare_folds.py" "$out"/fold*/benchmark.json -o "$out/folds.md"
cat "$out/folds.md"
