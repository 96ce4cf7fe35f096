#!/usr/bin/env bash
# Issue 5, quality under the same budget: brats-cpu's single-task detection variant (arm D) and single-task
# classification variant (arm C) train for 60 minutes each on the same fold of the shared BraTS sample, side by side
# with one thread each (the conditions under which the multi-task recipe ran beside its segmentation-only variant in
# benchmarks/brats_vs_segresnet.sh), then both are evaluated on the fold's 2 held-out cases with their final weights.
# Each variant is the same encoder and settings with one head and that head's loss weight 1.0.
# Usage: bash benchmarks/brats_single_task_heads.sh WORKDIR FOLD
#   results in WORKDIR/heads-foldFOLD/{D,C}/evaluation_val_last/summary.json and a line per arm on stdout.
set -euo pipefail
work=${1:?WORKDIR}
fold=${2:?FOLD}
source "$(dirname "$0")/brats_fold_runs.sh"
brats_dataset "$work"
out="$work/heads-fold$fold"
mkdir -p "$out"
declare -A heads=([D]="[detection]" [C]="[classification]")
declare -A weights=([D]='{"detection":1.0}' [C]='{"class:grade":1.0}')
for arm in D C; do
  train_one_thread "$work/dataset" brats-cpu "$out/$arm" "$fold" \
      --set "model.heads=${heads[$arm]}" --set "training.loss_weights=${weights[$arm]}" &
done
wait
for arm in D C; do
  evaluate_final "$out/$arm" "$work/dataset" default &
done
wait
python - "$out" <<'PY'
import json, sys
for arm in ("D", "C"):
    steps = json.load(open(f"{sys.argv[1]}/{arm}/history.json"))[-1]["step"]
    summary = json.load(open(f"{sys.argv[1]}/{arm}/evaluation_val_last/summary.json"))
    det = summary.get("detection", {})
    cls = summary.get("classification", {}).get("grade", {})
    scores = {k: det[k] for k in ("AP_IoU_0.10", "AP_IoU_0.50", "mAP_IoU_0.10_0.50") if k in det}
    scores.update({f"grade_{k}": cls[k] for k in ("auc", "accuracy") if k in cls})
    print(arm, f"steps={steps}", " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
PY
