"""One CPU training step of the `brats-cpu` network with instance norm as PyTorch's InstanceNorm3d and as the equal
GroupNorm (one channel per group) that the trainer swaps in (medtriad.models.memory_format), in channels-last memory.

The network is brats-cpu's encoder (resenc 16-32-64-128-256, blocks 1-2-3-4-4, instance norm) and U-Net decoder
(8-16-32-64, instance norm) with its segmentation output (3 regions), on a batch of 2 random 4-channel 64^3 patches,
as the trainer feeds it. A step is forward, binary cross-entropy against a fixed random target, backward and AdamW;
timings are medians of repeated, interleaved steps after two warm-up steps. The two forms start from the same
weights; the script also prints the largest difference between their logits.

Usage: python benchmarks/instance_norm_speed.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from medtriad.benchmark import brats_model_spec, variant_specs
from medtriad.config import Config
from medtriad.models.memory_format import channels_last_for_training
from medtriad.models.multitask import build_model


def _step_times(models: dict[str, torch.nn.Module], batch: torch.Tensor, target: torch.Tensor,
                repeats: int) -> dict[str, float]:
    """Median seconds of one forward + backward + AdamW step of each model, the models' steps interleaved (so that
    neither gets the quieter moments), after two warm-up steps each."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(repeats + 2):
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(batch)["segmentation"]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Config.load("brats-cpu")
    spec = variant_specs(brats_model_spec(recipe))["seg"]  # the segmentation-only brats-cpu model
    torch.manual_seed(0)
    channels_last = torch.channels_last_3d
    instance = build_model(spec).to(memory_format=channels_last)  # as the trainer held it before
    group = channels_last_for_training(copy.deepcopy(instance), torch.device("cpu"))  # as the trainer holds it now
    batch = torch.randn(recipe.training.batch_size, 4, *recipe.data.patch_size).contiguous(memory_format=channels_last)
    target = (torch.rand(recipe.training.batch_size, 3, *recipe.data.patch_size) > 0.9).float()
    with torch.no_grad():
        diff = (instance(batch)["segmentation"] - group(batch)["segmentation"]).abs().max().item()
    print(f"threads {args.threads}, batch {recipe.training.batch_size} x 4 x {recipe.data.patch_size}; "
          f"largest logit difference between the two forms {diff:.2e}")
    found = _step_times({"InstanceNorm3d": instance, "GroupNorm, one channel per group": group}, batch, target,
                        args.repeats)
    for name, seconds in found.items():
        print(f"training step, {name}, channels-last: {seconds:.2f} s")
    print(f"speed-up {found['InstanceNorm3d'] / found['GroupNorm, one channel per group']:.2f}x")


if __name__ == "__main__":
    main()
