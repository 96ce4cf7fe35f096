"""Swin Transformer encoder in the SwinUNETR / MTMed3D configuration.

The encoder half of SwinUNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images", BrainLes 2021), the backbone MTMed3D (multi-task detection, segmentation and classification on
BraTS) shares between its heads. MONAI's ``SwinTransformer`` yields 5 hidden states; SwinUNETR refines four of them
with residual conv blocks (its encoder2/3/4/10) and adds a full-resolution conv block on the raw input (encoder1).
We keep exactly that, so the parameter layout matches SwinUNETR's encoder and its pretrained Swin weights apply. The
decoder half lives in the segmentation head.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import UnetrBasicBlock
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

from medtriad.models.encoders.base import Encoder, FeatureInfo, register_encoder


def _res_block(in_channels: int, out_channels: int) -> UnetrBasicBlock:
    """SwinUNETR's encoder block: two 3x3x3 convs with instance norm and a residual connection, stride 1."""
    return UnetrBasicBlock(3, in_channels, out_channels, kernel_size=3, stride=1, norm_name="instance", res_block=True)


@register_encoder("swin")
class SwinEncoder(Encoder):
    """SwinUNETR's encoder: 6 levels at strides 1, p, 2p, 4p, 8p, 16p (p = patch_size).

    Channels with the defaults (embed_dim 48): 48, 48, 96, 192, 384, 768. The stride-8p level (384 channels) is the raw
    Swin hidden state, as SwinUNETR feeds it to its decoder without a conv block.

    Args:
        in_channels: image channels (4 for BraTS).
        embed_dim: Swin embedding dimension (SwinUNETR's ``feature_size``); must be divisible by 12.
        depths: Swin blocks per stage (4 stages).
        num_heads: attention heads per stage.
        window_size: local attention window, in tokens.
        patch_size: patch-embedding size; the first Swin level has stride ``patch_size``.
        normalize: layer-normalise each hidden state before it leaves the transformer (SwinUNETR's default).
        drop_path_rate: stochastic depth rate.
        use_checkpoint: gradient checkpointing in the Swin blocks (memory for compute, for large patches).
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        normalize: bool = True,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"swin needs 4 stages, got depths={tuple(depths)} num_heads={tuple(num_heads)}")
        if embed_dim % 12:
            raise ValueError(f"swin embed_dim must be divisible by 12, got {embed_dim}")
        self.in_channels = in_channels
        self.normalize = normalize
        self.swin = SwinTransformer(
            in_chans=in_channels,
            embed_dim=embed_dim,
            window_size=(window_size,) * 3,
            patch_size=(patch_size,) * 3,
            depths=depths,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        e = embed_dim
        self.encoder1 = _res_block(in_channels, e)
        self.encoder2 = _res_block(e, e)
        self.encoder3 = _res_block(2 * e, 2 * e)
        self.encoder4 = _res_block(4 * e, 4 * e)
        self.encoder10 = _res_block(16 * e, 16 * e)
        channels = (e, e, 2 * e, 4 * e, 8 * e, 16 * e)
        strides = (1,) + tuple(patch_size * 2**i for i in range(5))
        self.feature_info = [FeatureInfo(c, s) for c, s in zip(channels, strides)]
        self.size_divisible = strides[-1]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        hidden = self.swin(x, self.normalize)  # 5 maps (B, e * 2**i, X / (p * 2**i), ...)
        return [
            self.encoder1(x),
            self.encoder2(hidden[0]),
            self.encoder3(hidden[1]),
            self.encoder4(hidden[2]),
            hidden[3],
            self.encoder10(hidden[4]),
        ]

    def last_shared_layer(self, level: int = -1) -> nn.Module:
        level = range(len(self.feature_info))[level]
        if level == 0:
            raise ValueError("swin's first level reads the input itself (encoder1): no module is shared with it")
        if level == len(self.feature_info) - 1:  # the deepest map alone: its own block
            return self.encoder10
        # level k >= 1 reads the transformer's hidden state k - 1 (the patch embedding, then its stages), which
        # every deeper level reads through the next stages
        return [self.swin.patch_embed, self.swin.layers1, self.swin.layers2, self.swin.layers3][level - 1]
