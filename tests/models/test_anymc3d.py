"""Slice2D backbone + AnyMC3D plugins: HF loading, training, multi-view, aux decoder, heatmaps, plugin files."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from medtriad.models.anymc3d import (
    Plugin,
    PluginConfig,
    PluginModel,
    aux_segmentation_loss,
    load_plugin,
    save_plugin,
    write_heatmap,
)
from medtriad.models.encoders.base import list_encoders
from medtriad.models.encoders.slice2d import (
    Slice2DEncoder,
    ViT2D,
    ViTConfig,
    load_vit,
    save_hf_vit,
    volume_to_slices,
)
from medtriad.models.heads.classification import ClassificationHead

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16)
VIT_S = dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536, patch_size=14, image_size=518)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny DINOv2 in Hugging Face format: written by transformers when installed, else by save_hf_vit."""
    folder = tmp_path_factory.mktemp("vit") / "tiny-dinov2"
    torch.manual_seed(0)
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        save_hf_vit(ViT2D(ViTConfig(**TINY)), folder)
        return folder
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                          image_size=16, layerscale_value=0.5)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def _encoder(hf_dir, **kwargs) -> Slice2DEncoder:
    return Slice2DEncoder(1, weights=hf_dir, slice_size=16, **kwargs)


def _toy_batch(n: int = 8, seed: int = 0):
    """Volumes (n, 1, 16, 12, 8): class 1 has a bright 4^3 cube somewhere, class 0 has noise only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 12, 8, generator=g) * 0.2
    y = torch.arange(n) % 2
    masks = torch.zeros(n, 1, 16, 12, 8)
    for i in range(n):
        if y[i]:
            a, b, c = (int(torch.randint(0, s - 4, (1,), generator=g)) for s in (16, 12, 8))
            x[i, 0, a:a + 4, b:b + 4, c:c + 4] += 3.0
            masks[i, 0, a:a + 4, b:b + 4, c:c + 4] = 1
    return x, y.float(), masks


def test_hf_checkpoint_loads_and_matches_transformers(hf_dir):
    vit = load_vit(hf_dir)
    assert not any(p.requires_grad for p in vit.parameters())
    transformers = pytest.importorskip("transformers")
    reference = transformers.Dinov2Model.from_pretrained(hf_dir).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # not tied to test order
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
        ours, _ = vit(x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_plain_state_dict_and_save_hf_roundtrip(tmp_path):
    torch.manual_seed(1)
    vit = ViT2D(ViTConfig(**TINY, model_type="vit", layerscale=False, layer_norm_eps=1e-12)).eval()
    torch.save(vit.state_dict(), tmp_path / "plain.pt")
    loaded = load_vit(tmp_path / "plain.pt", num_heads=2)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x)[0], vit(x)[0])
    again = load_vit(save_hf_vit(vit, tmp_path / "hf"))
    assert again.config == vit.config
    torch.testing.assert_close(again(x)[0], vit(x)[0])


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads.*model.safetensors"):
        Slice2DEncoder(1, weights=tmp_path / "dinov2-small")
    with pytest.raises(FileNotFoundError, match="weights"):
        Slice2DEncoder(1)


def test_channel_maps():
    ct = torch.tensor([-2000.0, -1000.0, 0.0, 250.0, 3000.0]).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)
    slices = volume_to_slices(ct, axis=0, channel_map="ct_windows", slice_size=None)
    assert slices.shape == (5, 3, 2, 2)
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    rgb = slices[:, :, 0, 0] * std + mean  # back to [0, 1]
    torch.testing.assert_close(rgb[2], torch.tensor([0.5, 150 / 400, 1000 / 1400]))
    torch.testing.assert_close(rgb[0], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb[4], torch.ones(3))
    mr = torch.randn(2, 4, 6, 7, 8)
    assert volume_to_slices(mr, 1, (0, 2, 3), slice_size=12).shape == (2 * 7, 3, 12, 12)
    with pytest.raises(ValueError, match="repeat"):
        volume_to_slices(mr, 1, "repeat")
    # an encoder whose channel map cannot fit its inputs is refused when built, not at its first forward pass
    with pytest.raises(ValueError, match="2 input channels needs encoder_kwargs.channel_map"):
        Slice2DEncoder(2, vit=TINY, slice_size=16)
    with pytest.raises(ValueError, match=r"3 channel indices < 4, got \[0, 1, 4\]"):
        Slice2DEncoder(4, vit=TINY, slice_size=16, channel_map=[0, 1, 4])
    with pytest.raises(ValueError, match="'ct_windows' needs one channel, got 4"):
        Slice2DEncoder(4, vit=TINY, slice_size=16, channel_map="ct_windows")
    assert Slice2DEncoder(2, vit=TINY, slice_size=16, channel_map=[0, 1, 1]).channel_map == [0, 1, 1]


def test_encoder_feeds_the_classification_head():
    encoder = Slice2DEncoder(1, vit=TINY, slice_size=16, axis=1)
    features = encoder(torch.randn(2, 1, 10, 6, 12))
    assert len(features) == 1 and features[0].shape == (2, 32, 4, 6, 4)  # slicing axis keeps one token per slice
    logits = ClassificationHead(encoder.feature_info, {"t": 3})(features)
    assert logits["t"].shape == (2, 3)
    assert "slice2d" not in list_encoders()  # frozen single-level 2D backbone: outside the registry's contract


def test_plugin_trains_and_only_plugin_gets_gradients(hf_dir):
    encoder = _encoder(hf_dir)
    torch.manual_seed(0)
    plugin = Plugin(PluginConfig("toy", adapter="lora", rank=2, alpha=4, query_dim=8), encoder)
    model = PluginModel(encoder, {"toy": plugin}).train()
    x, y, _ = _toy_batch()
    optimizer = torch.optim.Adam(plugin.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(x)["logits"]["toy"][:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is None for p in encoder.parameters())
            assert all(p.grad is not None for p in plugin.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_molre_plugin_starts_as_plain_backbone(hf_dir):
    encoder = _encoder(hf_dir)
    torch.manual_seed(0)
    molre = Plugin(PluginConfig("m", adapter="molre", rank=2, experts=3), encoder)
    plain = Plugin(PluginConfig("p", adapter="none"), encoder)
    plain.load_state_dict({k: v for k, v in molre.state_dict().items() if not k.startswith("adapters.")})
    model = PluginModel(encoder, {"m": molre, "p": plain}).eval()
    with torch.no_grad():
        out = model(_toy_batch(2)[0])
    torch.testing.assert_close(out["logits"]["m"], out["logits"]["p"])
    assert molre.parameter_counts()["router"] > 0


def test_multiview_aux_decoder_and_shared_passes(hf_dir):
    encoder = _encoder(hf_dir, max_slices=6)
    torch.manual_seed(0)
    plugins = {
        "mv": Plugin(PluginConfig("mv", num_outputs=3, views=("axial", "coronal", "sagittal"), aux_channels=1,
                                  rank=2), encoder),
        "a": Plugin(PluginConfig("a", rank=0), encoder),
        "b": Plugin(PluginConfig("b", adapter="none", views=("axial", "sagittal")), encoder),
    }
    model = PluginModel(encoder, plugins).train()
    x, _, masks = _toy_batch(2)
    out = model(x)
    assert out["logits"]["mv"].shape == (2, 3)
    torch.testing.assert_close(out["view_weights"]["mv"].sum(1), torch.ones(2))
    for view, weights in out["slice_weights"]["mv"].items():
        assert weights.shape == (2, len(out["slice_indices"][view])) and len(out["slice_indices"][view]) <= 6
        torch.testing.assert_close(weights.sum(1), torch.ones(2))
    # 3 LoRA views for "mv"; "a" and "b" share the plain axial pass, "b" adds the plain sagittal one
    assert model.backbone_passes == 3 + 2
    assert out["aux"]["mv"].shape == (2, 1, 16, 12, 8) and "a" not in out["aux"]
    loss = aux_segmentation_loss(out["aux"]["mv"], masks, [True, False]) + out["logits"]["mv"].sum()
    loss.backward()
    assert plugins["mv"].aux_decoder.net[0].weight.grad is not None
    assert aux_segmentation_loss(out["aux"]["mv"], masks, [False, False]).item() == 0.0
    model.eval()
    assert "aux" not in model(x)  # dropped at inference


def test_heatmap_geometry(hf_dir, tmp_path):
    encoder = _encoder(hf_dir, max_slices=5)
    model = PluginModel(encoder, {"t": Plugin(PluginConfig("t", views=("axial", "coronal"), rank=2), encoder)})
    x = _toy_batch(1)[0]
    heat = model.heatmap(x, "t")
    assert heat.shape == (1, 16, 12, 8) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    affine = np.array([[-1.5, 0, 0, 20], [0, 1.5, 0, -30], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    write_heatmap(tmp_path / "heat.nii.gz", heat[0], affine)
    image = nib.load(tmp_path / "heat.nii.gz")
    assert image.shape == (16, 12, 8)
    np.testing.assert_allclose(image.affine, affine)


def test_saved_plugin_reloads_on_fresh_backbone(hf_dir, tmp_path):
    encoder = _encoder(hf_dir)
    torch.manual_seed(0)
    plugin = Plugin(PluginConfig("t", adapter="molre", rank=2, experts=2, views=("axial", "sagittal"),
                                 aux_channels=2), encoder)
    for p in plugin.parameters():  # as if trained: adapters no longer zero
        torch.nn.init.normal_(p, std=0.05)
    x = _toy_batch(2)[0]
    with torch.no_grad():
        expected = PluginModel(encoder, {"t": plugin}).eval()(x)["logits"]["t"]
    path = save_plugin(plugin, tmp_path / "t.safetensors")
    assert path.stat().st_size < 5e6
    fresh = _encoder(hf_dir)
    loaded = load_plugin(path, fresh)
    assert loaded.aux_decoder is None and loaded.config.views == ("axial", "sagittal")
    with torch.no_grad():
        got = PluginModel(fresh, {"t": loaded}).eval()(x)["logits"]["t"]
    torch.testing.assert_close(got, expected)
    other = Slice2DEncoder(1, vit={**TINY, "hidden_size": 16}, slice_size=16)
    with pytest.raises(ValueError, match="backbone"):
        load_plugin(path, other)


@pytest.mark.parametrize("config", [
    PluginConfig("lora", rank=8),
    PluginConfig("lora3", rank=8, views=("axial", "coronal", "sagittal")),
    PluginConfig("molre", adapter="molre", rank=4, experts=4),
])
def test_vit_s_plugin_has_under_1_5m_parameters(config):
    with torch.device("meta"):  # ViT-S shapes without allocating it
        encoder = Slice2DEncoder(1, vit=VIT_S)
        plugin = Plugin(dataclasses.replace(config, aux_channels=3), encoder)
    counts = plugin.parameter_counts()
    assert counts["inference"] <= 1_500_000, counts
    assert counts["total"] == plugin.num_trainable()
    assert 0 < counts["aux_decoder"] < 100_000
