"""The trained weights of a run with weight EMA (``training.ema_decay``) as a run folder of their own, for evaluation.

An EMA run's checkpoint holds the averaged weights as the model and the trained weights under ``train.*``
(medtriad.training.trainer). The EMA update draws no random numbers, so for the same steps the trained weights are
those of a run without EMA (tests/training/test_trainer.py). This script copies the run folder's metadata (config,
split, model spec, history) and one checkpoint into OUT with ``train.*`` promoted to the model weights, so that
`medtriad evaluate OUT ...` scores the trained weights exactly as it scores the EMA ones in RUN: both arms of a
paired comparison from one training run.
The copy is for `medtriad evaluate` / `predict` only: its config, state and history are the EMA run's (validation
scores included), and `train --resume` on it fails.

Usage: python benchmarks/ema_trained_copy.py RUN OUT [--checkpoint last]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import save_file

from medtriad.checkpoint import WEIGHTS, load_weights, owned_by, resolve_checkpoint


def trained_copy(run: Path, out: Path, checkpoint: str = "last") -> Path:
    """Writes OUT (which must not exist) and returns it."""
    if out.exists():
        raise SystemExit(f"{out} exists: give a new folder for the copy")
    source = resolve_checkpoint(run / "checkpoints" / checkpoint)
    weights = load_weights(source)
    trained = owned_by("train.", weights)
    if not trained:
        raise SystemExit(f"{source / WEIGHTS}: no train.* weights; was {run} trained with training.ema_decay?")
    trained.update({k: v for k, v in weights.items() if k.startswith("balancer.")})
    out.mkdir(parents=True)
    for name in ("config.yaml", "split.json", "model.json", "history.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    folder = out / "checkpoints" / checkpoint
    folder.mkdir(parents=True)
    for item in source.iterdir():  # state, optimizer tensors, model spec: all but the weights, unchanged
        if item.name != WEIGHTS:
            shutil.copy2(item, folder / item.name)
    save_file({k: v.contiguous() for k, v in trained.items()}, str(folder / WEIGHTS))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder trained with training.ema_decay")
    parser.add_argument("out", type=Path, help="new run folder for the trained weights")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"])
    args = parser.parse_args()
    print(trained_copy(args.run, args.out, args.checkpoint))


if __name__ == "__main__":
    main()
