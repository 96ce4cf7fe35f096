"""Radial coordinate input (CoordConv, Liu et al., NeurIPS 2018, in a form that keeps flip and rotation symmetries).

A convolutional encoder followed by attention pooling is nearly translation invariant: it sees *what* is in a volume,
hardly *where*. For whole-volume classification of centred crops (MedMNIST's shape masks, lesion-centred patches)
the distance from the centre is itself a cue: the finding sits at the centre, the context around it.
``WithRadialCoordinate`` gives any encoder one extra input channel, each voxel's distance from the centre of the
input window, normalised to 1 at the window's corners. The map is unchanged by flips and by 90-degree rotations of a
cubic window, so it agrees with the training augmentation and with test-time mirroring. With sliding windows the
centre is that of each window.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medtriad.models.encoders.base import Encoder


def radial_map(shape: tuple[int, ...], device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(X, Y, Z) -> each voxel's distance from the centre, in half-sizes per axis, divided by sqrt(3): 0 at the
    centre, 1 at the corners."""
    axes = [(torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2) / (n / 2) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids) / len(shape))


class WithRadialCoordinate(Encoder):
    """``encoder`` (built for ``in_channels + 1`` channels) reading the image plus its :func:`radial_map`."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.in_channels = encoder.in_channels - 1
        self.feature_info = encoder.feature_info
        self.size_divisible = encoder.size_divisible

    def forward_features(self, x: Tensor) -> list[Tensor]:
        radial = radial_map(tuple(x.shape[2:]), x.device, x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        return self.encoder(torch.cat([x, radial], dim=1))

    def last_shared_layer(self, level: int = -1) -> nn.Module:
        return self.encoder.last_shared_layer(level)
