"""How much each task pulls on the shared encoder: per-task gradients of a multi-task run, as it trains.

For a run folder (its resolved ``config.yaml``, fold and dataset) the script draws training batches exactly as the
trainer does, and for each task takes the gradient of ``weight * loss`` with respect to every trainable encoder
parameter. It prints, averaged over the batches, each task's gradient norm and its cosine with the segmentation
gradient, and the cosine between the summed gradient (what the encoder follows) and segmentation's: first at the
run's initial weights (seeded as the trainer seeds), then at its ``last`` checkpoint. With AdamW the heads' own updates do not
depend on a loss weight's scale; the weights only set the mix the shared encoder sees, which is what this measures.
For a run trained with weight EMA the gradients are taken at the weights being trained, not at their average. For a
run with a stop-gradient (``training.encoder_gradient``) the gradients are what training passes to the encoder: a
stopped head's norm is 0.

Usage: python benchmarks/task_gradients.py RUN_DIR DATASET [--batches 8] [--checkpoint last]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile

import numpy as np
import torch

from medtriad.checkpoint import resolve_checkpoint
from medtriad.config import Config
from medtriad.training.trainer import Trainer


def task_gradients(trainer: Trainer, batches: int) -> dict[str, tuple[float, float]]:
    """{task: (mean weighted gradient norm on the encoder, mean cosine with segmentation's)}, plus "sum"."""
    weights = trainer.balancer.weights()  # the weights training applies (fixed, or learned up to the checkpoint)
    params = [p for p in trainer.model.encoder.parameters() if p.requires_grad]
    trainer.model.train()
    samples: dict[str, list[tuple[float, float]]] = {}
    for i in range(batches):
        # patches from step numbers far past a 60-minute run's ~900 steps: batches the run did not train on
        losses, _ = trainer.step_losses(trainer.draw_batch(10_000 + i))
        grads = {}
        for task, loss in losses.items():
            found = torch.autograd.grad(weights[task] * loss, params, retain_graph=True, allow_unused=True)
            grads[task] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(found, params)])
        grads["sum"] = sum(grads.values())
        for task, g in grads.items():
            cos = torch.nn.functional.cosine_similarity(g, grads["segmentation"], dim=0).item()
            samples.setdefault(task, []).append((g.norm().item(), cos))
    return {task: (statistics.fmean(n for n, _ in rows), statistics.fmean(c for _, c in rows))
            for task, rows in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("dataset")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--checkpoint", default="last")
    args = parser.parse_args()
    config = Config.load(f"{args.run_dir}/config.yaml")
    with open(f"{args.run_dir}/split.json") as f:
        fold = json.load(f)["fold"]
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(args.dataset, config, scratch, fold=fold, progress=False)
        torch.manual_seed(config.training.seed)  # seeded as Trainer.fit seeds: the run's own initial weights
        np.random.seed(config.training.seed)
        random.seed(config.training.seed)
        trainer.prepare()
        rows = [("initial weights", task_gradients(trainer, args.batches))]
        trainer.restore_weights(resolve_checkpoint(f"{args.run_dir}/checkpoints/{args.checkpoint}"))
        rows.append((f"checkpoint {args.checkpoint}", task_gradients(trainer, args.batches)))
    print(f"| weights ({args.batches} batches, fold {fold}) | task | weighted gradient norm | cosine with segmentation |")
    print("|---|---|---:|---:|")
    for name, stats in rows:
        for task, (norm, cos) in stats.items():
            print(f"| {name} | {task} | {norm:.4f} | {cos:+.3f} |")


if __name__ == "__main__":
    main()
