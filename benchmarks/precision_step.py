"""What bfloat16 autocast (``training.precision: bf16``) buys a CPU training step.

One forward + backward + AdamW step of the `brats-cpu` multi-task model (resenc 16-256, segmentation, detection and
grade heads; batch 2 of 4 x 64^3 patches, one tumour box each) and of the `medmnist-cnn` classifier (batch 32 of
1 x 32^3), in float32 and under ``torch.autocast("cpu", torch.bfloat16)`` as the trainer runs it. Medians of repeated
steps after two warm-up steps, on --threads threads. Says whether the CPU has native bfloat16 (AVX512-BF16 / AMX):
without it ``training.precision: bf16`` trains in float32 anyway.

Usage: python benchmarks/precision_step.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medtriad.benchmark import brats_model_spec
from medtriad.config import Config
from medtriad.models.memory_format import channels_last_for_training
from medtriad.models.multitask import ModelSpec, build_model
from medtriad.precision import autocast, cpu_has_native_bf16


def _step_s(model: torch.nn.Module, batch: torch.Tensor, kwargs: dict, dtype: torch.dtype | None,
            repeats: int) -> float:
    """Median seconds of one forward + backward + AdamW step (two warm-up steps first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            out = model(batch, **kwargs)
        loss = sum(v.float().mean() for v in out.get("classification", {}).values())
        if "segmentation" in out:
            loss = loss + out["segmentation"].float().sigmoid().mean()
        if "detection" in out:
            loss = loss + sum(v.float() for v in out["detection"].values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _models() -> dict[str, tuple[torch.nn.Module, torch.Tensor, dict]]:
    torch.manual_seed(0)
    brats = Config.load("brats-cpu")
    multi = build_model(brats_model_spec(brats)).train()
    x = torch.randn(brats.training.batch_size, 4, *brats.data.patch_size)
    box = {"boxes": torch.tensor([[12.0, 14.0, 16.0, 34.0, 36.0, 30.0]]), "labels": torch.zeros(1, dtype=torch.long)}
    out = {"brats-cpu (batch 2, 4 x 64^3)": (multi, x, {"det_targets": [dict(box) for _ in range(len(x))]})}
    mnist = Config.load("medmnist-cnn")
    spec = ModelSpec(encoder=mnist.model.encoder, in_channels=1, channel_names=["image"], heads=["classification"],
                     spacing=list(mnist.data.spacing), encoder_kwargs=dict(mnist.model.encoder_kwargs),
                     tasks={"vessel": {"kind": "binary", "classes": ["healthy", "aneurysm"]}},
                     classification_hidden=mnist.model.classification_hidden)
    cnn = build_model(spec).train()
    out[f"medmnist-cnn (batch {mnist.training.batch_size}, 1 x 32^3)"] = (
        cnn, torch.randn(mnist.training.batch_size, 1, *mnist.data.patch_size), {})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; native bfloat16 on this CPU: {cpu_has_native_bf16()}")
    for name, (model, x, kwargs) in _models().items():
        model = channels_last_for_training(model, torch.device("cpu"))  # as the trainer holds it
        x = x.contiguous(memory_format=torch.channels_last_3d)
        fp32 = _step_s(model, x, kwargs, None, args.repeats)
        bf16 = _step_s(model, x, kwargs, torch.bfloat16, args.repeats)
        print(f"{name}: float32 {fp32:.2f} s, bf16 autocast {bf16:.2f} s per step ({fp32 / bf16:.2f}x)")


if __name__ == "__main__":
    main()
