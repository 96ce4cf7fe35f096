#!/usr/bin/env bash
# Issue 7, ninth session: five seeds of the medmnist-cnn recipe on VesselMNIST3D (7 epochs each, one thread each,
# bounded by epochs so contention does not change them) and their ensemble (`medtriad evaluate RUN... -o`), judged on
# val (best epochs, mirrored: the recipe's default), then test scored once for the ensemble and for each member.
# The commands behind docs/benchmarks.md's "A seed ensemble for vessel" tables (seed 0 there is the eighth session's
# /tmp/m8-vessel run, the others /tmp/m9sK-vessel; the same commands).
# Usage: bash benchmarks/medmnist_seed_ensemble.sh [OUT] [NAME]   (NAME: vessel (default) or adrenal)
set -euo pipefail
OUT=${1:-/tmp/mmbench}
NAME=${2:-vessel}
DATA=${MEDMNIST:-$(dirname "$0")/../../shared/data/medmnist3d}
mkdir -p "$OUT"
[ -d "$OUT/$NAME" ] || medtriad import medmnist "$DATA/${NAME}mnist3d.npz" "$OUT/$NAME" --task "$NAME" \
  --channel-name "$([ "$NAME" = vessel ] && echo MRA || echo CT)" -q
runs=()
for seed in 0 1 2 3 4; do
  run="$OUT/cnn7-$NAME-seed$seed"
  runs+=("$run")
  OMP_NUM_THREADS=1 medtriad train "$OUT/$NAME" -c medmnist-cnn -o "$run" -q --set training.max_minutes=0 \
    --set training.epochs=7 --set training.num_threads=1 --set training.seed=$seed > "$run.log" 2>&1 &
  if [ $((seed % 2)) = 1 ]; then wait; fi   # two at a time on 2 cores
done
wait
for split in val test; do
  for run in "${runs[@]}"; do medtriad evaluate "$run" "$OUT/$NAME" --split $split -q > /dev/null; done
  medtriad evaluate "${runs[@]}" "$OUT/$NAME" --split $split -o "$OUT/cnn7-$NAME-ensemble/evaluation_$split" -q > /dev/null
done
python - "$OUT" "$NAME" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/cnn7-{sys.argv[2]}-*/evaluation_*/summary.json")):
    print(f.split("/")[-3], f.split("/")[-2], f"AUC={json.load(open(f))['score']:.3f}")
PY
