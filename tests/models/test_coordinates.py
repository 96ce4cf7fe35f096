"""The radial coordinate channel: a position cue that keeps the flip and rotation symmetries."""

import json

import pytest
import torch

from medtriad.config import Config, InferenceConfig
from medtriad.inference.predictor import Predictor
from medtriad.models.encoders.coordinates import WithRadialCoordinate, radial_map
from medtriad.models.multitask import ModelSpec, MultiTaskModel


def _spec(**kwargs) -> ModelSpec:
    return ModelSpec(encoder="resenc", in_channels=2, channel_names=["a", "b"], heads=["classification"],
                     spacing=[1.0, 1.0, 1.0], encoder_kwargs={"channels": [4, 8, 8, 8, 8], "norm": "batch"},
                     tasks={"t": {"kind": "binary", "classes": ["no", "yes"]}}, **kwargs)


def test_radial_map_grows_from_the_centre_and_ignores_flips_and_quarter_turns():
    r = radial_map((8, 8, 8))
    assert 0 < float(r.min()) and float(r.max()) < 1
    assert float(r[3, 3, 3]) == float(r.min()) and float(r[0, 0, 0]) == float(r.max())
    assert float(r[3, 3, 0]) > float(r[3, 3, 2]) > float(r[3, 3, 3])
    for axis in range(3):
        assert torch.equal(torch.flip(r, [axis]), r)
    assert torch.equal(torch.rot90(r, 1, (0, 1)), r)
    box = radial_map((9, 7, 5))  # odd sizes: the centre voxel sits at 0
    assert float(box[4, 3, 2]) == 0.0 and float(box.min()) == 0.0
    for axis in range(3):
        assert torch.equal(torch.flip(box, [axis]), box)


def test_radial_model_feeds_the_map_as_one_more_channel():
    model = MultiTaskModel(_spec(radial_coordinate=True)).eval()
    assert isinstance(model.encoder, WithRadialCoordinate) and model.encoder.in_channels == 2
    seen = {}
    model.encoder.encoder.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(1, 2, 16, 16, 16)
    model(x)
    assert seen["x"].shape == (1, 3, 16, 16, 16)
    torch.testing.assert_close(seen["x"][0, :2], x[0])
    torch.testing.assert_close(seen["x"][0, 2], radial_map((16, 16, 16)))
    with pytest.raises(ValueError, match=r"expects input \(B, 2"):
        model(torch.randn(1, 3, 16, 16, 16))


def test_mirrored_radial_model_stays_flip_invariant():
    """The map is the same for every mirrored copy, so mirroring all axes still gives a flipped scan the scan's own
    class probability (an x-coordinate channel would break this)."""
    torch.manual_seed(0)
    model = MultiTaskModel(_spec(radial_coordinate=True)).eval()
    predictor = Predictor(model, InferenceConfig(mirror_axes=(0, 1, 2)), "cpu")
    image = torch.randn(2, 28, 12, 14)
    reference = predictor.predict_grid(image).class_probs["t"]
    for axis in range(3):
        flipped = predictor.predict_grid(torch.flip(image, [axis + 1])).class_probs["t"]
        torch.testing.assert_close(flipped, reference, atol=1e-5, rtol=1e-4)


def test_radial_coordinate_round_trips_through_the_spec_and_the_config(tmp_path):
    model = MultiTaskModel(_spec(radial_coordinate=True)).eval()
    _spec(radial_coordinate=True).save(tmp_path / "model.json")
    rebuilt = MultiTaskModel(ModelSpec.load(tmp_path / "model.json")).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["classification"]["t"], model(x)["classification"]["t"])
    older = json.loads((tmp_path / "model.json").read_text())
    del older["radial_coordinate"]  # a model.json written before the option existed
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert ModelSpec.load(tmp_path / "older.json").radial_coordinate is False
    assert Config.load("tiny", {"model.radial_coordinate": True}).model.radial_coordinate
    with pytest.raises(ValueError, match="radial_coordinate"):
        Config.load("tiny", {"model.radial_coordinate": "yes"})
    with pytest.raises(ValueError, match="radial_coordinate"):
        Config.load("medmnist-slice2d", {"model.radial_coordinate": True})
