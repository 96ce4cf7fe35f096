"""Channels-last training memory: instance norm replaced by the equal group norm; same outputs, gradients, weights."""

import copy

import pytest
import torch
from torch import nn

from medtriad.models.memory_format import (
    InstanceNormAsGroupNorm,
    channels_last_for_training,
    instance_norm_as_group_norm,
    swap_instance_norms,
)
from medtriad.models.multitask import ModelSpec, MultiTaskModel

CHANNELS_LAST = torch.channels_last_3d


def _spec(encoder: str) -> ModelSpec:
    encoder_kwargs = {"channels": [4, 8, 16, 16, 16]} if encoder == "resenc" else {"embed_dim": 12,
                                                                                  "num_heads": [1, 1, 1, 1]}
    return ModelSpec(encoder=encoder, in_channels=4, channel_names=["FLAIR", "T1", "T1ce", "T2"],
                     heads=["segmentation", "classification"], spacing=[2.0, 2.0, 2.0], encoder_kwargs=encoder_kwargs,
                     regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
                     tasks={"grade": {"kind": "binary", "classes": ["LGG", "HGG"]}})


@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_computes_instance_norm(affine):
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(6, eps=0.5, affine=affine)  # eps far from the default: a dropped eps would show
    if affine:  # parameters away from their 1 / 0 start, so that carrying them over is tested
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    reference = copy.deepcopy(norm)  # its own parameters: their gradients are compared below
    group = instance_norm_as_group_norm(norm)
    # small per-channel spread, so that eps weighs on the result
    x = (torch.randn(2, 6, 5, 7, 4) * 0.5 + torch.arange(6.0).view(1, 6, 1, 1, 1)).requires_grad_()
    x_last = x.detach().contiguous(memory_format=CHANNELS_LAST).requires_grad_()
    expected, found = reference(x), group(x_last)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
    assert found.is_contiguous(memory_format=CHANNELS_LAST)  # the point of the swap: no copy back to contiguous
    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (found * weight).sum().backward()
    torch.testing.assert_close(x_last.grad, x.grad, atol=1e-5, rtol=1e-5)
    assert x_last.grad.is_contiguous(memory_format=CHANNELS_LAST)
    if affine:
        assert group.weight is norm.weight and group.bias is norm.bias
        # sums over 140 positions of terms of either sign: float32 rounding, summed in another order, reaches 1e-4
        torch.testing.assert_close(group.weight.grad, reference.weight.grad, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(group.bias.grad, reference.bias.grad, atol=2e-4, rtol=1e-4)


def test_refuses_what_instance_norm_refuses():
    with pytest.raises(ValueError, match="tracks running statistics"):
        instance_norm_as_group_norm(nn.InstanceNorm3d(4, track_running_stats=True))
    group = InstanceNormAsGroupNorm(4)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nn.InstanceNorm3d(4)(torch.randn(2, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="more than 1 voxel"):  # group norm alone would return a constant
        group(torch.randn(2, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="batched 3D map"):
        group(torch.randn(4, 3, 3, 3))


@pytest.mark.parametrize("encoder", ["resenc", "swin"])
def test_swapped_model_matches_the_built_one_and_loads_its_weights(encoder):
    torch.manual_seed(0)
    built = MultiTaskModel(_spec(encoder))
    assert any(isinstance(m, nn.InstanceNorm3d) for m in built.modules())
    swapped = channels_last_for_training(copy.deepcopy(built), torch.device("cpu"))
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in swapped.modules())
    # the same parameter names and shapes: checkpoints of either form load into the other
    assert {k: v.shape for k, v in swapped.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    built.load_state_dict(swapped.state_dict())
    size = 64 if encoder == "swin" else 32  # swin's deepest map at 32^3 is 1 voxel: no instance statistics
    x = torch.randn(1, 4, size, size, size)
    with torch.no_grad():  # instance statistics are the input's own in training and in eval alike
        expected, found = built(x), swapped(x.contiguous(memory_format=CHANNELS_LAST))
    torch.testing.assert_close(found["segmentation"], expected["segmentation"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found["classification"], expected["classification"], atol=1e-4, rtol=1e-4)


def test_other_devices_keep_instance_norm():
    model = MultiTaskModel(_spec("resenc"))
    channels_last_for_training(model, torch.device("cuda"))  # no move: .to(memory_format=...) keeps the device
    assert any(isinstance(m, nn.InstanceNorm3d) for m in model.modules())
    assert not any(isinstance(m, InstanceNormAsGroupNorm) for m in model.modules())


def test_swap_reaches_nested_modules_and_leaves_other_norms():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Sequential(nn.InstanceNorm3d(4), nn.BatchNorm3d(4)),
                          nn.InstanceNorm3d(4, track_running_stats=True))
    swap_instance_norms(model)
    assert isinstance(model[1][0], InstanceNormAsGroupNorm) and model[1][0].num_groups == 4
    assert isinstance(model[1][1], nn.BatchNorm3d)
    assert isinstance(model[2], nn.InstanceNorm3d)  # with running statistics: no group-norm equivalent, kept
