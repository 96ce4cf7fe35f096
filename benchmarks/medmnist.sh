#!/usr/bin/env bash
# MedMNIST 3D benchmark (issue 7): the core's 3D CNN classifier and the AnyMC3D slice-plugin classifier on
# AdrenalMNIST3D and VesselMNIST3D (28^3, official splits: train, select the best epoch on val, score test once).
# The slice2d backbone is a randomly initialised ViT (no pretrained weights on the benchmark machine); the vessel
# plugin is trained on the adrenal run's backbone file, then both plugins are served together on one backbone.
# Usage: bash benchmarks/medmnist.sh OUT [CNN_MINUTES] [PLUGIN_MINUTES]
set -euo pipefail
OUT=${1:?usage: medmnist.sh OUT [CNN_MINUTES] [PLUGIN_MINUTES]}
CNN_MIN=${2:-8}
PLUGIN_MIN=${3:-6}
DATA=${MEDMNIST:-$(dirname "$0")/../../shared/data/medmnist3d}
mkdir -p "$OUT"
[ -d "$OUT/adrenal" ] || medtriad import medmnist "$DATA/adrenalmnist3d.npz" "$OUT/adrenal" --task adrenal -q
[ -d "$OUT/vessel" ] || medtriad import medmnist "$DATA/vesselmnist3d.npz" "$OUT/vessel" --task vessel --channel-name MRA -q
# a rerun trains afresh (medtriad train refuses a folder that holds a run)
rm -rf "$OUT"/cnn-adrenal "$OUT"/cnn-vessel "$OUT"/plugin-adrenal "$OUT"/plugin-vessel
for name in adrenal vessel; do
  medtriad train "$OUT/$name" -c medmnist-cnn -o "$OUT/cnn-$name" --set training.max_minutes=$CNN_MIN -q
  medtriad evaluate "$OUT/cnn-$name" "$OUT/$name" --split test -q
done
medtriad train "$OUT/adrenal" -c medmnist-slice2d -o "$OUT/plugin-adrenal" --set training.max_minutes=$PLUGIN_MIN -q
medtriad evaluate "$OUT/plugin-adrenal" "$OUT/adrenal" --split test -q
medtriad train "$OUT/vessel" -c medmnist-slice2d -o "$OUT/plugin-vessel" --set training.max_minutes=$PLUGIN_MIN \
  --set "model.encoder_kwargs={weights: $OUT/plugin-adrenal/backbone, slice_size: 28, max_slices: 10}" -q
medtriad evaluate "$OUT/plugin-vessel" "$OUT/vessel" --split test -q
python "$(dirname "$0")/medmnist_shared_backbone.py" "$OUT"
