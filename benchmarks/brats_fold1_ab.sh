#!/usr/bin/env bash
# Issue 2, choosing a change to the brats-cpu recipe without looking at the benchmark's fold 0: the shipped recipe (A)
# and the recipe with the candidate's overrides (B) train for 60 minutes on fold 1 (held-out Brats18_TCIA01_201_1,
# Brats18_TCIA13_623_1) side by side, one thread each (the same conditions for both, about half the steps of a run
# alone), then both are evaluated mirrored (8 passes) on their final weights. The rule for adopting B is written down
# before the runs (docs/benchmarks.md); a B that wins here is then measured on fold 0 with benchmarks/brats_cpu.sh.
# Usage: bash benchmarks/brats_fold1_ab.sh WORKDIR TAG 'KEY=VALUE ...' ['KEY=VALUE ...']
#   e.g. bash benchmarks/brats_fold1_ab.sh /tmp/medtriad-bench ds2 model.segmentation.deep_supervision=2
#   (no spaces inside one KEY=VALUE); results in WORKDIR/fold1-TAG/{A,B}/eval_mirrored/summary.json.
#   With a second set of overrides the two candidates train side by side instead, as arms B and C (no A: compare
#   them with an A trained the same way in the same session).
#   FOLD=K runs the pair on another fold (default 1; fold 0 is the benchmark's own, use it only where a rule says
#   so), in WORKDIR/foldK-TAG instead of WORKDIR/fold1-TAG.
set -euo pipefail
work=${1:?WORKDIR}
tag=${2:?TAG}
sets_b=${3:?overrides}
sets_c=${4-}
source "$(dirname "$0")/brats_fold_runs.sh"
brats_dataset "$work"
fold=${FOLD:-1}
out="$work/fold$fold-$tag"
echo "fold $fold: $out"
mkdir -p "$out"
declare -A arm_sets=([A]="" [B]="$sets_b")
arms="A B"
if [ -n "$sets_c" ]; then arm_sets[C]=$sets_c; arms="B C"; fi
for arm in $arms; do
  overrides_to_sets "${arm_sets[$arm]}"
  train_one_thread "$work/dataset" brats-cpu "$out/$arm" "$fold" ${SETS[@]+"${SETS[@]}"} &
done
wait
for arm in $arms; do
  evaluate_final "$out/$arm" "$work/dataset" mirrored &
done
wait
labels=()
for arm in $arms; do labels+=("$arm=$out/$arm"); done
python "$(dirname "$0")/dice_summary.py" "${labels[@]}" --evals eval_mirrored
