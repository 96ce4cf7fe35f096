#!/usr/bin/env bash
# Issue 2, "never below the single-task reference under the same budget": the multi-task recipe brats-cpu (arm A) and
# the single-task reference brats-segresnet (arm R: MONAI's SegResNet, init_filters 16, 2 mm, 64^3, Dice + focal)
# train for 60 minutes each on the same fold of the shared BraTS sample, side by side with one thread each (the same
# conditions for both), then both are evaluated on the fold's 2 held-out cases with their final weights, as predicted
# by default and with test-time mirroring (8 passes).
# Usage: bash benchmarks/brats_vs_segresnet.sh WORKDIR FOLD ['KEY=VALUE ...'] [seg-only]
#   results in WORKDIR/ref-foldFOLD/{A,R}/{evaluation_val_last,eval_mirrored}/summary.json and a table on stdout.
#   With overrides (no spaces inside one KEY=VALUE) the brats-cpu arm trains with them and is named B instead of A,
#   e.g. 'model.heads=[segmentation] training.loss_weights={"segmentation":1.0}' (its single-task variant, issue 5).
#   With a fourth argument `seg-only` the second arm is brats-cpu's own single-task segmentation variant (arm S: the
#   same encoder, decoder and settings, one head) instead of the SegResNet reference, in WORKDIR/seg-foldFOLD (issue 5:
#   multi-task against single-task at the recipe's full budget), e.g. bash benchmarks/brats_vs_segresnet.sh W 0 '' seg-only
#   There the multi-task arm is also scored mirrored without its detection gate (RUN/eval_mirrored_nogate), the same
#   post-processing as S, which has no detection head.
set -euo pipefail
work=${1:?WORKDIR}
fold=${2:?FOLD}
sets=${3-}
source "$(dirname "$0")/brats_fold_runs.sh"
brats_dataset "$work"
ref=R
recipe_r=brats-segresnet
ref_sets=()
out="$work/ref-fold$fold"
if [ "${4-}" = seg-only ]; then
  ref=S
  recipe_r=brats-cpu
  ref_sets=(--set "model.heads=[segmentation]" --set 'training.loss_weights={"segmentation":1.0}')
  out="$work/seg-fold$fold"
fi
mkdir -p "$out"
overrides_to_sets "$sets"  # the multi-task arm's overrides, in SETS
multi=A
[ -z "$sets" ] || multi=B
declare -A recipe=([$multi]=brats-cpu [$ref]=$recipe_r)
for arm in $multi $ref; do
  more=(${ref_sets[@]+"${ref_sets[@]}"})
  [ "$arm" = $ref ] || more=(${SETS[@]+"${SETS[@]}"})
  train_one_thread "$work/dataset" "${recipe[$arm]}" "$out/$arm" "$fold" ${more[@]+"${more[@]}"} &
done
wait
for arm in $multi $ref; do
  evaluate_final "$out/$arm" "$work/dataset" &
done
wait
python "$(dirname "$0")/dice_summary.py" "$multi=$out/$multi" "$ref=$out/$ref"
if [ $ref = S ]; then  # like for like: S has no detection head, so no detection gate; A scored without it too
  OMP_NUM_THREADS=2 medtriad evaluate "$out/$multi" "$work/dataset" --checkpoint last -q \
      --set inference.detection_gate=null --set "inference.mirror_axes=[0,1,2]" -o "$out/$multi/eval_mirrored_nogate" \
      > /dev/null
  python "$(dirname "$0")/dice_summary.py" "$multi=$out/$multi" --evals eval_mirrored_nogate
fi
