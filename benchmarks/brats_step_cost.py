"""What the multi-task recipe's extra heads cost per training step, against its segmentation-only variant.

Issue 5: in the hour's budget `brats-cpu` (three heads, 64-channel detection head) made about 15 % fewer steps than
its single-task segmentation variant (the same encoder, decoder and settings, one head). This times each part of one
training step, as `Trainer.fit` runs it, for both on the same batches (by step number) of real BraTS cases: drawing
and augmenting the batch, the forward pass split into the encoder and each head (forward hooks; the detection head's
time includes its loss, anchor matching and all, which RetinaNet computes inside its forward pass), the losses, the
backward pass, and the optimiser's part (gradient clipping, AdamW, the weight EMA). Medians over --batches steps after
one warm-up step; the two models take turns step by step, so a change in the machine's load falls on both. Not timed:
what an epoch adds (two checkpoints, the progress plot) and validation.

Usage: python benchmarks/brats_step_cost.py DATASET [--config brats-cpu] [--fold 0] [--threads 2] [--batches 10]
           [--set SECTION.KEY=VALUE ...]   (overrides for the multi-task model only, e.g. a lighter detection head)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from medtriad.config import Config, parse_overrides
from medtriad.training.trainer import Trainer

VARIANTS = {"multi-task": {}, "segmentation only": {"model.heads": ["segmentation"],
                                                     "training.loss_weights": {"segmentation": 1.0}}}


def _timed_parts(trainer: Trainer) -> dict[str, list[float]]:
    """Forward hooks that add each module's forward time to a list per part (encoder, each head)."""
    times: dict[str, list[float]] = defaultdict(list)
    seg = trainer.model.heads["segmentation"] if "segmentation" in trainer.model.heads else None
    if seg is not None and seg.deep_supervision:
        raise SystemExit("deep supervision calls the segmentation head's forward_deep, which the hooks do not see")
    parts = {"encoder": trainer.model.encoder, **{f"head {h}": m for h, m in trainer.model.heads.items()}}
    for name, module in parts.items():
        def before(_module, _args, name=name):
            times[f"_start {name}"].append(time.perf_counter())

        def after(_module, _args, _out, name=name):
            times[name].append(time.perf_counter() - times[f"_start {name}"].pop())

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    return times


def one_step(trainer: Trainer, step: int, parts: dict[str, list[float]]) -> dict[str, float]:
    """Seconds of each part of training step ``step``: the body of ``Trainer.fit``'s loop, one micro-batch, fp32."""
    for k in list(parts):
        parts[k].clear()
    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    batch = trainer.draw_batch(step)
    t1 = time.perf_counter()
    losses, tail = trainer.step_losses(batch)
    total = (trainer.balancer(losses) if losses else 0.0) + tail
    t2 = time.perf_counter()
    total.backward()
    t3 = time.perf_counter()
    trainer.apply_gradients()
    t4 = time.perf_counter()
    row = {"draw + augment": t1 - t0, "forward + losses": t2 - t1}
    row.update({f"of which {name}": sum(v) for name, v in parts.items() if not name.startswith("_")})
    row.update({"backward": t3 - t2, "clip + AdamW + EMA": t4 - t3, "step": t4 - t0})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--config", default="brats-cpu")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], help="override for the multi-task model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = parse_overrides(args.set)
    variants = {" ".join(["multi-task", *args.set]): {**VARIANTS["multi-task"], **extra},
                "segmentation only": VARIANTS["segmentation only"]}
    trainers, parts, rows = {}, {}, {name: defaultdict(list) for name in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in variants.items():
            config = Config.load(args.config, overrides)
            torch.manual_seed(config.training.seed)  # as fit seeds before prepare
            np.random.seed(config.training.seed)
            random.seed(config.training.seed)
            trainers[name] = Trainer(args.dataset, config, tempfile.mkdtemp(dir=scratch), fold=args.fold,
                                     device="cpu", progress=False)
            trainers[name].prepare()  # sets no thread count (fit does): the figures run on --threads
            trainers[name].model.train()
            parts[name] = _timed_parts(trainers[name])
        for step in range(args.batches + 1):  # the variants take turns, step by step; step 0 is a warm-up
            for name, trainer in trainers.items():
                row = one_step(trainer, step, parts[name])
                for k, v in row.items():
                    if step:
                        rows[name][k].append(v)
    results = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    names = list(results)
    print(f"| {args.config}, fold {args.fold}, {args.threads} threads, median s of {args.batches} steps | "
          + " | ".join(names) + " | difference |")
    print("|---|" + "---:|" * (len(names) + 1))
    for key in keys:
        values = [results[n].get(key) for n in names]
        diff = (values[0] or 0.0) - (values[1] or 0.0)
        print(f"| {key} | " + " | ".join("" if v is None else f"{v:.3f}" for v in values) + f" | {diff:+.3f} |")
    multi, single = (results[n]["step"] for n in names)
    print(f"\n(each row its own median: the rows do not add up to the step's.) Training steps alone, without the "
          f"epochs' checkpoints and plots: {3600 / multi:.0f} against {3600 / single:.0f} an hour "
          f"({multi / single - 1:+.0%} time per step)")


if __name__ == "__main__":
    main()
