#!/usr/bin/env bash
# Issue 2 benchmark: the brats-cpu recipe trained on 8 of the 10 shared BraTS 2018 cases (fold 0 of a stratified
# 5-fold split: 2 validation cases), at most 60 minutes of training on 2 CPU cores, then evaluated on the 2 held-out
# cases with the final weights (validation runs only once, at the end, so no epoch is picked by peeking at them).
# Evaluated twice: as predicted by default (one pass) and with test-time mirroring (8 passes per window).
# Usage: bash benchmarks/brats_cpu.sh [WORKDIR]   (results in WORKDIR/run/evaluation_val_last{,_mirrored}/summary.json)
set -euo pipefail
work=${1:-/tmp/medtriad-bench}
data=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/brats2018-sample/MICCAI_BraTS_2018_Data_Training
mkdir -p "$work"
[ -f "$work/dataset/dataset.json" ] || medtriad import brats "$data" "$work/dataset" -q
start=$(date +%s)
OMP_NUM_THREADS=2 medtriad train "$work/dataset" -c brats-cpu -o "$work/run" --fold 0 -q \
    --set training.validate_every=1000
echo "train wall time: $(( $(date +%s) - start )) s"
OMP_NUM_THREADS=2 medtriad evaluate "$work/run" "$work/dataset" --split val --checkpoint last -q
OMP_NUM_THREADS=2 medtriad evaluate "$work/run" "$work/dataset" --split val --checkpoint last -q \
    --set "inference.mirror_axes=[0,1,2]" -o "$work/run/evaluation_val_last_mirrored"
