"""MultiTaskModel: any subset of heads, one encoder pass, detection on shared features, anchors from boxes."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from medtriad.models.heads.detection import anchor_shapes_from_boxes
from medtriad.models.multitask import HEADS, ModelSpec, MultiTaskModel


def spec(heads, encoder="resenc", **kwargs) -> ModelSpec:
    encoder_kwargs = {"channels": [4, 8, 16, 16, 16]} if encoder == "resenc" else {
        "embed_dim": 12, "num_heads": [1, 1, 1, 1]}
    return ModelSpec(encoder=encoder, in_channels=4, channel_names=["FLAIR", "T1", "T1ce", "T2"], heads=list(heads),
                     spacing=[2.0, 2.0, 2.0], encoder_kwargs=encoder_kwargs,
                     regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
                     labels={"background": 0, "a": 1, "b": 2, "c": 4},
                     tasks={"grade": {"kind": "binary", "classes": ["LGG", "HGG"]},
                            "findings": {"kind": "multilabel", "classes": ["x", "y", "z"]}},
                     detection={"anchor_shapes": [[3, 3, 3], [4, 5, 4], [6, 6, 5]]}, **kwargs)


SUBSETS = [list(c) for n in (1, 2, 3) for c in itertools.combinations(HEADS, n)]


@pytest.mark.parametrize("heads", SUBSETS, ids=["+".join(h) for h in SUBSETS])
def test_any_subset_of_heads_builds_trains_and_predicts(heads):
    torch.manual_seed(0)
    model = MultiTaskModel(spec(heads))
    assert set(model.heads) == set(heads)
    x = torch.randn(2, 4, 32, 32, 32)
    targets = [{"boxes": torch.tensor([[4.0, 5, 6, 20, 22, 18]]), "labels": torch.zeros(1, dtype=torch.long)},
               {"boxes": torch.zeros((0, 6)), "labels": torch.zeros(0, dtype=torch.long)}]  # a patch with no box
    out = model(x, det_targets=targets if "detection" in heads else None)
    assert set(out) == set(heads)
    loss = 0
    if "segmentation" in heads:
        assert out["segmentation"].shape == (2, 3, 32, 32, 32)
        loss = loss + out["segmentation"].mean()
    if "classification" in heads:
        assert out["classification"]["grade"].shape == (2, 1)
        assert out["classification"]["findings"].shape == (2, 3)
        loss = loss + sum(v.mean() for v in out["classification"].values())
    if "detection" in heads:
        assert set(out["detection"]) == {"classification", "box_regression"}
        assert all(torch.isfinite(v) for v in out["detection"].values())
        loss = loss + sum(out["detection"].values())
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    model.eval()
    with torch.no_grad():
        out = model(x)
    if "detection" in heads:
        assert len(out["detection"]) == 2 and out["detection"][0]["boxes"].shape[1] == 6


@pytest.mark.parametrize("encoder", ["swin", "resenc"])
def test_every_head_reaches_the_shared_layer_gradnorm_measures(encoder):
    """The detection pyramid (strides 4-16) does not reach a stride-32 Swin encoder's deepest block: GradNorm's
    shared layer is the deepest module every head's gradient passes through, so no task's norm is always 0."""
    torch.manual_seed(0)
    model = MultiTaskModel(spec(HEADS, encoder))
    size = 2 * model.size_divisible
    out = model(torch.randn(1, 4, size, size, size),
                det_targets=[{"boxes": torch.tensor([[4.0, 5, 6, 20, 22, 18]]), "labels": torch.zeros(1).long()}])
    losses = {"segmentation": out["segmentation"].mean(), "detection": sum(out["detection"].values()),
              "classification": sum(v.mean() for v in out["classification"].values())}
    params = list(model.last_shared_layer().parameters())
    for head, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), head
    if encoder == "swin":
        assert model.deepest_levels()["detection"] < len(model.encoder.feature_info) - 1
        assert model.last_shared_layer() is model.encoder.swin.layers3


def test_encoder_runs_once_per_forward():
    model = MultiTaskModel(spec(HEADS))
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 4, 32, 32, 32))
    assert len(calls) == 1


def test_swin_encoder_feeds_all_heads():
    model = MultiTaskModel(spec(HEADS, encoder="swin"))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64, 64))
    assert out["segmentation"].shape == (1, 3, 64, 64, 64)
    assert out["classification"]["grade"].shape == (1, 1)


def test_detection_state_dict_holds_only_learned_weights():
    model = MultiTaskModel(spec(["detection"]))
    keys = list(model.state_dict())
    assert not any("detector" in k for k in keys)
    assert any(k.startswith("heads.detection.fpn") for k in keys)


def test_detection_strides_must_ascend():
    with pytest.raises(ValueError, match="ascending"):
        MultiTaskModel(dataclasses.replace(spec(["detection"]), detection={
            "anchor_shapes": [[3, 3, 3]], "strides": [16, 8, 4]}))


def test_detection_head_width_follows_fpn_channels():
    """``model.detection.fpn_channels`` (64 by default, ``brats-cpu`` 32) sets the width of the pyramid and of both
    RetinaNet heads at every level; the narrower head has fewer parameters and trains (finite losses, gradients)."""
    torch.manual_seed(0)
    base = spec(["detection"])
    wide = MultiTaskModel(base)
    narrow = MultiTaskModel(dataclasses.replace(base, detection={**base.detection, "fpn_channels": 16}))
    head = narrow.heads["detection"]
    assert {m.out_channels for m in head.fpn.modules() if isinstance(m, torch.nn.Conv3d)} == {16}
    for tower in (head.cls_head, head.reg_head):
        assert {m.in_channels for m in tower.modules() if isinstance(m, torch.nn.Conv3d)} == {16}
    count = lambda m: sum(p.numel() for p in m.heads["detection"].parameters())  # noqa: E731
    assert count(narrow) < count(wide)
    targets = [{"boxes": torch.tensor([[4.0, 5, 6, 20, 22, 18]]), "labels": torch.zeros(1, dtype=torch.long)}]
    losses = narrow(torch.randn(1, 4, 32, 32, 32), det_targets=targets)["detection"]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.cls_head.parameters())


def test_detection_anchors_follow_the_model_to_another_device():
    """MONAI caches anchors by input shape alone; after the model moves (CPU timing, then CUDA in `medtriad benchmark`)
    the cached ones sit on the old device and must be made again on the new one."""
    model = MultiTaskModel(spec(["detection"])).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        first = model(x)["detection"][0]
        detector = model.heads["detection"].detector
        detector.anchors = [a.to("meta") for a in detector.anchors]  # as if made on another device
        again = model(x)["detection"][0]
    assert all(a.device.type == "cpu" for a in detector.anchors)
    for key in ("boxes", "labels_scores"):
        torch.testing.assert_close(again[key], first[key])


def test_missing_head_requirements_are_named():
    with pytest.raises(ValueError, match="anchor_shapes"):
        MultiTaskModel(dataclasses.replace(spec(["detection"]), detection={}))
    with pytest.raises(ValueError, match="subset"):
        MultiTaskModel(spec(["boxes"]))


def test_anchor_shapes_never_exceed_the_patch_and_follow_the_boxes():
    rng = np.random.default_rng(0)
    small = rng.uniform(3, 6, size=(40, 3))
    large = rng.uniform(30, 90, size=(40, 3))  # larger than the patch along some axes
    shapes = np.array(anchor_shapes_from_boxes(np.concatenate([small, large]), (64, 64, 48), num_anchors=3,
                                               strides=(4, 8, 16)))
    assert shapes.shape == (3, 3)
    coarse = shapes * 4  # the coarsest of three levels scales the base shapes by 16 / 4
    assert np.all(coarse <= np.array([64, 64, 48]) + 1e-6)
    assert coarse.min() < 8 and coarse.max() > 40  # one cluster per size group
    # four levels (strides 2 to 16): the coarsest scales by 8, and still stays inside the patch
    four = np.array(anchor_shapes_from_boxes(np.concatenate([small, large]), (64, 64, 48), strides=(2, 4, 8, 16)))
    assert np.all(four * 8 <= np.array([64, 64, 48]) + 1e-6)
    assert (four * 8).max() == pytest.approx(coarse.max(), abs=0.1)
    with pytest.raises(ValueError, match="no boxes"):
        anchor_shapes_from_boxes(np.zeros((0, 3)), (64, 64, 64))


def test_anchors_of_small_lesions_keep_a_width_at_every_level():
    """Boxes of 2-4 voxels give base shapes under 1 voxel at the finest level; MONAI rounds half-extents to whole
    voxels, so they are floored where its anchors keep a width (a zero-width anchor matches no box, and its box
    encoding divides by zero)."""
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    sizes = np.random.default_rng(0).uniform(2, 4, size=(30, 3))
    shapes = anchor_shapes_from_boxes(sizes, (32, 32, 32), strides=(4, 8, 16))
    for scale in (1, 2, 4):  # the three pyramid levels
        anchors = AnchorGeneratorWithAnchorShape.generate_anchors_using_shape(torch.tensor(shapes) * scale)
        assert (anchors[:, 3:] - anchors[:, :3]).min() >= 2, (scale, anchors)


def test_classification_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = MultiTaskModel(spec(["classification"], classification_dropout=0.5))
    x = torch.randn(1, 4, 32, 32, 32)
    model.train()
    a, b = (model(x)["classification"]["grade"] for _ in range(2))
    assert not torch.allclose(a, b)  # a different half of the pooled vector dropped each time
    model.eval()
    with torch.no_grad():
        a, b = (model(x)["classification"]["grade"] for _ in range(2))
    torch.testing.assert_close(a, b)
    plain = MultiTaskModel(spec(["classification"])).train()
    torch.testing.assert_close(*(plain(x)["classification"]["grade"] for _ in range(2)))
