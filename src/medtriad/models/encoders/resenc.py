"""Residual CNN encoder in the style of nnU-Net's ResEnc (Isensee et al., "nnU-Net Revisited", MICCAI 2024).

The CPU-friendly default: convolutions only, small channel counts, and 5 levels instead of Swin's 6. A stem conv at
full resolution, then one stage per level; every stage after the first halves the resolution with a strided residual
block and adds more residual blocks (MONAI's ``UnetResBlock``: conv-norm-act-conv-norm + skip, instance norm, leaky
ReLU, as in nnU-Net).

Under bfloat16 autocast a stage whose output map holds at most ``TINY_MAP_VOXELS`` voxels (the deepest stage of a
32^3 input: 2^3) runs in float32: on the CPU, oneDNN's bfloat16 weight gradient of a 3x3x3 convolution on a 2^3 map
is now and then NaN or garbage of 1e30 (``benchmarks/bf16_conv_nonfinite.py``, docs/benchmarks.md); on such a map
float32 costs next to nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetResBlock
from torch import Tensor, nn

from medtriad.models.encoders.base import Encoder, FeatureInfo, register_encoder

_NORMS = {"instance": ("instance", {"affine": True}), "batch": ("batch", {})}
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
TINY_MAP_VOXELS = 27  # 3^3: 2^3 maps are where bfloat16 weight gradients went wrong; 4^3 measured clean


def _res_block(in_channels: int, out_channels: int, stride: int, norm: tuple) -> UnetResBlock:
    return UnetResBlock(3, in_channels, out_channels, kernel_size=3, stride=stride, norm_name=norm, act_name=_ACT)


@register_encoder("resenc")
class ResEncEncoder(Encoder):
    """Residual encoder with one level per stage, at strides 1, 2, 4, ... 2**(len(channels) - 1).

    Args:
        in_channels: image channels.
        channels: output channels of each stage (= of each feature level), fine to coarse.
        blocks: residual blocks per stage; the first block of every stage but the first has stride 2.
        norm: "instance" (nnU-Net's choice for segmentation patches) or "batch". Instance norm re-centres every
            channel over the positions of a map, which at a 2x2x2 deepest level erases the per-channel means a
            classifier of whole small volumes (MedMNIST, 28^3) reads: use "batch" there.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 2, 2, 2),
        norm: str = "instance",
    ):
        super().__init__()
        if len(channels) != len(blocks) or not channels or min(blocks) < 1:
            raise ValueError(f"resenc needs one block count >= 1 per stage, got channels={tuple(channels)} "
                             f"blocks={tuple(blocks)}")
        if norm not in _NORMS:
            raise ValueError(f"resenc norm must be one of {sorted(_NORMS)}, got {norm!r}")
        self.in_channels = in_channels
        self.stem = Convolution(3, in_channels, channels[0], kernel_size=3, norm=_NORMS[norm], act=_ACT, bias=False)
        self.stages = nn.ModuleList()
        previous = channels[0]
        for i, (c, n) in enumerate(zip(channels, blocks)):
            stage = [_res_block(previous, c, 1 if i == 0 else 2, _NORMS[norm])]
            stage += [_res_block(c, c, 1, _NORMS[norm]) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*stage))
            previous = c
        self.feature_info = [FeatureInfo(c, 2**i) for i, c in enumerate(channels)]
        self.size_divisible = self.feature_info[-1].stride

    def forward_features(self, x: Tensor) -> list[Tensor]:
        features = []
        size = x.shape[2:]
        x = self.stem(x)
        for stage, info in zip(self.stages, self.feature_info):
            if (torch.is_autocast_enabled(x.device.type)
                    and math.prod(-(-s // info.stride) for s in size) <= TINY_MAP_VOXELS):  # the stage's output map
                with torch.autocast(x.device.type, enabled=False):
                    x = stage(x.float())
            else:
                x = stage(x)
            features.append(x)
        return features

    def last_shared_layer(self, level: int = -1) -> nn.Module:
        return self.stages[level]  # every deeper stage reads this one's output
