#!/usr/bin/env bash
# Issue 2, item 6: case-level classification learned from patches against the same recipe on whole volumes, on real
# data where the class can be learned (AdrenalMNIST3D at 64^3, official splits, scored on val only; test untouched).
# Recipe medmnist-cnn, MINUTES each alone on 2 threads, one after the other, final weights, the recipe's mirroring:
#   W: whole volume per sample (patch 64^3, batch 4)
#   P: 32^3 patches (batch 32: the same voxels per batch), attention pooled over every window of the volume at
#      inference (27 windows with the recipe's overlap 0.25)
# Usage: bash benchmarks/case_level_classification.sh WORKDIR [MINUTES] [SEED]   (10 in docs/benchmarks.md; seed 0
#   unless given: training.seed, the data order, augmentation and initial weights)
#   results in WORKDIR/{W,P}/evaluation_val_last/summary.json and a line per arm on stdout.
set -euo pipefail
work=${1:?WORKDIR}
minutes=${2:-10}
seed=${3:-0}
data=${MEDMNIST:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/medmnist3d}
mkdir -p "$work"
[ -d "$work/adrenal64" ] || medtriad import medmnist "$data/adrenalmnist3d_64.npz" "$work/adrenal64" --task adrenal -q
source "$(dirname "$0")/brats_fold_runs.sh"  # overrides_to_sets
declare -A overrides=([W]="data.patch_size=[64,64,64] training.batch_size=4"
                      [P]="data.patch_size=[32,32,32] training.batch_size=32")
for arm in W P; do
  overrides_to_sets "${overrides[$arm]}"
  rm -rf "${work:?}/$arm"  # a rerun trains afresh (medtriad train refuses a folder that holds a run)
  OMP_NUM_THREADS=2 medtriad train "$work/adrenal64" -c medmnist-cnn -o "$work/$arm" -q \
      --set "training.max_minutes=$minutes" --set "training.seed=$seed" "${SETS[@]}" > "$work/$arm.log" 2>&1
  OMP_NUM_THREADS=2 medtriad evaluate "$work/$arm" "$work/adrenal64" --split val --checkpoint last -q >> "$work/$arm.log"
done
python - "$work" <<'PY'
import json, sys
auc = {}
for arm in ("W", "P"):
    s = json.load(open(f"{sys.argv[1]}/{arm}/evaluation_val_last/summary.json"))["classification"]["adrenal"]
    steps = json.load(open(f"{sys.argv[1]}/{arm}/history.json"))[-1]["step"]
    auc[arm] = s["auc"]
    print(arm, f"steps={steps}", " ".join(f"{k}={s[k]:.3f}" for k in ("auc", "accuracy", "sensitivity", "specificity")))
print(f"P - W AUC {auc['P'] - auc['W']:+.3f}")
PY
