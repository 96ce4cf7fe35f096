"""What flushing a checkpoint to disk (fsync) costs a training run, per save.

A `brats-cpu`-sized checkpoint (the multi-task model's weights twice, as an EMA run stores the average and the trained
copy, plus AdamW's two moments: about 310 MB) is written with :func:`medtriad.checkpoint.save_checkpoint` into a
folder under WORKDIR, alternately as shipped (files and folders flushed before and after the swap) and with the flush
left out, ``--repeats`` times each. Reports the median seconds per save of each and their difference; the trainer
saves `last` every epoch (and `best` when it improves), inside the time budget.

Usage: python benchmarks/checkpoint_save.py WORKDIR [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medtriad import checkpoint
from medtriad.benchmark import brats_model_spec
from medtriad.config import Config
from medtriad.models.multitask import build_model, model_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="a folder on the disk the runs write to")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(brats_model_spec(Config.load("brats-cpu")))
    weights = model_weights(model)
    weights.update({f"train.{k}": v.clone() for k, v in weights.items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = {"epoch": 0, "step": 40, "optimizer": optimizer.state_dict()}
    size = sum(v.numel() * v.element_size() for v in weights.values())
    flush = checkpoint.fsync_path
    times: dict[str, list[float]] = {"flushed": [], "not flushed": []}
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        for _ in range(args.repeats):
            for name in times:
                checkpoint.fsync_path = flush if name == "flushed" else (lambda path: None)
                start = time.perf_counter()
                checkpoint.save_checkpoint(folder / "last", weights, state)
                times[name].append(time.perf_counter() - start)
    finally:
        checkpoint.fsync_path = flush
        shutil.rmtree(folder, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"checkpoint: {size / 1e6:.0f} MB of weights + the optimizer state, {args.repeats} saves each")
    for name, t in times.items():
        print(f"  {name}: median {medians[name]:.2f} s (min {min(t):.2f}, max {max(t):.2f})")
    print(f"  flush cost per save: {medians['flushed'] - medians['not flushed']:+.2f} s")


if __name__ == "__main__":
    main()
