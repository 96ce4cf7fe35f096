"""Channels-last 3D memory for CPU training and inference, with instance norm that keeps it.

oneDNN's 3D convolutions on the CPU run faster on channels-last (NDHWC) tensors, so the trainer stores the model and
its batches that way. PyTorch's ``InstanceNorm3d`` does not keep that layout: it reshapes its input to
``(1, B * C, ...)``, which copies the map to contiguous memory, and the next convolution (and its backward) copies it
back. ``brats-cpu`` has an instance norm after every convolution (nnU-Net's choice), on 64^3 maps at full resolution.

Instance norm is group norm with one channel per group (Wu & He, "Group Normalization", ECCV 2018): the same mean
and biased variance over each channel's positions, the same eps and per-channel affine. PyTorch's CPU ``GroupNorm``
kernel has a channels-last path, so :func:`channels_last_for_training` replaces every ``InstanceNorm3d`` with
:class:`InstanceNormAsGroupNorm`. The parameter names and shapes (``weight``, ``bias``) stay, so checkpoints load into
either form, and the outputs agree to float rounding (tests/models/test_memory_format.py). One training step of
``brats-cpu``'s network, both forms: ``python benchmarks/instance_norm_speed.py`` (docs/benchmarks.md). The
predictor holds a model the same way on the CPU (:func:`channels_last_on_cpu`): a full BraTS case,
``python benchmarks/predict_cpu.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InstanceNormAsGroupNorm(nn.GroupNorm):
    """``InstanceNorm3d(C, eps, affine)`` without running statistics, computed as ``GroupNorm(C, C, eps, affine)``.

    Like ``InstanceNorm3d`` it refuses a map of one voxel per channel (whose instance statistics are undefined; group
    norm alone would return the bias, a constant feature), and it reads batched 5D input only.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False):
        super().__init__(num_features, num_features, eps=eps, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[2:].numel() <= 1:
            raise ValueError(f"instance norm needs a batched 3D map of more than 1 voxel per channel, got input of "
                             f"shape {tuple(x.shape)}")
        return super().forward(x)


def instance_norm_as_group_norm(norm: nn.InstanceNorm3d) -> InstanceNormAsGroupNorm:
    """The group norm computing what ``norm`` computes, sharing its parameters.

    Raises:
        ValueError: for an instance norm with running statistics (group norm has none).
    """
    if norm.track_running_stats:
        raise ValueError(f"InstanceNorm3d({norm.num_features}) tracks running statistics: it has no GroupNorm "
                         "equivalent")
    group = InstanceNormAsGroupNorm(norm.num_features, eps=norm.eps, affine=norm.affine)
    if norm.affine:
        group.weight, group.bias = norm.weight, norm.bias
    return group


def swap_instance_norms(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``InstanceNorm3d`` without running statistics inside ``module``; returns it."""
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
            setattr(module, name, instance_norm_as_group_norm(child))
        else:
            swap_instance_norms(child)
    return module


def channels_last_on_cpu(model: nn.Module) -> nn.Module:
    """``model`` as the trainer and the predictor hold it on the CPU: channels-last 3D memory, its instance norms
    replaced, in place, by :class:`InstanceNormAsGroupNorm` (same parameters, same outputs). The caller decides that
    the model runs on the CPU: both were measured there only."""
    swap_instance_norms(model)
    return model.to(memory_format=torch.channels_last_3d)


def channels_last_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in channels-last 3D memory; on the CPU its instance norms are also replaced, in place, by
    :class:`InstanceNormAsGroupNorm` (:func:`channels_last_on_cpu`). On other devices the model keeps
    ``InstanceNorm3d``: the swap was measured on the CPU only."""
    if device.type == "cpu":
        return channels_last_on_cpu(model)
    return model.to(memory_format=torch.channels_last_3d)
