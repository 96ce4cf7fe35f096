"""Where a `brats-cpu` training step's time goes on real BraTS cases: drawing and augmenting the batch
(`Trainer.draw_batch`) against one forward + backward pass (`Trainer.step_losses`, the weighted sum backpropagated;
no optimizer step), for each intensity augmentation profile, on the threads given.

The trainer draws and augments its batch in the training process itself, so under a time budget the augmentation's
time is taken from the optimisation steps. Each figure is the median over --batches batches after one warm-up batch
(the same batches, by step number, for every profile).

Usage: python benchmarks/brats_batch_time.py DATASET [--fold 0] [--threads 2] [--batches 10] [--profiles light strong]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from medtriad.config import Config
from medtriad.training.trainer import Trainer


def _median_s(fn, batches: int) -> float:
    fn(0)  # warm-up
    times = []
    for step in range(1, batches + 1):
        start = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--config", default="brats-cpu")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--profiles", nargs="+", default=["light", "strong"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| {args.config}, fold {args.fold}, {args.threads} threads, median of {args.batches} batches "
          "| draw + augment (s) | forward + backward (s) | augmentation share |")
    print("|---|---:|---:|---:|")
    for profile in args.profiles:
        config = Config.load(args.config, {"data.intensity_augmentation": profile})
        with tempfile.TemporaryDirectory() as scratch:
            trainer = Trainer(args.dataset, config, scratch, fold=args.fold, device="cpu", progress=False)
            trainer.prepare()  # sets no thread count (fit does): the figures run on --threads
            draw = _median_s(trainer.draw_batch, args.batches)

            def forward_backward(step: int) -> None:
                losses, tail = trainer.step_losses(trainer.draw_batch(step))
                trainer.network.zero_grad(set_to_none=True)
                (sum(losses.values()) + tail).backward()

            both = _median_s(forward_backward, args.batches)
        print(f"| {profile} | {draw:.2f} | {both - draw:.2f} | {draw / both:.0%} |")


if __name__ == "__main__":
    main()
