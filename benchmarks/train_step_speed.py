"""Where a CPU training step's time goes: MONAI augmentation per patch, and one forward + backward + AdamW step, each
with MetaTensors (MONAI's default) and with plain tensors (what the trainer uses since the twelfth session).

The model and patches are those of the `medmnist-cnn` recipe (resenc 8-16-32-64-128 with batch norm, binary
classification head, 32^3 patches, batch 32, rotations in all three planes). Timings are medians of repeated runs
after warm-up, on as many threads as --threads says.

Usage: python benchmarks/train_step_speed.py [--threads 1] [--repeats 7] [--patches 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medtriad.config import Config
from medtriad.data.transforms import training_transforms
from medtriad.models.multitask import ModelSpec, build_model


def _augmentation_ms(compose, patches: int) -> float:
    """Mean milliseconds per patch of ``compose`` on a box-shaped binary object in a 32^3 volume."""
    shape = torch.zeros((1, 32, 32, 32))
    shape[0, 8:22, 10:20, 12:18] = 1
    data = {"image": shape, "regions": shape.to(torch.uint8), "instances": shape.to(torch.int32)[0][None],
            "foreground": shape > 0}
    start = time.perf_counter()
    for seed in range(patches):
        compose.set_random_state(seed=seed)
        compose(dict(data))
    return (time.perf_counter() - start) / patches * 1000


def _step_s(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward + AdamW step on ``batch`` (two warm-up steps first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        logits = model(batch)["classification"]["vessel"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.zeros_like(logits.float()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--patches", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Config.load("medmnist-cnn")
    def augmentation():
        return training_transforms(recipe.data.patch_size, recipe.data.foreground_ratio, recipe.data.zoom_prob,
                                   rotation_planes=[(0, 1), (0, 2), (1, 2)])

    plain, tracked = augmentation(), Compose(augmentation().transforms)  # separate objects: separate random streams
    print(f"threads {args.threads}")
    print(f"augmentation per patch: MetaTensor {_augmentation_ms(tracked, args.patches):.1f} ms, "
          f"plain {_augmentation_ms(plain, args.patches):.1f} ms")
    spec = ModelSpec(encoder=recipe.model.encoder, in_channels=1, channel_names=["image"], heads=["classification"],
                     spacing=list(recipe.data.spacing), encoder_kwargs=dict(recipe.model.encoder_kwargs),
                     tasks={"vessel": {"kind": "binary", "classes": ["healthy", "aneurysm"]}},
                     classification_hidden=recipe.model.classification_hidden)
    torch.manual_seed(0)
    model = build_model(spec).to(memory_format=torch.channels_last_3d)
    batch = torch.randn(recipe.training.batch_size, 1, *recipe.data.patch_size)
    batch = batch.contiguous(memory_format=torch.channels_last_3d)
    meta, flat = _step_s(model, MetaTensor(batch), args.repeats), _step_s(model, batch, args.repeats)
    print(f"training step, batch {recipe.training.batch_size}: MetaTensor {meta:.2f} s, plain {flat:.2f} s "
          f"({meta / flat:.2f}x)")


if __name__ == "__main__":
    main()
