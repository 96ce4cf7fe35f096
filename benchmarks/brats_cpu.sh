#!/usr/bin/env bash
# Issue 2 benchmark: the brats-cpu recipe (or another CONFIG, e.g. the single-task reference brats-segresnet) trained
# on 8 of the 10 shared BraTS 2018 cases (one fold of a stratified 5-fold split: 2 validation cases; fold 0 unless
# given), at most 60 minutes of training on 2 CPU cores with nothing else running, then evaluated on the 2 held-out
# cases with the final weights (validation runs only once, at the end, so no epoch is picked by peeking at them).
# Evaluated twice: as predicted by default (one pass) and with test-time mirroring (8 passes per window).
# Usage: bash benchmarks/brats_cpu.sh [WORKDIR] [FOLD] [CONFIG]
#   results in RUN/evaluation_val_last{,_mirrored}/summary.json, RUN = WORKDIR/run for brats-cpu on fold 0, with
#   -foldK appended for another fold and -CONFIG for another config (e.g. WORKDIR/run-fold3-brats-segresnet)
set -euo pipefail
work=${1:-/tmp/medtriad-bench}
fold=${2:-0}
config=${3:-brats-cpu}
run=$work/run
[ "$fold" = 0 ] || run=$run-fold$fold
[ "$config" = brats-cpu ] || run=$run-$(basename "$config" .yaml)  # a name or a YAML path
source "$(dirname "$0")/brats_fold_runs.sh"
mkdir -p "$work"
brats_dataset "$work"
rm -rf "$run"  # a rerun trains afresh (medtriad train refuses a folder that holds a run)
start=$(date +%s)
OMP_NUM_THREADS=2 medtriad train "$work/dataset" -c "$config" -o "$run" --fold "$fold" -q \
    --set training.validate_every=1000
echo "train wall time: $(( $(date +%s) - start )) s"
OMP_NUM_THREADS=2 medtriad evaluate "$run" "$work/dataset" --split val --checkpoint last -q
OMP_NUM_THREADS=2 medtriad evaluate "$run" "$work/dataset" --split val --checkpoint last -q \
    --set "inference.mirror_axes=[0,1,2]" -o "$run/evaluation_val_last_mirrored"
