"""Mixed precision: which dtype, if any, ``torch.autocast`` runs the forward pass in, for training
(``training.precision``) and for inference (``inference.precision``).

* ``auto`` (training's default): bfloat16 autocast on CUDA, float32 on the CPU. A GPU without native bfloat16
  (before Ampere, e.g. V100, T4) autocasts to float16 instead, and training scales the loss with PyTorch's
  GradScaler, as float16's narrow range needs.
* ``bf16``: bfloat16 autocast on CUDA (float16 on a GPU without native bfloat16, with a warning) and on CPUs with
  native bfloat16 instructions (AVX512-BF16 or AMX: AMD Zen 4, Intel Cooper Lake / Sapphire Rapids and later), where
  oneDNN's bfloat16 3D convolutions take about half the time of float32 ones (docs/benchmarks.md). A CPU without
  them would emulate bfloat16, slower than float32, which under a time budget means fewer steps: there it stays in
  float32 and says so once.
* ``fp32`` (inference's default: predictions as exact as the weights allow): no autocast anywhere.

Weights, optimiser state and losses stay float32 in every case (autocast's mixed precision); outputs are cast back to
float32 before losses, probabilities and boxes. Two parts run in float32 under autocast, because bfloat16 weight
gradients of 3D convolutions on maps of a few voxels came out NaN or as 1e30 garbage on the CPU: the detection head
(medtriad.models.heads.detection) and resenc stages on maps of at most 27 voxels (medtriad.models.encoders.resenc);
the trainer skips any step whose gradient norm is still not finite (medtriad.training.trainer).
"""

from __future__ import annotations

import warnings

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bfloat16 arithmetic natively (AVX512-BF16 or AMX tiles)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def cuda_has_native_bf16(device: torch.device | None = None) -> bool:
    """Whether the GPU ``device`` (default: the current one) executes bfloat16 natively (compute capability 8.0,
    Ampere, or later; ROCm GPUs)."""
    if not torch.cuda.is_available():
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(precision: str, device: torch.device, setting: str = "training.precision") -> torch.dtype | None:
    """The dtype the forward pass autocasts to on ``device`` under ``precision``; ``None`` = float32 throughout.
    ``setting`` names the config key in messages."""
    if precision not in PRECISIONS:
        raise ValueError(f"{setting} must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return torch.bfloat16
        if precision == "bf16":
            warnings.warn(f"{setting} bf16: this GPU has no native bfloat16 (it predates Ampere); autocasting to "
                          "float16 instead", stacklevel=2)
        return torch.float16
    if precision == "auto":
        return None
    if not cpu_has_native_bf16():
        warnings.warn(f"{setting} bf16: this CPU has no native bfloat16 instructions (AVX512-BF16 / AMX), "
                      "where bfloat16 would be slower than float32; running in float32", stacklevel=2)
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device`` (an :func:`autocast_dtype` answer); ``None``: a no-op context."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
