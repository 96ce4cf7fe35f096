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
set -euo pipefail
work=${1:?WORKDIR}
tag=${2:?TAG}
sets_b=${3:?overrides}
sets_c=${4-}
data=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/brats2018-sample/MICCAI_BraTS_2018_Data_Training
[ -f "$work/dataset/dataset.json" ] || medtriad import brats "$data" "$work/dataset" -q
out="$work/fold1-$tag"
mkdir -p "$out"
declare -A arm_sets=([A]="" [B]="$sets_b")
arms="A B"
if [ -n "$sets_c" ]; then arm_sets[C]=$sets_c; arms="B C"; fi
for arm in $arms; do
  extra=()
  read -ra kvs <<< "${arm_sets[$arm]}"  # split on spaces, no glob expansion of [..] values
  for kv in ${kvs[@]+"${kvs[@]}"}; do extra+=(--set "$kv"); done
  OMP_NUM_THREADS=1 medtriad train "$work/dataset" -c brats-cpu -o "$out/$arm" --fold 1 -q \
      --set training.validate_every=1000 --set training.num_threads=1 ${extra[@]+"${extra[@]}"} > "$out/$arm.log" 2>&1 &
done
wait
for arm in $arms; do
  OMP_NUM_THREADS=1 medtriad evaluate "$out/$arm" "$work/dataset" --checkpoint last -q \
      --set "inference.mirror_axes=[0,1,2]" -o "$out/$arm/eval_mirrored" > /dev/null &
done
wait
labels=()
for arm in $arms; do labels+=("$arm=$out/$arm"); done
python "$(dirname "$0")/dice_summary.py" "${labels[@]}" --evals eval_mirrored
