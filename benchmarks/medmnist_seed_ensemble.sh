#!/usr/bin/env bash
# Issue 7: several seeds of the medmnist-cnn recipe on a MedMNIST 3D dataset, bounded by epochs (one thread each, two
# at once, so contention does not change them), and their ensemble (`medtriad evaluate RUN... -o`), judged on val
# (best epochs, mirrored: the recipe's default), then test scored once for the ensemble and for each member.
# The commands behind docs/benchmarks.md's "A seed ensemble for vessel" (ninth session: 7 epochs, seeds 0-4; seed 0
# there is the eighth session's /tmp/m8-vessel run, the others /tmp/m9sK-vessel) and "Longer training for vessel"
# (tenth session: 20 and 40 epochs, seeds 0-1, run folders /tmp/m10eEs{0,1}-vessel) tables.
# Eleventh session: all-plane rotations, SETS='data.rotation_planes=[[0,1],[0,2],[1,2]]' TAG=rot
# (run folders /tmp/m11rot40sK-vessel).
# Usage: [SETS='KEY=VALUE ...'] [TAG=name] bash benchmarks/medmnist_seed_ensemble.sh [OUT] [NAME] [EPOCHS] [SEEDS]
#   NAME: vessel (default) or adrenal; EPOCHS: 7 (default); SEEDS: "0 1 2 3 4" (default);
#   SETS: config overrides (no spaces inside one) passed to train as --set; TAG: marks the run folders' names
#   e.g. bash benchmarks/medmnist_seed_ensemble.sh /tmp/mmbench vessel 20 "0 1"
set -euo pipefail
OUT=${1:-/tmp/mmbench}
NAME=${2:-vessel}
EPOCHS=${3:-7}
SEEDS=${4:-0 1 2 3 4}
SETS=${SETS:-}
TAG=${TAG:-}
overrides=()
for kv in $SETS; do overrides+=(--set "$kv"); done
DATA=${MEDMNIST:-$(dirname "$0")/../../shared/data/medmnist3d}
mkdir -p "$OUT"
[ -d "$OUT/$NAME" ] || medtriad import medmnist "$DATA/${NAME}mnist3d.npz" "$OUT/$NAME" --task "$NAME" \
  --channel-name "$([ "$NAME" = vessel ] && echo MRA || echo CT)" -q
runs=()
for seed in $SEEDS; do
  run="$OUT/cnn$TAG$EPOCHS-$NAME-seed$seed"
  runs+=("$run")
  rm -rf "$run"  # a rerun trains afresh (medtriad train refuses a folder that holds a run)
  OMP_NUM_THREADS=1 medtriad train "$OUT/$NAME" -c medmnist-cnn -o "$run" -q --set training.max_minutes=0 \
    --set training.epochs="$EPOCHS" --set training.num_threads=1 --set training.seed="$seed" \
    ${overrides[@]+"${overrides[@]}"} > "$run.log" 2>&1 &
  if [ $((${#runs[@]} % 2)) = 0 ]; then wait; fi   # two at a time on 2 cores
done
wait
for split in val test; do
  for run in "${runs[@]}"; do medtriad evaluate "$run" "$OUT/$NAME" --split $split -q > /dev/null; done
  medtriad evaluate "${runs[@]}" "$OUT/$NAME" --split $split -o "$OUT/cnn$TAG$EPOCHS-$NAME-ensemble/evaluation_$split" \
    -q > /dev/null
done
python - "$OUT" "$NAME" "$TAG$EPOCHS" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/cnn{sys.argv[3]}-{sys.argv[2]}-*/evaluation_*/summary.json")):
    print(f.split("/")[-3], f.split("/")[-2], f"AUC={json.load(open(f))['score']:.3f}")
PY
