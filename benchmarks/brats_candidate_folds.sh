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
source "$(dirname "$0")/brats_fold_runs.sh"
brats_dataset "$work"
overrides_to_sets "$sets"
for fold in "${folds[@]}"; do
  mkdir -p "$work/$tag-fold$fold"
  train_one_thread "$work/dataset" brats-cpu "$work/$tag-fold$fold/P" "$fold" "${SETS[@]}" &
done
wait
for fold in "${folds[@]}"; do
  evaluate_final "$work/$tag-fold$fold/P" "$work/dataset" &
done
wait
labels=()
for fold in "${folds[@]}"; do labels+=("fold $fold=$work/$tag-fold$fold/P"); done
python "$(dirname "$0")/dice_summary.py" "${labels[@]}"
