#!/usr/bin/env bash
# Issue 7, eighth session: the medmnist-cnn recipe against recipe + model.radial_coordinate on AdrenalMNIST3D and
# VesselMNIST3D, 7 epochs each, four runs at once with one thread each (bounded by epochs, so contention does not
# change them); judged on val (best epoch, mirrored: the recipe's default), then test scored once for the recipe's runs.
# The commands behind docs/benchmarks.md's "Centred padding at inference" tables.
# Usage: bash benchmarks/medmnist_cnn_choice.sh [OUT]   (reuses OUT/{adrenal,vessel} from benchmarks/medmnist.sh)
set -euo pipefail
OUT=${1:-/tmp/mmbench}
DATA=${MEDMNIST:-$(dirname "$0")/../../shared/data/medmnist3d}
mkdir -p "$OUT"
[ -d "$OUT/adrenal" ] || medtriad import medmnist "$DATA/adrenalmnist3d.npz" "$OUT/adrenal" --task adrenal -q
[ -d "$OUT/vessel" ] || medtriad import medmnist "$DATA/vesselmnist3d.npz" "$OUT/vessel" --task vessel \
  --channel-name MRA -q
for name in adrenal vessel; do
  for radial in false true; do
    rm -rf "$OUT/cnn7-$name-radial_$radial"  # a rerun trains afresh (medtriad train refuses a folder that holds a run)
    OMP_NUM_THREADS=1 medtriad train "$OUT/$name" -c medmnist-cnn -o "$OUT/cnn7-$name-radial_$radial" -q \
      --set training.max_minutes=0 --set training.epochs=7 --set training.num_threads=1 \
      --set model.radial_coordinate=$radial > "$OUT/cnn7-$name-radial_$radial.log" 2>&1 &
  done
done
wait
for name in adrenal vessel; do
  for radial in false true; do
    medtriad evaluate "$OUT/cnn7-$name-radial_$radial" "$OUT/$name" --split val -q > /dev/null
  done
  medtriad evaluate "$OUT/cnn7-$name-radial_false" "$OUT/$name" --split test -q > /dev/null   # the shipped recipe
done
python - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/cnn7-*/evaluation_*/summary.json")):
    print(f.split("/")[-3], f.split("/")[-2], f"AUC={json.load(open(f))['score']:.3f}")
PY
