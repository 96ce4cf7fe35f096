"""Every registered encoder honours the encoder interface (timm style: a new encoder is tested once registered)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medtriad.models.encoders import Encoder, FeatureInfo, create_encoder, list_encoders, register_encoder

# Small configurations keep the CPU tests fast; encoders not listed are tested with their defaults.
SMALL = {"swin": {"embed_dim": 12}, "resenc": {"channels": (8, 16, 32, 64), "blocks": (1, 1, 2, 1)},
         "segresnet": {"init_filters": 8, "blocks_down": (1, 2, 1)}}
IN_CHANNELS = 4


def small_encoder(name: str) -> Encoder:
    torch.manual_seed(0)
    return create_encoder(name, IN_CHANNELS, **SMALL.get(name, {}))


def small_input(encoder: Encoder) -> torch.Tensor:
    # The deepest map is 2x1x1 voxels: the least instance norm accepts in training, and non-cubic on purpose.
    d = encoder.size_divisible
    return torch.randn(1, IN_CHANNELS, 2 * d, d, d)


def test_swin_resenc_and_segresnet_are_registered():
    assert {"swin", "resenc", "segresnet"} <= set(list_encoders())


@pytest.mark.parametrize("name", list_encoders())
def test_features_match_feature_info(name):
    encoder = small_encoder(name)
    info = encoder.feature_info
    strides = [f.stride for f in info]
    assert info[0].stride in (1, 2)
    assert all(a < b for a, b in zip(strides, strides[1:]))
    assert encoder.size_divisible % strides[-1] == 0
    x = small_input(encoder)
    with torch.no_grad():
        features = encoder(x)
    assert len(features) == len(info)
    for feature, level in zip(features, info):
        assert tuple(feature.shape) == (1, level.channels, *(s // level.stride for s in x.shape[2:]))


@pytest.mark.parametrize("name", list_encoders())
def test_backward_reaches_every_parameter(name):
    encoder = small_encoder(name)
    features = encoder(small_input(encoder))
    # Random projections: a plain sum or mean of instance-normalised maps would give near-zero gradients.
    loss = sum((f * torch.randn_like(f)).sum() for f in features)
    loss.backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())
    zero = [n for n, p in encoder.named_parameters() if p.grad.abs().max() == 0]
    assert not zero, f"{name}: all-zero gradient for {zero[:5]}"


@pytest.mark.parametrize("name", list_encoders())
def test_rejects_wrong_size_and_channels(name):
    encoder = small_encoder(name)
    side = 2 * encoder.size_divisible
    with pytest.raises(ValueError, match=str(encoder.size_divisible)):
        encoder(torch.zeros(1, IN_CHANNELS, side, side, side + 1))
    with pytest.raises(ValueError, match="expects input"):
        encoder(torch.zeros(1, IN_CHANNELS + 1, side, side, side))


@pytest.mark.parametrize("name", list_encoders())
def test_last_shared_layer_is_a_trainable_submodule(name):
    encoder = small_encoder(name)
    layer = encoder.last_shared_layer()
    assert any(layer is m for m in encoder.modules())
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("name", list_encoders())
def test_last_shared_layer_of_a_level_is_upstream_of_it_and_every_deeper_level(name):
    """``last_shared_layer(k)``: the feature maps of level k and of every deeper level get a gradient through it,
    and it is the deepest such module (level k - 1 does not depend on it)."""
    encoder = small_encoder(name)
    features = encoder(small_input(encoder))
    for level in range(len(features)):
        try:
            layer = encoder.last_shared_layer(level)
        except ValueError:  # no module shared with this level (swin's first level reads the input itself)
            assert level == 0
            continue
        params = [p for p in layer.parameters() if p.requires_grad]
        for k in range(len(features)):  # a random projection: a plain sum of a normalised map has no gradient
            projection = (features[k] * torch.randn_like(features[k])).sum()
            grads = torch.autograd.grad(projection, params, retain_graph=True, allow_unused=True)
            reaches = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reaches == (k >= level), (level, k)


def test_unknown_name_lists_known_encoders():
    with pytest.raises(ValueError, match="resenc.*swin"):
        create_encoder("no-such-encoder", 4)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("swin")(Encoder)
    assert type(create_encoder("swin", 1, embed_dim=12)).__name__ == "SwinEncoder"


def test_default_swin_matches_swinunetr_encoder():
    encoder = create_encoder("swin", 4)
    reference = SwinUNETR(in_channels=4, out_channels=3, feature_size=48)
    encoder_part = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
    expected = sum(p.numel() for name in encoder_part for p in getattr(reference, name).parameters())
    count = sum(p.numel() for p in encoder.parameters())
    print(f"swin encoder parameters: {count:,} (SwinUNETR-48 total: "
          f"{sum(p.numel() for p in reference.parameters()):,})")
    assert count == expected
    assert [(f.channels, f.stride) for f in encoder.feature_info] == [
        (48, 1), (48, 2), (96, 4), (192, 8), (384, 16), (768, 32)]
    assert encoder.size_divisible == 32


def test_resenc_defaults_and_configuration():
    default = create_encoder("resenc", 1)
    assert default.feature_info == [FeatureInfo(c, s) for c, s in zip((16, 32, 64, 128, 256), (1, 2, 4, 8, 16))]
    assert default.size_divisible == 16
    assert [len(stage) for stage in default.stages] == [1, 1, 2, 2, 2]
    small = create_encoder("resenc", 1, channels=(4, 8, 12), blocks=(1, 2, 3))
    assert small.feature_info == [FeatureInfo(4, 1), FeatureInfo(8, 2), FeatureInfo(12, 4)]
    assert small.size_divisible == 4
    with pytest.raises(ValueError, match="blocks"):
        create_encoder("resenc", 1, channels=(4, 8), blocks=(1,))


def test_resenc_runs_stages_with_tiny_maps_in_float32_under_bf16_autocast():
    # bfloat16 weight gradients of 3x3x3 convolutions on 2^3 maps went wrong on the CPU (NaN / 1e30 now and then):
    # under autocast, a stage whose output holds <= 27 voxels runs in float32, the others in bfloat16
    encoder = create_encoder("resenc", 1, channels=(4, 8, 16, 32, 64), blocks=(1, 1, 1, 1, 1), norm="batch").train()
    with torch.autocast("cpu", torch.bfloat16):
        small = encoder.forward_features(torch.randn(2, 1, 32, 32, 32))  # deepest 2^3
        large = encoder.forward_features(torch.randn(2, 1, 64, 64, 64))  # deepest 4^3
        odd = encoder.forward_features(torch.randn(2, 1, 48, 48, 32))  # deepest 3 x 3 x 2
    assert [f.shape[2:] for f in small][-1] == (2, 2, 2)
    assert [f.dtype for f in small] == [torch.bfloat16] * 4 + [torch.float32]
    assert [f.dtype for f in large] == [torch.bfloat16] * 5
    assert [f.dtype for f in odd] == [torch.bfloat16] * 4 + [torch.float32]
    small[-1].float().square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert [f.dtype for f in encoder.forward_features(torch.randn(2, 1, 32, 32, 32))] == [torch.float32] * 5  # no autocast


def test_segresnet_normalises_the_maps_it_hands_to_heads():
    """Pre-activation blocks leave a stage's output unnormalised: raw maps scale with the input (and grew to std ~5000
    in BraTS training, wrecking the grade head), the default normalised maps do not."""
    torch.manual_seed(0)
    x = 1000 * torch.randn(1, IN_CHANNELS, 16, 16, 16)
    normed = create_encoder("segresnet", IN_CHANNELS, init_filters=8, blocks_down=(1, 2, 2))
    raw = create_encoder("segresnet", IN_CHANNELS, init_filters=8, blocks_down=(1, 2, 2), norm_features=False)
    raw.load_state_dict(normed.state_dict(), strict=False)  # same convolutions; raw has no feature norms
    with torch.no_grad():
        assert all(f.abs().max() < 20 and f.min() >= 0 for f in normed(x))
        assert all(f.abs().max() > 100 for f in raw(x))
