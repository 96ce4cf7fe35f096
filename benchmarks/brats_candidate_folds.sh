#!/usr/bin/env bash
# Issue 2, a candidate change to the brats-cpu recipe measured on several folds: brats-cpu with the candidate's
# overrides trains for 60 minutes on each given fold, all folds side by side with one thread each (run two folds at a
# time on 2 cores: the conditions under which the shipped recipe's fold runs were made), then each run is evaluated on
# its fold's 2 held-out cases with its final weights, as predicted by default and with test-time mirroring (8 passes).
# Compare the printed mirrored mean Dice with the shipped recipe's runs of the same folds (docs/benchmarks.md); the
# rule for adopting the candidate is written down before the runs.
# Usage: bash benchmarks/brats_candidate_folds.sh WORKDIR TAG 'KEY=VALUE ...' FOLD [FOLD ...]
#   e.g. bash benchmarks/brats_candidate_folds.sh /tmp/medtriad-bench prior model.segmentation.prior=0.01 0 3
#   (no spaces inside one KEY=VALUE); results in WORKDIR/TAG-foldK/P/{evaluation_val_last,eval_mirrored}/summary.json.
set -euo pipefail
work=${1:?WORKDIR}
tag=${2:?TAG}
sets=${3:?overrides}
shift 3
folds=("${@:?FOLD}")
data=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/brats2018-sample/MICCAI_BraTS_2018_Data_Training
[ -f "$work/dataset/dataset.json" ] || medtriad import brats "$data" "$work/dataset" -q
extra=()
read -ra kvs <<< "$sets"  # split on spaces, no glob expansion of [..] values
for kv in "${kvs[@]}"; do extra+=(--set "$kv"); done
for fold in "${folds[@]}"; do
  mkdir -p "$work/$tag-fold$fold"
  OMP_NUM_THREADS=1 medtriad train "$work/dataset" -c brats-cpu -o "$work/$tag-fold$fold/P" --fold "$fold" -q \
      --set training.validate_every=1000 --set training.num_threads=1 "${extra[@]}" > "$work/$tag-fold$fold/P.log" 2>&1 &
done
wait
for fold in "${folds[@]}"; do
  run="$work/$tag-fold$fold/P"
  ( OMP_NUM_THREADS=1 medtriad evaluate "$run" "$work/dataset" --checkpoint last -q > /dev/null
    OMP_NUM_THREADS=1 medtriad evaluate "$run" "$work/dataset" --checkpoint last -q \
        --set "inference.mirror_axes=[0,1,2]" -o "$run/eval_mirrored" > /dev/null ) &
done
wait
labels=()
for fold in "${folds[@]}"; do labels+=("fold $fold=$work/$tag-fold$fold/P"); done
python "$(dirname "$0")/dice_summary.py" "${labels[@]}"
