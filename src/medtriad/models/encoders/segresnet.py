"""SegResNet's encoder (Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization", BrainLes 2018).

MONAI's ``SegResNet`` is the field's light baseline for BraTS: an initial 3x3x3 conv, then one stage per level, each
stage after the first opening with a stride-2 conv, followed by pre-activation residual blocks (group norm, ReLU).
This encoder is exactly its ``encode`` half, built by MONAI itself (same modules, same parameter names ``convInit``,
``down_layers``); its decoder half is ``SegResNetDecoder`` (``model.segmentation.decoder: segresnet``,
medtriad.models.heads.segmentation). Together, with one segmentation head, they are MONAI's SegResNet: the
single-task reference the issue-2 benchmark measures the multi-task recipe against (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import SegResNet
from torch import Tensor, nn

from medtriad.models.encoders.base import Encoder, FeatureInfo, register_encoder


@register_encoder("segresnet")
class SegResNetEncoder(Encoder):
    """SegResNet's encoder: ``len(blocks_down)`` levels at strides 1, 2, 4, ... with ``init_filters * 2**i`` channels.

    Its residual blocks are pre-activation (norm, act, conv, norm, act, conv, + skip), so nothing normalises a stage's
    output: the maps grow with depth and with training (on BraTS after 3 epochs the deepest map's std was ~5000, and
    the grade head's logits ~4000). SegResNet's own decoder copes (it normalises before its output conv); heads that
    read the maps directly (attention pooling, the detection FPN) do not. With ``norm_features`` (default) every
    returned map passes through group norm + ReLU, the final norm-act that pre-activation networks put before their
    heads (timm's pre-act ResNet); ``norm_features: false`` returns the raw maps, as MONAI's SegResNet decoder reads them
    (exactly MONAI's SegResNet together with ``SegResNetDecoder``; the single-task ``brats-segresnet`` recipe).

    Args:
        in_channels: image channels.
        init_filters: channels of the first level (MONAI's default 8; 16 in the issue-2 reference).
        blocks_down: residual blocks per level, fine to coarse (MONAI's default 1-2-2-4).
        num_groups: groups of the group norm.
        dropout_prob: dropout after the initial conv (SegResNet's), None for none.
        norm_features: group norm + ReLU on every returned map (see above).
    """

    def __init__(self, in_channels: int, init_filters: int = 16, blocks_down: Sequence[int] = (1, 2, 2, 4),
                 num_groups: int = 8, dropout_prob: float | None = None, norm_features: bool = True):
        super().__init__()
        if len(blocks_down) < 2 or min(blocks_down) < 1:
            raise ValueError(f"segresnet needs at least 2 levels of >= 1 block, got blocks_down={tuple(blocks_down)}")
        if init_filters % num_groups:
            raise ValueError(f"segresnet init_filters ({init_filters}) must be a multiple of num_groups ({num_groups})")
        # MONAI builds the stages; the decoder modules it also builds are dropped (blocks_up=() makes none)
        net = SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels, out_channels=1,
                        dropout_prob=dropout_prob, norm=("GROUP", {"num_groups": num_groups}),
                        blocks_down=tuple(blocks_down), blocks_up=())
        self.in_channels = in_channels
        self.convInit = net.convInit
        self.dropout = net.dropout if dropout_prob is not None else nn.Identity()
        self.down_layers = net.down_layers
        self.feature_info = [FeatureInfo(init_filters * 2**i, 2**i) for i in range(len(blocks_down))]
        self.size_divisible = self.feature_info[-1].stride
        self.feature_norms = nn.ModuleList(
            nn.Sequential(get_norm_layer(("GROUP", {"num_groups": num_groups}), 3, f.channels), nn.ReLU())
            if norm_features else nn.Identity() for f in self.feature_info)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.dropout(self.convInit(x))
        features = []
        for stage, norm in zip(self.down_layers, self.feature_norms):
            x = stage(x)
            features.append(norm(x))  # the next stage reads the raw map, as in SegResNet
        return features

    def last_shared_layer(self, level: int = -1) -> nn.Module:
        return self.down_layers[level]  # the next stage reads its raw output
