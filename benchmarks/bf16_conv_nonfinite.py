"""How many bfloat16 training steps of `medmnist-cnn` have non-finite gradients, with and without the float32 guard.

Found training `medmnist-cnn` with ``training.precision: bf16`` (fifteenth session, docs/benchmarks.md): under
bfloat16 autocast on this CPU the weight gradients of the 3x3x3 convolutions of the encoder's deepest stage (a 2^3
map for a 32^3 input) were now and then NaN, and more often finite garbage of 1e26-1e35 whose norm overflows; one
such step used to make every weight NaN. The encoder now runs stages with maps of <= 27 voxels in float32
(``medtriad.models.encoders.resenc.TINY_MAP_VOXELS``) and the trainer skips any remaining non-finite step. This script
trains one epoch of STEPS steps twice from the same seed, the deepest stage in bfloat16 (the guard off) and in
float32 (the default), and reports the skipped steps (``skipped_steps`` in history.json).

Usage: python benchmarks/bf16_conv_nonfinite.py DATASET [--steps 38] [--threads 1] [--out /tmp/bf16-guard]
  DATASET: an imported MedMNIST 3D dataset, e.g. `medtriad import medmnist .../vesselmnist3d.npz /tmp/mmbench/vessel
  --task vessel --channel-name MRA`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import torch

from medtriad.config import Config
from medtriad.models.encoders import resenc
from medtriad.training.trainer import Trainer


def skipped_steps(dataset: str, out: Path, steps: int, threads: int) -> int:
    config = Config.load("medmnist-cnn", {"training.max_minutes": 0, "training.epochs": 1,
                                          "training.iterations_per_epoch": steps, "training.validate_every": 1000,
                                          "training.precision": "bf16", "training.num_threads": threads,
                                          "training.seed": 0, "data.rotation_planes": [[0, 1], [0, 2], [1, 2]]})
    shutil.rmtree(out, ignore_errors=True)  # a rerun trains afresh (the trainer refuses a folder holding a run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(dataset, config, out, device="cpu", progress=False).fit()
    return json.loads((out / "history.json").read_text())[0]["skipped_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--steps", type=int, default=38)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/bf16-guard")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), medmnist-cnn, bf16, {args.steps} steps from seed 0")
    print("| deepest stage (2^3 map) | steps with non-finite gradients (skipped) |\n|---|---:|")
    guard = resenc.TINY_MAP_VOXELS
    for name, voxels in (("bfloat16 (guard off)", 0), ("float32 (default)", guard)):
        resenc.TINY_MAP_VOXELS = voxels
        try:
            n = skipped_steps(args.dataset, Path(args.out) / f"tiny{voxels}", args.steps, args.threads)
        finally:
            resenc.TINY_MAP_VOXELS = guard
        print(f"| {name} | {n} of {args.steps} |", flush=True)


if __name__ == "__main__":
    main()
