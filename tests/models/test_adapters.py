"""LoRA / MoLRE adapters: identity at initialisation, gradients to adapters only, router weights, state helpers."""

import pytest
import torch
from torch import nn

from medtriad.models.adapters import (
    LoRAConv,
    LoRALinear,
    MoLRELinear,
    adapter_state_dict,
    count_parameters,
    inject_adapters,
    load_adapter_state_dict,
    use_adapters,
)
from medtriad.models.encoders.slice2d import ViT2D, ViTConfig

TINY = ViTConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16)


def _vit() -> ViT2D:
    torch.manual_seed(0)
    return ViT2D(TINY).eval()


@pytest.mark.parametrize("kind", ["lora", "molre"])
def test_adapters_leave_outputs_unchanged_at_init(kind):
    vit = _vit()
    x = torch.randn(3, 3, 16, 16)
    before, _ = vit(x)
    keys = set(vit.state_dict())
    adapters = inject_adapters(vit, kind, rank=4, alpha=8, experts=3)
    assert set(vit.state_dict()) == keys  # hosts keep the backbone's keys
    assert len(adapters) == 2 * 4 + 1  # q, k, v, out per block + patch embedding
    with use_adapters(vit, adapters):
        during, _ = vit(x)
    after, _ = vit(x)
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("kind", ["lora", "molre"])
def test_only_adapters_receive_gradients(kind):
    vit = _vit()
    adapters = inject_adapters(vit, kind, rank=2, experts=2)
    with use_adapters(vit, adapters):
        tokens, _ = vit(torch.randn(2, 3, 16, 16))
    tokens.square().mean().backward()
    assert all(p.grad is None for p in vit.parameters())
    grads = [p.grad for p in adapters.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # B gets a gradient even though it starts at zero


def test_adapters_change_outputs_once_trained():
    vit = _vit()
    adapters = inject_adapters(vit, "lora", rank=2)
    for p in adapters.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 3, 16, 16)
    with use_adapters(vit, adapters):
        adapted, _ = vit(x)
    plain, _ = vit(x)
    assert not torch.allclose(adapted, plain)


def test_router_weights_sum_to_one():
    layer = MoLRELinear(32, 16, rank=2, experts=5)
    x = torch.randn(4, 7, 32)
    gates = layer.gates(x)
    assert gates.shape == (4, 7, 5)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 7))
    layer(x)
    torch.testing.assert_close(layer.last_gates, gates)


def test_lora_shapes_and_counts():
    lora = LoRALinear(32, 48, rank=4)
    assert lora(torch.randn(5, 32)).shape == (5, 48)
    assert count_parameters(lora) == 4 * (32 + 48)
    conv = LoRAConv(nn.Conv2d(3, 32, 4, 4), rank=2)
    assert conv(torch.randn(1, 3, 16, 16)).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(4, 4, rank=0)


def test_none_kind_and_bad_kind():
    vit = _vit()
    assert len(inject_adapters(vit, "none")) == 0
    assert len(inject_adapters(vit, "lora", rank=0)) == 0
    with pytest.raises(ValueError, match="kind"):
        inject_adapters(vit, "dora")


def test_adapter_state_roundtrip():
    vit = _vit()
    adapters = inject_adapters(vit, "molre", rank=2, experts=2)
    for p in adapters.parameters():
        nn.init.normal_(p)
    state = adapter_state_dict(adapters)
    fresh_vit = _vit()
    fresh = inject_adapters(fresh_vit, "molre", rank=2, experts=2)
    load_adapter_state_dict(fresh, state)
    x = torch.randn(1, 3, 16, 16)
    with use_adapters(vit, adapters):
        a, _ = vit(x)
    with use_adapters(fresh_vit, fresh):
        b, _ = fresh_vit(x)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(fresh, {})
