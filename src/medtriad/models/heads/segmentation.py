"""Segmentation head: a U-Net decoder over the shared encoder's features.

The decoder walks from the coarsest level back to the finest, each step one MONAI ``UnetUpBlock`` (transposed conv to
the next finer level, concatenation with that level's features, two conv-norm-act layers) as in DynUNet / nnU-Net
(Isensee et al., Nature Methods 2021). With the swin encoder and default channels this is SwinUNETR's decoder with
plain instead of residual conv blocks. The output is one logit map per region (sigmoid, not softmax: BraTS regions
WT/TC/ET nest inside each other). Optional deep supervision (nnU-Net's): during training, coarser decoder levels emit
their own logits too (``forward_deep``), scored against downsampled targets; inference reads the finest only.

``SegResNetDecoder`` is the other decoder (``model.segmentation.decoder: segresnet``): MONAI SegResNet's decoder half
(1x1x1 conv + trilinear upsampling, skip added, pre-activation residual blocks, norm-act-conv output); over the
``segresnet`` encoder the model is MONAI's SegResNet, module for module. :func:`build_segmentation_head` picks one.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

from monai.networks.blocks import UnetOutBlock, UnetUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.networks.nets import SegResNet
from torch import Tensor, nn

from medtriad.models.encoders.base import FeatureInfo

_NORM = "instance"


class SegmentationHead(nn.Module):
    """U-Net decoder: features (fine -> coarse) -> logits (B, num_outputs, X, Y, Z) at the input resolution.

    Args:
        feature_info: the encoder's levels (channels, stride), fine to coarse.
        num_outputs: logit channels, one per region in dataset.json's order.
        decoder_channels: output channels of the up block that lands on each level, for every level but the coarsest
            (fine to coarse, ``len(feature_info) - 1`` entries). Defaults to the encoder's channels of those levels;
            where they differ, the level's skip features are projected by a 1x1x1 conv before concatenation.
        prior: the probability every region starts at. The output bias is set to ``logit(prior)``, RetinaNet's prior
            initialisation (Lin et al., ICCV 2017): a lesion fills a few per cent of a patch, and a head starting at
            p = 0.5 spends hundreds of steps lowering the background. On the demo's synthetic data PyTorch's default
            (near-zero) bias left the background at p ~ 0.46 after 150 steps (soft Dice loss on WT 0.93); with
            ``logit(0.01)`` that loss was 0.56 (docs/benchmarks.md, issue 3). ``None`` keeps PyTorch's default
            initialisation (a small random bias).
        deep_supervision: how many decoder levels coarser than the finest also get an output layer (a 1x1x1 conv,
            same prior), read by ``forward_deep`` for the training loss (nnU-Net, Isensee et al. 2021); at most the
            number of levels minus 2. 0 = none. Inference never uses them.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_outputs: int,
                 decoder_channels: Sequence[int] | None = None, prior: float | None = 0.01, deep_supervision: int = 0):
        super().__init__()
        info = list(feature_info)
        if len(info) < 2:
            raise ValueError(f"SegmentationHead needs at least 2 feature levels, got {len(info)}")
        if decoder_channels is None:
            decoder_channels = [f.channels for f in info[:-1]]
        if len(decoder_channels) != len(info) - 1:
            raise ValueError(f"decoder_channels needs {len(info) - 1} entries (one per level but the coarsest), "
                             f"got {tuple(decoder_channels)}")
        self.num_levels = len(info)
        self.skips = nn.ModuleList()
        self.ups = nn.ModuleList()
        previous = info[-1].channels
        for level in reversed(range(len(info) - 1)):  # coarse -> fine; module lists are ordered the same way
            factor, remainder = divmod(info[level + 1].stride, info[level].stride)
            if remainder or factor < 2:
                raise ValueError(f"feature strides must grow by integer factors, got {info[level].stride} -> "
                                 f"{info[level + 1].stride}")
            out = decoder_channels[level]
            skip_channels = info[level].channels
            self.skips.append(nn.Identity() if skip_channels == out
                              else get_conv_layer(3, skip_channels, out, kernel_size=1, conv_only=True))
            self.ups.append(UnetUpBlock(3, previous, out, kernel_size=3, stride=1, upsample_kernel_size=factor,
                                        norm_name=_NORM))
            previous = out
        finest = info[0].stride
        self.final_up = (nn.Identity() if finest == 1 else
                         get_conv_layer(3, previous, previous, kernel_size=finest, stride=finest, conv_only=True,
                                        is_transposed=True))
        self.out = UnetOutBlock(3, previous, num_outputs)
        if not 0 <= deep_supervision <= len(info) - 2:
            raise ValueError(f"deep_supervision must be in [0, {len(info) - 2}] for {len(info)} feature levels, "
                             f"got {deep_supervision}")
        self.deep_supervision = deep_supervision
        # deep_outs[i] reads the decoder's output on level i + 1 (fine to coarse)
        self.deep_outs = nn.ModuleList(UnetOutBlock(3, decoder_channels[level], num_outputs)
                                       for level in range(1, deep_supervision + 1))
        if prior is not None:
            for out in [self.out, *self.deep_outs]:
                _set_prior(out.conv.conv.bias, prior)

    def _decode(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The up blocks' outputs, one per level but the coarsest, fine to coarse."""
        if len(features) != self.num_levels:
            raise ValueError(f"SegmentationHead expects {self.num_levels} feature maps, got {len(features)}")
        x, levels = features[-1], []
        for skip, up, feature in zip(self.skips, self.ups, reversed(features[:-1])):
            x = up(x, skip(feature))
            levels.insert(0, x)
        return levels

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: one map per encoder level, fine to coarse -> logits (B, num_outputs, X, Y, Z)."""
        return self.out(self.final_up(self._decode(features)[0]))

    def forward_deep(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Training with deep supervision: ``[forward(features)]`` followed by the logits of the next
        ``deep_supervision`` coarser decoder levels (each at its level's resolution), fine to coarse."""
        levels = self._decode(features)
        return [self.out(self.final_up(levels[0]))] + [out(x) for out, x in zip(self.deep_outs, levels[1:])]


class SegResNetDecoder(nn.Module):
    """MONAI SegResNet's decoder (Myronenko, BrainLes 2018) over any encoder whose channels double per level.

    From the coarsest level to the finest, each step reduces the channels to the next finer level's with a 1x1x1 conv,
    upsamples (``upsample_mode``, MONAI's; trilinear by default), adds that level's features and runs ``blocks_up``
    pre-activation residual blocks; the output is group norm, ReLU and a 1x1x1 conv to one logit per region. MONAI
    builds the modules (a ``SegResNet`` whose decoder half is kept), under MONAI's names (``up_samples``,
    ``up_layers``, ``conv_final``), so a SegResNet state dict loads into the ``segresnet`` encoder plus this head.

    Args:
        feature_info: the encoder's levels, fine to coarse: strides 1, 2, 4, ... and channels doubling per level.
        num_outputs: logit channels, one per region.
        blocks_up: residual blocks per decoder step, coarse to fine (MONAI's order; default one per step).
        num_groups: groups of the group norm (must divide the finest level's channels).
        upsample_mode: "nontrainable" (trilinear), "deconv" or "pixelshuffle".
        prior: starting probability of every region (bias ``logit(prior)``), None for PyTorch's default.
    """

    deep_supervision = 0  # MultiTaskModel and the trainer ask; SegResNet has no deep supervision

    def __init__(self, feature_info: Sequence[FeatureInfo], num_outputs: int, blocks_up: Sequence[int] | None = None,
                 num_groups: int = 8, upsample_mode: str = "nontrainable", prior: float | None = 0.01):
        super().__init__()
        info = list(feature_info)
        if len(info) < 2 or any(f.stride != 2**i or f.channels != info[0].channels * 2**i for i, f in enumerate(info)):
            raise ValueError("the segresnet decoder needs at least 2 levels with strides 1, 2, 4, ... and channels "
                             "doubling per level; got " + ", ".join(f"{f.channels}@{f.stride}" for f in info))
        blocks_up = [1] * (len(info) - 1) if blocks_up is None else list(blocks_up)
        if len(blocks_up) != len(info) - 1 or min(blocks_up) < 1:
            raise ValueError(f"blocks_up needs {len(info) - 1} entries >= 1 (one per decoder step), got {blocks_up}")
        if info[0].channels % num_groups:
            raise ValueError(f"num_groups {num_groups} does not divide the finest level's {info[0].channels} channels")
        net = SegResNet(spatial_dims=3, init_filters=info[0].channels, out_channels=num_outputs, blocks_down=(1,),
                        blocks_up=tuple(blocks_up), norm=("GROUP", {"num_groups": num_groups}),
                        upsample_mode=upsample_mode)
        self.num_levels = len(info)
        self.up_samples, self.up_layers, self.conv_final = net.up_samples, net.up_layers, net.conv_final
        if prior is not None:
            _set_prior(self.conv_final[-1].conv.bias, prior)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: one map per encoder level, fine to coarse -> logits (B, num_outputs, X, Y, Z)."""
        if len(features) != self.num_levels:
            raise ValueError(f"SegResNetDecoder expects {self.num_levels} feature maps, got {len(features)}")
        x = features[-1]
        for up, layer, skip in zip(self.up_samples, self.up_layers, reversed(features[:-1])):  # SegResNet.decode
            x = layer(up(x) + skip)
        return self.conv_final(x)


DECODERS = {"unet": SegmentationHead, "segresnet": SegResNetDecoder}


def build_segmentation_head(feature_info: Sequence[FeatureInfo], num_outputs: int, decoder: str = "unet",
                            **kwargs) -> nn.Module:
    """The segmentation head ``model.segmentation`` describes: ``decoder`` "unet" (:class:`SegmentationHead`, the
    default) or "segresnet" (:class:`SegResNetDecoder`); the other keys go to its constructor, and a key it does not
    take is a ValueError naming the keys it does."""
    if decoder not in DECODERS:
        raise ValueError(f"model.segmentation.decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
    head = DECODERS[decoder]
    known = set(inspect.signature(head).parameters) - {"feature_info", "num_outputs"}
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(f"model.segmentation: the {decoder} decoder takes no {sorted(unknown)}; it takes "
                         f"{sorted(known | {'decoder'})}")
    return head(feature_info, num_outputs, **kwargs)


def _set_prior(bias: Tensor, prior: float) -> None:
    """Set an output layer's bias to ``logit(prior)`` (RetinaNet's prior initialisation)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be a probability in (0, 1) or None, got {prior}")
    nn.init.constant_(bias, math.log(prior / (1.0 - prior)))
