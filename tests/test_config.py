"""Config: packaged recipes, overrides, YAML round trip, clear errors."""

import pytest

from medtriad.config import Config, list_recipes


def test_packaged_recipes_load_and_round_trip(tmp_path):
    assert {"brats-cpu", "brats-segresnet", "brats-swin", "demo-cpu", "demo-quick", "tiny"} <= set(list_recipes())
    for name in list_recipes():
        config = Config.load(name)
        config.save(tmp_path / f"{name}.yaml")
        assert Config.load(tmp_path / f"{name}.yaml") == config
    swin = Config.load("brats-swin")
    assert swin.model.encoder == "swin" and tuple(swin.data.patch_size) == (96, 96, 96)


def test_overrides_and_types():
    config = Config.load("brats-cpu", {"training.epochs": 3, "data.patch_size": [32, 32, 32]})
    assert config.training.epochs == 3
    assert config.data.patch_size == (32, 32, 32)
    assert Config.load().model.heads == ("segmentation", "detection", "classification")
    # one entry of a mapping field; the recipe's other entries stay
    nested = Config.load("brats-cpu", {"model.segmentation.deep_supervision": 2})
    assert nested.model.segmentation == {"decoder_channels": [8, 16, 32, 64], "prior": 0.01, "deep_supervision": 2}
    for bad in ("training.epochs.x", "epochs", "model..prior"):
        with pytest.raises(ValueError, match="override"):
            Config.load("brats-cpu", {bad: 1})


def test_unknown_keys_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="epochz"):
        Config.load("tiny", {"training.epochz": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainin:\n  epochs: 3\n")
    with pytest.raises(ValueError, match="trainin"):
        Config.load(bad)
    with pytest.raises(ValueError, match="no-such-recipe"):
        Config.load("no-such-recipe")


def test_bad_mirror_axes_fail_when_the_config_is_read():
    assert Config.load("brats-swin").inference.mirror_axes == (0, 1, 2)
    for bad in ([3], [0, 0]):
        with pytest.raises(ValueError, match="mirror_axes"):
            Config.load("tiny", {"inference.mirror_axes": bad})


def test_box_selection_is_an_inference_setting_not_a_model_one():
    """The predictor sets the detection head's score threshold, NMS and box count from ``inference`` at every call,
    so the same keys under ``model.detection`` would do nothing: refused, pointing to the right key."""
    for key, value in [("score_threshold", 0.2), ("nms_threshold", 0.3), ("max_detections", 5)]:
        with pytest.raises(ValueError, match=f"set inference.{key} instead"):
            Config.load(None, {f"model.detection.{key}": value})
        assert getattr(Config.load(None, {f"inference.{key}": value}).inference, key) == value


def test_bad_ema_and_augmentation_settings_fail_when_the_config_is_read():
    assert Config.load("tiny", {"training.ema_decay": 0.99}).training.ema_decay == 0.99
    for bad in (1.0, -0.1, None, True, "0.9"):  # None: `--set training.ema_decay=null` (was a TypeError)
        with pytest.raises(ValueError, match="ema_decay"):
            Config.load("tiny", {"training.ema_decay": bad})
    assert Config.load("medmnist-cnn").data.zoom_prob == 0.0
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="zoom_prob"):
            Config.load("tiny", {"data.zoom_prob": bad})
    assert Config.load("tiny", {"data.intensity_augmentation": "strong"}).data.intensity_augmentation == "strong"
    with pytest.raises(ValueError, match="intensity_augmentation"):
        Config.load("tiny", {"data.intensity_augmentation": "heavy"})
    with pytest.raises(ValueError, match="normalization: none"):
        Config.load("tiny", {"data.intensity_augmentation": "strong", "data.normalization": "none"})
    planes = [[0, 1], [0, 2], [1, 2]]
    assert Config.load("tiny", {"data.rotation_planes": planes}).data.rotation_planes == tuple(planes)
    for bad in ([[0, 0]], [[0, 3]], [0, 1], [[0, 1, 2]]):
        with pytest.raises(ValueError, match="rotation_planes"):
            Config.load("tiny", {"data.rotation_planes": bad})
    with pytest.raises(ValueError, match="square"):
        Config.load("tiny", {"data.patch_size": [32, 32, 16], "data.rotation_planes": [[1, 2]]})
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="classification_dropout"):
            Config.load("tiny", {"model.classification_dropout": bad})


def test_a_setting_of_the_wrong_kind_is_refused_naming_its_key():
    # each of these failed later with a TypeError or a numpy error from deep inside training
    for key, bad, kind in [("training.max_minutes", None, "a number"), ("training.learning_rate", "fast", "a number"),
                           ("training.batch_size", "abc", "an integer"), ("training.batch_size", 2.5, "an integer"),
                           ("training.epochs", True, "an integer"), ("training.precision", 16, "a string"),
                           ("model.radial_coordinate", "yes", "true or false")]:
        with pytest.raises(ValueError, match=f"{key} must be {kind}"):
            Config.load("tiny", {key: bad})
    cfg = Config.load("tiny", {"training.max_minutes": 5, "training.learning_rate": 1e-3})  # an int where a float is
    assert cfg.training.max_minutes == 5 and cfg.training.learning_rate == 1e-3


def test_yaml_reads_floats_in_e_notation_and_names_bad_yaml(tmp_path):
    """PyYAML alone reads ``1e-4`` as a string (YAML 1.1 wants ``1.0e-4``); a config written as most people write
    floats is read as numbers. A YAML syntax error, a section that is not a mapping or a scalar where a list belongs
    is a ValueError naming the file or key, not a traceback from inside a library."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training:\n  learning_rate: 3e-4\n  weight_decay: 1E-5\n  max_minutes: 1.5e1\n")
    config = Config.load(recipe)
    assert config.training.learning_rate == 3e-4 and config.training.weight_decay == 1e-5
    assert config.training.max_minutes == 15.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n\tepochs: 3\n")  # a tab
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        Config.load(bad)
    bad.write_text("data: 5\n")
    with pytest.raises(ValueError, match="section 'data' must be a mapping"):
        Config.load(bad)
    bad.write_text("- data\n")
    with pytest.raises(ValueError, match="a mapping of sections"):
        Config.load(bad)
    for key, value in [("data.spacing", 2), ("inference.mirror_axes", 0), ("inference.roi_size", 96),
                       ("data.rotation_planes", 5)]:
        with pytest.raises(ValueError, match=f"{key} must be a list"):
            Config.load("tiny", {key: value})
    with pytest.raises(ValueError, match="model.encoder_kwargs must be a mapping"):
        Config.load("tiny", {"model.encoder_kwargs": 5})
    for key in ("data.spacing", "data.patch_size", "model.heads"):
        with pytest.raises(ValueError, match=f"{key} cannot be null"):
            Config.load("tiny", {key: None})
    assert Config.load("tiny", {"inference.roi_size": None}).inference.roi_size is None  # null means "whole volume"


def test_spacing_and_patch_size_are_three_positive_values():
    assert Config.load("tiny", {"data.spacing": [1, 1.5, 2]}).data.spacing == (1, 1.5, 2)
    for key, bad in [("data.spacing", [0, 2, 2]), ("data.spacing", [2, 2]), ("data.spacing", [-1, 2, 2]),
                     ("data.spacing", [2, 2, float("nan")]), ("data.patch_size", [64, 64]),
                     ("data.patch_size", [64, 64, 0]), ("data.patch_size", [64, 64, 63.5])]:
        with pytest.raises(ValueError, match=f"{key} must be 3 positive"):
            Config.load("tiny", {key: bad})
