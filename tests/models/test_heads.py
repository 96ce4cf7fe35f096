"""Segmentation and classification heads on the features of every registered encoder."""

from __future__ import annotations

import pytest
import torch

from medtriad.models.encoders import FeatureInfo, create_encoder, list_encoders
from medtriad.models.heads.classification import ClassificationHead
from medtriad.models.heads.segmentation import SegmentationHead, SegResNetDecoder, build_segmentation_head
from medtriad.models.multitask import ModelSpec, MultiTaskModel

SMALL = {"swin": {"embed_dim": 12}, "resenc": {"channels": (8, 16, 32, 64), "blocks": (1, 1, 1, 1)},
         "segresnet": {"init_filters": 8, "blocks_down": (1, 2, 1)}}


def encoder_and_input(name: str):
    torch.manual_seed(0)
    encoder = create_encoder(name, 2, **SMALL.get(name, {}))
    d = encoder.size_divisible  # the deepest map is 2x1x1 voxels, the least instance norm accepts in training
    return encoder, torch.randn(1, 2, 2 * d, d, d)


@pytest.mark.parametrize("name", list_encoders())
def test_segmentation_logits_at_input_resolution(name):
    encoder, x = encoder_and_input(name)
    head = SegmentationHead(encoder.feature_info, num_outputs=3)
    with torch.no_grad():
        logits = head(encoder(x))
    assert logits.shape == (1, 3, *x.shape[2:])


def test_segmentation_head_starts_at_the_prior():
    """The output bias is logit(prior): a fresh head says 'background' almost everywhere, not p = 0.5."""
    encoder, x = encoder_and_input("resenc")
    with torch.no_grad():
        features = encoder(x)
        for prior in (0.01, 0.5):
            head = SegmentationHead(encoder.feature_info, num_outputs=2, prior=prior)
            assert torch.allclose(head.out.conv.conv.bias, torch.logit(torch.tensor(prior)))
            median = torch.sigmoid(head(features)).median().item()
            assert prior / 3 < median < min(3 * prior, 0.7)
    with pytest.raises(ValueError, match="prior"):
        SegmentationHead(encoder.feature_info, num_outputs=2, prior=0.0)
    torch.manual_seed(0)
    default_init = SegmentationHead(encoder.feature_info, num_outputs=2, prior=None).out.conv.conv.bias
    assert default_init.abs().max() < 1 and len(set(default_init.tolist())) == 2  # PyTorch's small random bias


def test_segmentation_custom_channels_and_coarse_finest_level():
    # An encoder whose finest level has stride 2 (no full-resolution map) and decoder channels unlike its own.
    info = [FeatureInfo(6, 2), FeatureInfo(10, 4), FeatureInfo(20, 16)]
    features = [torch.randn(2, f.channels, 32 // f.stride, 32 // f.stride, 16 // f.stride) for f in info]
    head = SegmentationHead(info, num_outputs=2, decoder_channels=(4, 8))
    assert head(features).shape == (2, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="decoder_channels"):
        SegmentationHead(info, num_outputs=2, decoder_channels=(4, 8, 16))
    with pytest.raises(ValueError, match="integer factors"):
        SegmentationHead([FeatureInfo(4, 2), FeatureInfo(4, 3)], num_outputs=1)
    with pytest.raises(ValueError, match="3 feature maps"):
        head(features[1:])


def test_deep_supervision_outputs_coarser_levels_in_training_only():
    encoder, x = encoder_and_input("resenc")  # levels at strides 1, 2, 4, 8
    features = encoder(x)
    head = SegmentationHead(encoder.feature_info, num_outputs=3, prior=0.01, deep_supervision=2)
    outputs = head.forward_deep(features)
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(s // f for s in x.shape[2:]) for f in (1, 2, 4)]
    assert all(o.shape[:2] == (1, 3) for o in outputs)
    assert torch.equal(outputs[0], head(features))  # the finest is the inference output
    for out in head.deep_outs:
        assert torch.allclose(out.conv.conv.bias, torch.logit(torch.tensor(0.01)))
    for bad in (-1, 3):  # 4 levels: at most 2 coarser decoder levels
        with pytest.raises(ValueError, match="deep_supervision"):
            SegmentationHead(encoder.feature_info, num_outputs=3, deep_supervision=bad)
    assert len(SegmentationHead(encoder.feature_info, num_outputs=3).forward_deep(features)) == 1


def test_segresnet_encoder_and_decoder_are_monai_segresnet():
    """encoder segresnet + decoder segresnet is MONAI's SegResNet: its state dict loads under the same names (encode
    half into the encoder, decode half into the head) and the outputs are identical."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    reference = SegResNet(init_filters=8, in_channels=4, out_channels=3, blocks_down=(1, 2, 2, 4)).eval()
    spec = ModelSpec(encoder="segresnet", in_channels=4, channel_names=["a", "b", "c", "d"], heads=["segmentation"],
                     spacing=[2.0, 2.0, 2.0], encoder_kwargs={"init_filters": 8, "norm_features": False},
                     regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}, segmentation={"decoder": "segresnet"})
    model = MultiTaskModel(spec).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    encode = ("convInit", "down_layers")
    model.load_state_dict({("encoder." if k.startswith(encode) else "heads.segmentation.") + k: v
                           for k, v in reference.state_dict().items()})
    x = torch.randn(1, 4, 32, 16, 24)
    with torch.no_grad():
        assert torch.allclose(model(x)["segmentation"], reference(x), atol=1e-5)


def test_segresnet_decoder_prior_and_errors():
    encoder, x = encoder_and_input("segresnet")
    with torch.no_grad():
        features = encoder(x)
    head = build_segmentation_head(encoder.feature_info, 2, decoder="segresnet", prior=0.01, blocks_up=(2, 1))
    assert isinstance(head, SegResNetDecoder) and len(head.up_layers[0]) == 2
    assert torch.allclose(head.conv_final[-1].conv.bias, torch.logit(torch.tensor(0.01)))
    with torch.no_grad():
        assert head(features).shape == (1, 2, *x.shape[2:])
        assert torch.sigmoid(head(features)).median() < 0.05
    resenc = create_encoder("resenc", 2, channels=(8, 16, 48), blocks=(1, 1, 1))  # channels do not double
    with pytest.raises(ValueError, match="doubling"):
        SegResNetDecoder(resenc.feature_info, 2)
    with pytest.raises(ValueError, match="blocks_up"):
        SegResNetDecoder(encoder.feature_info, 2, blocks_up=(1,))
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_segmentation_head(encoder.feature_info, 2, decoder="unetr")
    with pytest.raises(ValueError, match=r"segresnet decoder takes no \['deep_supervision'\]"):
        build_segmentation_head(encoder.feature_info, 2, decoder="segresnet", deep_supervision=1)
    with pytest.raises(ValueError, match=r"unet decoder takes no \['blocks_up'\]"):
        build_segmentation_head(encoder.feature_info, 2, blocks_up=(1, 1))
    with pytest.raises(ValueError, match="num_groups 3"):
        SegResNetDecoder(encoder.feature_info, 2, num_groups=3)
    with pytest.raises(ValueError, match="3 feature maps"):
        head(features[1:])


def test_segmentation_head_overfits_a_blob():
    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    blob = ((grid - torch.tensor([6.0, 9.0, 8.0]).view(3, 1, 1, 1)) ** 2).sum(0) < 16
    image = blob.float()[None, None] + 0.3 * torch.randn(1, 1, 16, 16, 16)
    target = blob.float()[None, None]
    encoder = create_encoder("resenc", 1, channels=(8, 16, 32), blocks=(1, 1, 1))
    head = SegmentationHead(encoder.feature_info, num_outputs=1)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        logits = head(encoder(image))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    predicted = logits.detach()[0, 0] > 0
    dice = 2 * (predicted & blob).sum() / (predicted.sum() + blob.sum())
    assert dice > 0.7, dice


@pytest.mark.parametrize("name", list_encoders())
def test_classification_logit_shapes_and_gradients(name):
    encoder, x = encoder_and_input(name)
    head = ClassificationHead(encoder.feature_info, {"grade": 1, "subtype": 3}, hidden=16)
    logits = head(encoder(x))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"grade": (1, 1), "subtype": (1, 3)}
    (logits["grade"].sum() + logits["subtype"].pow(2).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in head.parameters())
    assert all(p.grad is not None for p in encoder.last_shared_layer().parameters())


def test_pooling_across_windows_equals_pooling_one_window():
    torch.manual_seed(0)
    info = [FeatureInfo(8, 1), FeatureInfo(16, 2)]
    head = ClassificationHead(info, {"grade": 2}, hidden=8).eval()
    left, right = torch.randn(2, 16, 2, 3, 2), torch.randn(2, 16, 3, 3, 2)
    whole = torch.cat([left, right], dim=2)  # one window holding the tokens of both
    (s_left, v_left), (s_right, v_right) = head.encode([None, left])["grade"], head.encode([None, right])["grade"]
    assert s_left.shape == (2, 12) and v_left.shape == (2, 12, 16)
    pooled = head.pool(torch.cat([s_left, s_right], 1), torch.cat([v_left, v_right], 1))
    torch.testing.assert_close(pooled, head.pool(*head.encode([None, whole])["grade"]))
    torch.testing.assert_close(head.decode("grade", pooled), head([None, whole])["grade"])
    # Averaging per-window results is not the same thing: the windows hold different amounts of attention.
    per_window_mean = (head.pool(s_left, v_left) + head.pool(s_right, v_right)) / 2
    assert not torch.allclose(pooled, per_window_mean, atol=1e-4)


def test_pool_weights_tokens_by_softmax_of_scores():
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    uniform = ClassificationHead.pool(torch.zeros(1, 3), values)
    torch.testing.assert_close(uniform, values.mean(1))
    peaked = ClassificationHead.pool(torch.tensor([[0.0, 50.0, 0.0]]), values)
    torch.testing.assert_close(peaked, values[:, 1])


def test_classification_rejects_bad_tasks():
    info = [FeatureInfo(4, 1)]
    with pytest.raises(ValueError, match="at least 1 logit"):
        ClassificationHead(info, {"grade": 0})
    with pytest.raises(ValueError, match="no-task"):
        ClassificationHead(info, {"grade": 1}).decode("no-task", torch.zeros(1, 4))
