# Sourced by the BraTS fold benchmarks (brats_vs_segresnet.sh, brats_candidate_folds.sh, brats_fold1_ab.sh,
# brats_single_task_heads.sh): how they import the shared sample, train a run for the recipe's 60 minutes at one
# thread (two runs side by side on 2 cores) and evaluate its final weights on the fold's held-out cases.
# brats_cpu.sh (one run alone on 2 threads) uses only brats_dataset.
# case_level_classification.sh (MedMNIST) uses only overrides_to_sets.

brats_dataset() {  # WORKDIR: the shared BraTS sample imported into WORKDIR/dataset, unless it is there already
  local data
  data=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/data/brats2018-sample/MICCAI_BraTS_2018_Data_Training
  [ -f "$1/dataset/dataset.json" ] || medtriad import brats "$data" "$1/dataset" -q
}

overrides_to_sets() {  # 'KEY=VALUE ...' -> the array SETS of `--set KEY=VALUE` arguments (no spaces inside one)
  local kvs kv
  SETS=()
  read -ra kvs <<< "$1"  # split on spaces, no glob expansion of [..] values
  for kv in ${kvs[@]+"${kvs[@]}"}; do SETS+=(--set "$kv"); done
}

train_one_thread() {  # DATASET CONFIG RUN FOLD [ARG ...]: one thread, validation only at the end; log in RUN.log
  local dataset=$1 config=$2 run=$3 fold=$4
  shift 4
  rm -rf "$run"  # a rerun trains afresh (medtriad train refuses a folder that holds a run)
  OMP_NUM_THREADS=1 medtriad train "$dataset" -c "$config" -o "$run" --fold "$fold" -q \
      --set training.validate_every=1000 --set training.num_threads=1 "$@" > "$run.log" 2>&1
}

evaluate_final() {  # RUN DATASET [both|default|mirrored]: final weights, as predicted by default (in
  # RUN/evaluation_val_last) and / or with test-time mirroring, 8 passes (in RUN/eval_mirrored); both by default
  local run=$1 dataset=$2 which=${3:-both}
  if [ "$which" != mirrored ]; then
    OMP_NUM_THREADS=1 medtriad evaluate "$run" "$dataset" --checkpoint last -q > /dev/null
  fi
  if [ "$which" != default ]; then
    OMP_NUM_THREADS=1 medtriad evaluate "$run" "$dataset" --checkpoint last -q \
        --set "inference.mirror_axes=[0,1,2]" -o "$run/eval_mirrored" > /dev/null
  fi
}
