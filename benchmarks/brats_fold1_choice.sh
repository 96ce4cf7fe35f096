#!/usr/bin/env bash
# Issue 2, choosing the brats-cpu recipe without looking at the benchmark's fold 0: on fold 1 (held-out
# Brats18_TCIA01_201_1, Brats18_TCIA13_623_1), the output-layer prior (null / 0.01) crossed with the largest-component
# post-processing (off / 1), then segmentation thresholds on the prior-null run. The two 60-minute runs train side by
# side with one thread each (same conditions for both, about half the steps of a run alone); every evaluation is
# mirrored (8 passes) on the final weights. The commands that produced docs/benchmarks.md's seventh-session tables.
# Usage: bash benchmarks/brats_fold1_choice.sh [WORKDIR]   (needs WORKDIR/dataset from benchmarks/brats_cpu.sh;
# results in WORKDIR/fold1/p{null,0.01}/eval_*/summary.json)
set -euo pipefail
work=${1:-/tmp/medtriad-bench}
data="$work/dataset"
[ -f "$data/dataset.json" ] || { echo "no $data: run benchmarks/brats_cpu.sh first" >&2; exit 1; }
out="$work/fold1"
mkdir -p "$out"
for prior in null 0.01; do
  rm -rf "$out/p$prior"  # a rerun trains afresh (medtriad train refuses a folder that holds a run)
  OMP_NUM_THREADS=1 medtriad train "$data" -c brats-cpu -o "$out/p$prior" --fold 1 -q \
      --set training.validate_every=1000 --set training.num_threads=1 \
      --set "model.segmentation={decoder_channels: [8, 16, 32, 64], prior: $prior}" > "$out/p$prior.log" 2>&1 &
done
wait
evaluate() {  # RUN NAME SETTING...
  local run=$1 name=$2; shift 2
  OMP_NUM_THREADS=1 medtriad evaluate "$run" "$data" --checkpoint last -q --set "inference.mirror_axes=[0,1,2]" \
      "${@/#/--set=}" -o "$run/eval_m_$name" > /dev/null
}
for prior in null 0.01; do
  ( evaluate "$out/p$prior" lccnull inference.largest_components=null
    evaluate "$out/p$prior" lcc1 inference.largest_components=1 ) &
done
wait
for t in 0.3 0.4 0.6 0.7; do evaluate "$out/pnull" "t$t" "inference.segmentation_threshold=$t"; done
evaluate "$out/p0.01" t0.7 inference.segmentation_threshold=0.7
python - "$out" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/p*/eval_m_*/summary.json")):
    dice = {k: v["mean"] for k, v in json.load(open(f))["segmentation"].items() if k.startswith("dice")}
    print(f.split("/")[-3], f.split("/")[-2], " ".join(f"{k}={v:.3f}" for k, v in dice.items()),
          f"mean={sum(dice.values()) / len(dice):.3f}")
PY
