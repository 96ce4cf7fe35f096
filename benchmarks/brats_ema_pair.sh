#!/usr/bin/env bash
# Issue 2, weight EMA for brats-cpu as a paired test (thirty-second session): brats-cpu with training.ema_decay
# trains for 60 minutes on two folds side by side, one thread each. Each run then gives two arms, each evaluated on
# its fold's 2 held-out cases with the final checkpoint, as predicted by default and mirrored (four evaluations per
# run): arm E, the EMA weights (the checkpoint's model), and arm T, the trained weights of the same run
# (ema_trained_copy.py). The EMA update draws no random numbers, so T is an ordinary run of the recipe without EMA
# and E - T is the EMA's effect with the run's luck held fixed.
# Usage: bash benchmarks/brats_ema_pair.sh WORKDIR DECAY FOLD FOLD
#   results in WORKDIR/ema/E{FOLD} and WORKDIR/ema/T{FOLD} ({evaluation_val_last,eval_mirrored}/summary.json) and a
#   table on stdout.
#   MINUTES=N (environment) trains for N minutes instead of the recipe's 60: a quick check that the script runs end
#   to end, not a measurement.
set -euo pipefail
work=${1:?WORKDIR}
decay=${2:?DECAY}
shift 2
folds=("$@")
[ ${#folds[@]} -eq 2 ] || { echo "give two folds: they train side by side, one thread each" >&2; exit 2; }
here=$(dirname "$0")
source "$here/brats_fold_runs.sh"
brats_dataset "$work"
out="$work/ema"
mkdir -p "$out"
budget=()
[ -z "${MINUTES:-}" ] || budget=(--set "training.max_minutes=$MINUTES")
pids=()
for fold in "${folds[@]}"; do
  train_one_thread "$work/dataset" brats-cpu "$out/E$fold" "$fold" --set "training.ema_decay=$decay" \
      ${budget[@]+"${budget[@]}"} &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run stops the script (a bare `wait` would not)
rows=()
for fold in "${folds[@]}"; do
  python "$here/ema_trained_copy.py" "$out/E$fold" "$out/T$fold" > /dev/null
  evaluate_final "$out/E$fold" "$work/dataset" & e=$!
  evaluate_final "$out/T$fold" "$work/dataset" & t=$!
  wait "$e"; wait "$t"
  rows+=("E$fold=$out/E$fold" "T$fold=$out/T$fold")
done
python "$here/dice_summary.py" "${rows[@]}"
