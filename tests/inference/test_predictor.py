"""Predictor: geometry round trips, label decoding, windows, boxes in world coordinates, the predict command."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medtriad.cli import main
from medtriad.config import InferenceConfig
from medtriad.data.boxes import boxes_from_instances, instances_from_mask, voxel_box_to_grid, voxel_box_to_world
from medtriad.data.layout import load_dataset
from medtriad.data.transforms import make_geometry, pad_to, read_channels
from medtriad.inference.predictor import (GridOutput, Predictor, decode_labels, gate_by_boxes, keep_largest_components,
                                          unflip_boxes, window_copies)
from medtriad.inference.run import discover_cases, predict_folder
from medtriad.models.multitask import ModelSpec, MultiTaskModel

REGIONS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}


def test_decode_labels_follows_the_brats_cascade():
    probs = np.array([[0.1, 0.1, 0.1],  # nothing
                      [0.9, 0.1, 0.1],  # WT only -> edema
                      [0.9, 0.8, 0.2],  # WT+TC -> necrosis
                      [0.9, 0.8, 0.9],  # all -> enhancing
                      [0.4, 0.9, 0.9]],  # WT unsure, TC/ET confident -> still enhancing (likelihood, no hard cascade)
                     dtype=np.float32).T[:, :, None, None]
    assert decode_labels(probs, REGIONS, LABELS)[:, 0, 0].tolist() == [0, 2, 1, 4, 4]


def test_decode_threshold_moves_each_region_decision_point():
    rng = np.random.default_rng(0)
    probs = rng.random((1, 20, 20, 4)).astype(np.float32)
    for t in (0.2, 0.5, 0.7):
        mask = decode_labels(probs, {"lesion": [1]}, {"lesion": 1}, threshold=t)
        np.testing.assert_array_equal(mask == 1, probs[0] > t)
    nested = np.array([[0.4, 0.25, 0.05]], dtype=np.float32).T[:, :, None, None]  # WT, TC, ET probabilities
    assert decode_labels(nested, REGIONS, LABELS)[0, 0, 0] == 0
    assert decode_labels(nested, REGIONS, LABELS, threshold=0.3)[0, 0, 0] == 2  # WT only
    assert decode_labels(nested, REGIONS, LABELS, threshold=0.2)[0, 0, 0] == 1  # WT and TC
    with pytest.raises(ValueError, match="threshold"):
        decode_labels(nested, REGIONS, LABELS, threshold=1.0)


def test_decode_threshold_per_region_moves_only_that_region():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 12, 12, 6)).astype(np.float32)  # WT, TC, ET
    base = decode_labels(probs, REGIONS, LABELS)
    low_et = decode_labels(probs, REGIONS, LABELS, threshold={"ET": 0.3})
    # a named region with 0.5 is the default; an empty mapping too
    np.testing.assert_array_equal(decode_labels(probs, REGIONS, LABELS, threshold={"ET": 0.5}), base)
    np.testing.assert_array_equal(decode_labels(probs, REGIONS, LABELS, threshold={}), base)
    # a lower ET threshold only turns voxels into enhancing tumour: every other voxel keeps its label
    changed = low_et != base
    assert changed.any() and (low_et[changed] == 4).all()
    # only where ET counts as present at the new threshold (its likelihood ratio p / 0.3 beats (1 - p) / 0.7)
    assert (probs[2][changed] > 0.3).all()
    # a lone region under a mapping behaves as the plain threshold
    single = rng.random((1, 10, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(decode_labels(single, {"lesion": [1]}, {"lesion": 1}, {"lesion": 0.7}) == 1,
                                  single[0] > 0.7)
    with pytest.raises(ValueError, match="unknown region"):
        decode_labels(probs, REGIONS, LABELS, threshold={"XT": 0.3})
    with pytest.raises(ValueError, match="threshold"):
        decode_labels(probs, REGIONS, LABELS, threshold={"ET": 0.0})


def test_inference_config_checks_segmentation_threshold():
    from medtriad.config import InferenceConfig
    assert InferenceConfig(segmentation_threshold={"ET": 0.4}).segmentation_threshold == {"ET": 0.4}
    for bad in (1.5, 0, {"ET": 1.0}, {"ET": "high"}, True):
        with pytest.raises(ValueError, match="segmentation_threshold"):
            InferenceConfig(segmentation_threshold=bad)


def _blob_model(spec_kwargs=None) -> Predictor:
    """A model whose segmentation output is a fixed function of the FLAIR intensity (bright = tumour), so that
    geometry can be tested without training: logits = 20 * (flair - 1) for every region."""
    spec = ModelSpec(encoder="resenc", in_channels=2, channel_names=["FLAIR", "T1"], heads=["segmentation"],
                     spacing=[2.0, 2.0, 2.0], encoder_kwargs={"channels": [4, 8, 8], "blocks": [1, 1, 1]}, regions=REGIONS, labels=LABELS,
                     **(spec_kwargs or {}))
    model = MultiTaskModel(spec)

    class Threshold(torch.nn.Module):
        def forward(self, features):
            return self.image.new_ones((1, 3, *self.image.shape[2:])) * 20 * (self.image[:, :1] - 1.0)

    head = Threshold()
    encoder_forward = model.encoder.forward

    def remember(x):
        head.image = x
        return encoder_forward(x)

    model.encoder.forward = remember
    model.heads["segmentation"] = head
    return Predictor(model, InferenceConfig(roi_size=None), "cpu")


def test_predictor_rejects_a_threshold_for_an_unknown_region_before_predicting():
    predictor = _blob_model()
    with pytest.raises(ValueError, match="unknown region"):
        Predictor(predictor.model, InferenceConfig(segmentation_threshold={"XT": 0.4}), "cpu")
    assert Predictor(predictor.model, InferenceConfig(segmentation_threshold={"ET": 0.4}), "cpu").inference \
        .segmentation_threshold == {"ET": 0.4}


def _scan(shape=(30, 26, 20)):
    flair = np.full(shape, 1.0, dtype=np.float32)
    flair[shape[0] // 2:] = 2.0  # background level 1 (z-scores to about -1), bright slab (+1)
    flair[6:14, 5:12, 4:10] = 4.0  # a bright lesion
    flair[:2] = 0.0  # zero background band (excluded from z-scoring)
    return np.stack([flair, flair * 0.5])


@pytest.mark.parametrize("axes, flips", [((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, False, True)),
                                         ((2, 0, 1), (False, True, False))])
def test_mask_lands_on_the_same_anatomy_for_flipped_and_permuted_affines(axes, flips):
    predictor = _blob_model()
    image = _scan()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    reference = predictor.predict(image, affine).mask
    # store the same scan with permuted/flipped axes and an affine that says so: same world positions
    stored = np.transpose(image, (0, *(a + 1 for a in axes)))
    stored_affine = affine[:, list(axes) + [3]]
    for axis, flip in enumerate(flips):
        if flip:
            stored = np.flip(stored, axis + 1)
            stored_affine = stored_affine @ nib.orientations.inv_ornt_aff(
                np.array([[i, -1 if i == axis else 1] for i in range(3)]), stored.shape[1:])
    mask = predictor.predict(np.ascontiguousarray(stored), stored_affine).mask
    assert mask.shape == stored.shape[1:]
    # map both masks to world coordinates of their voxels and compare the sets of tumour positions
    def world_points(m, aff):
        idx = np.argwhere(m > 0)
        return {tuple(np.round(p, 3)) for p in nib.affines.apply_affine(aff, idx)}
    assert reference.any()
    assert world_points(mask, stored_affine) == world_points(reference, affine)


def test_keep_largest_components_keeps_whole_objects_with_their_labels():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:5, 1:5, 1:5] = 2  # 64 voxels: edema around ...
    mask[2:4, 2:4, 2:4] = 4  # ... an enhancing core (one object with it)
    mask[8:11, 8:11, 8:11] = 1  # 27 voxels, another object
    mask[6, 6, 6] = 4  # a stray voxel, touching neither (26-connectivity: 5 -> 6 -> 8 leaves a gap)
    one = keep_largest_components(mask, 1)
    np.testing.assert_array_equal(one[:6, :6, :6], mask[:6, :6, :6])  # the largest object, labels untouched
    assert one.sum() == mask[:6, :6, :6].sum() and one[6, 6, 6] == 0 and not one[8:, 8:, 8:].any()
    two = keep_largest_components(mask, 2)
    np.testing.assert_array_equal(two[8:, 8:, 8:], mask[8:, 8:, 8:])
    assert two[6, 6, 6] == 0
    np.testing.assert_array_equal(keep_largest_components(mask, 3), mask)
    mask[5, 5, 5] = 2  # now the stray voxel touches the first object at a corner: one object
    assert keep_largest_components(mask, 1)[6, 6, 6] == 4
    assert not keep_largest_components(np.zeros((4, 4, 4), np.uint8), 1).any()


def test_largest_components_setting_removes_a_far_false_positive():
    predictor = _blob_model()
    image = _scan((40, 36, 28))
    image[0, 28:31, 26:29, 20:23] = 4.0  # a small bright blob far from the lesion
    image[1] = image[0] * 0.5
    plain = predictor.predict(image, np.eye(4)).mask
    predictor.inference = InferenceConfig(roi_size=None, largest_components=1)
    cleaned = predictor.predict(image, np.eye(4)).mask
    assert plain[29, 27, 21] > 0 and cleaned[29, 27, 21] == 0  # the blob is gone ...
    lesion = (slice(6, 14), slice(5, 12), slice(4, 10))
    np.testing.assert_array_equal(cleaned[lesion], plain[lesion])  # ... the lesion kept as it was
    assert (cleaned[lesion] > 0).mean() > 0.9
    with pytest.raises(ValueError, match="largest_components"):
        InferenceConfig(largest_components=0)


def test_gate_by_boxes_keeps_whole_components_touching_a_confident_box():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:5, 1:5, 1:5] = 2
    mask[2:4, 2:4, 2:4] = 4  # one object with the edema around it
    mask[8:11, 8:11, 8:11] = 1  # a second object
    boxes = np.array([[3.2, 3.2, 3.2, 6.0, 6.0, 6.0],  # overlaps the first object's corner voxels 3..4
                      [9.0, 9.0, 9.0, 10.0, 10.0, 10.0]], np.float32)  # the centre voxel of the second
    first = gate_by_boxes(mask, boxes, np.array([0.9, 0.2], np.float32), 0.5)
    np.testing.assert_array_equal(first[:6, :6, :6], mask[:6, :6, :6])  # kept whole, labels untouched
    assert not first[6:].any()
    np.testing.assert_array_equal(gate_by_boxes(mask, boxes, np.array([0.9, 0.6], np.float32), 0.5), mask)
    second = gate_by_boxes(mask, boxes, np.array([0.1, 0.3], np.float32), 0.5)  # no box reaches 0.5: the top one
    assert not second[:6, :6, :6].any() and (second[8:, 8:, 8:] == 1).sum() == 27
    edge = np.array([[0.0, 0.0, 0.0, 1.4, 12.0, 12.0]], np.float32)  # holds only voxel centre x = 0.5
    assert not gate_by_boxes(mask, edge, np.array([0.9], np.float32), 0.5).any()
    np.testing.assert_array_equal(gate_by_boxes(mask, np.zeros((0, 6), np.float32), np.zeros(0, np.float32), 0.5),
                                  mask)


def test_gate_fraction_drops_specks_sharing_a_box_with_a_larger_component():
    """One oversized box over a lesion and a speck far from it (the false positive it cannot tell apart), and a
    second box over a small second lesion: with ``min_fraction`` the speck goes, the second lesion (the largest in
    its own box) stays; without it both stay."""
    mask = np.zeros((30, 12, 12), np.uint8)
    mask[2:8, 2:8, 2:8] = 2  # the lesion, 216 voxels
    mask[3:6, 3:6, 3:6] = 4
    mask[12:14, 9:11, 9:11] = 1  # a speck of 8 voxels, apart from the lesion but inside the big box
    mask[24:26, 4:6, 4:6] = 2  # a second small lesion, 8 voxels, in a box of its own
    boxes = np.array([[0, 0, 0, 16, 12, 12], [23, 3, 3, 27, 7, 7]], np.float32)
    scores = np.array([0.99, 0.8], np.float32)
    np.testing.assert_array_equal(gate_by_boxes(mask, boxes, scores, 0.5), mask)
    gated = gate_by_boxes(mask, boxes, scores, 0.5, min_fraction=0.1)
    np.testing.assert_array_equal(gated[:10], mask[:10])  # the lesion whole, labels kept
    assert not gated[10:20].any()  # the speck is gone (8 < 0.1 * 216)
    np.testing.assert_array_equal(gated[20:], mask[20:])  # the second lesion stays
    np.testing.assert_array_equal(gate_by_boxes(mask, boxes, scores, 0.5, min_fraction=0.03), mask)  # 8 >= 6.5
    for bad in (1.5, -0.1, True, "some"):
        with pytest.raises(ValueError, match="detection_gate_fraction"):
            InferenceConfig(detection_gate=0.5, detection_gate_fraction=bad)


def test_detection_gate_setting_removes_segmentation_outside_confident_boxes():
    """A fake detection head boxes every bright component of its window, the lesion (largest) with score 0.9 and a
    far blob with 0.3: the gate at 0.5 drops the blob's mask and keeps the lesion's, at 0.2 keeps both. One box over
    the whole window keeps both, unless ``detection_gate_fraction`` drops the blob for being small beside the lesion."""
    predictor = _blob_model()
    seg = predictor.model.heads["segmentation"]

    class Boxes(torch.nn.Module):
        def forward(self, features, roi):
            instances = instances_from_mask((seg.image[0, 0] > 1.0).numpy(), np.eye(4), 0.0)
            boxes = torch.as_tensor(boxes_from_instances(instances))
            sizes = torch.as_tensor(np.bincount(instances.ravel())[1:])
            return [{"boxes": boxes, "labels_scores": torch.where(sizes == sizes.max(), 0.9, 0.3)}]

    predictor.model.heads["detection"] = Boxes()
    predictor.spec.heads = ["segmentation", "detection"]
    image = _scan((40, 36, 28))
    image[0, 28:31, 26:29, 20:23] = 4.0  # a small bright blob far from the lesion
    image[1] = image[0] * 0.5
    plain = predictor.predict(image, np.eye(4))
    assert len(plain.scores) == 2 and plain.mask[29, 27, 21] > 0
    predictor.inference = InferenceConfig(roi_size=None, detection_gate=0.5)
    gated = predictor.predict(image, np.eye(4)).mask
    assert gated[29, 27, 21] == 0 and not gated[25:, 22:, 17:].any()  # the blob is gone ...
    lesion = (slice(6, 14), slice(5, 12), slice(4, 10))
    np.testing.assert_array_equal(gated[lesion], plain.mask[lesion])  # ... the lesion kept as it was
    assert (gated[lesion] > 0).mean() > 0.9
    predictor.inference = InferenceConfig(roi_size=None, detection_gate=0.2)
    np.testing.assert_array_equal(predictor.predict(image, np.eye(4)).mask, plain.mask)

    class OneBigBox(torch.nn.Module):  # one box over the whole window: the gate alone keeps the blob
        def forward(self, features, roi):
            box = torch.tensor([[0.0, 0.0, 0.0, *seg.image.shape[2:]]])
            return [{"boxes": box, "labels_scores": torch.tensor([0.9])}]

    predictor.model.heads["detection"] = OneBigBox()
    np.testing.assert_array_equal(predictor.predict(image, np.eye(4)).mask, plain.mask)
    predictor.inference = InferenceConfig(roi_size=None, detection_gate=0.5, detection_gate_fraction=0.5)
    np.testing.assert_array_equal(predictor.predict(image, np.eye(4)).mask, gated)  # the fraction drops it
    predictor.model.heads["detection"] = Boxes()
    predictor.spec.heads = ["segmentation"]  # a segmentation-only model ignores the gate
    predictor.inference = InferenceConfig(roi_size=None, detection_gate=0.5)
    np.testing.assert_array_equal(predictor.predict(image, np.eye(4)).mask, plain.mask)
    for bad in (1.5, -0.1, True, "high"):
        with pytest.raises(ValueError, match="detection_gate"):
            InferenceConfig(detection_gate=bad)


def test_boxes_found_wholly_in_the_padding_are_dropped():
    """The detection head sees the scan padded to the encoder's size divisor. A box it finds inside the padding
    collapses onto the scan's face when clipped back (zero extent along one axis), one reaching 0.3 voxel into the
    scan leaves a sliver holding no voxel centre: neither is a finding. A box partly inside the scan is clipped and
    kept."""
    predictor = _blob_model()
    image = torch.from_numpy(_scan((30, 26, 20)))
    div = predictor.model.size_divisible
    padded = [-(-n // div) * div for n in image.shape[1:]]
    lead = [(p - n) // 2 for p, n in zip(padded, image.shape[1:])]
    assert lead[0] > 0, "the test needs padding along x"

    class Boxes(torch.nn.Module):
        def forward(self, features, roi):
            found = [[0.0, 4.0, 4.0, lead[0], 10.0, 10.0],  # wholly in the padding before x = 0
                     [0.0, 4.0, 4.0, lead[0] + 0.3, 10.0, 10.0],  # no voxel centre of the scan
                     [0.0, 4.0, 4.0, lead[0] + 3.0, 10.0, 10.0],  # straddles the scan's face
                     [lead[0] + 5.0, 6.0, 4.0, lead[0] + 12.0, 12.0, 9.0]]  # inside
            return [{"boxes": torch.tensor(found), "labels_scores": torch.tensor([0.95, 0.9, 0.8, 0.7])}]

    predictor.model.heads["detection"] = Boxes()
    predictor.spec.heads = ["segmentation", "detection"]
    out = predictor.predict_grid(image)
    torch.testing.assert_close(out.scores, torch.tensor([0.8, 0.7]))
    torch.testing.assert_close(out.boxes, torch.tensor([[0.0, 4.0 - lead[1], 4.0 - lead[2], 3.0, 10.0 - lead[1],
                                                         10.0 - lead[2]],
                                                        [5.0, 6.0 - lead[1], 4.0 - lead[2], 12.0, 12.0 - lead[1],
                                                         9.0 - lead[2]]]))


def test_a_padding_box_suppresses_no_real_box_when_windows_and_copies_are_merged():
    """With several windows or test-time copies, the boxes of all of them compete in one NMS. A box found in the
    padding is dropped before that, so that it cannot suppress a real box it overlaps (the real box used to go, and
    then the padding box too, leaving nothing), nor count as a copy's vote."""
    predictor = _blob_model()
    image = torch.from_numpy(_scan((30, 26, 20)))
    div = predictor.model.size_divisible
    lead = [(-(-n // div) * div - n) // 2 for n in image.shape[1:]]
    assert lead[0] > 0, "the test needs padding along x"
    calls = []

    class Boxes(torch.nn.Module):
        def forward(self, features, roi):
            calls.append(roi)
            if len(calls) > 1:  # the mirrored copy finds nothing
                return [{"boxes": torch.zeros((0, 6)), "labels_scores": torch.zeros(0)}]
            found = [[0.0, 4.0, 4.0, lead[0] + 0.3, 10.0, 10.0],  # a padding sliver, scoring higher
                     [0.0, 4.0, 4.0, lead[0] + 2.0, 10.0, 10.0]]  # a real box at the scan's face, overlapping it
            return [{"boxes": torch.tensor(found), "labels_scores": torch.tensor([0.9, 0.6])}]

    predictor.model.heads["detection"] = Boxes()
    predictor.spec.heads = ["segmentation", "detection"]
    predictor.inference = InferenceConfig(roi_size=None, mirror_axes=(1,))
    out = predictor.predict_grid(image)
    assert len(calls) == 2
    torch.testing.assert_close(out.scores, torch.tensor([0.3]))  # found by one copy of two: half its score
    torch.testing.assert_close(out.boxes, torch.tensor([[0.0, 4.0 - lead[1], 4.0 - lead[2], 2.0, 10.0 - lead[1],
                                                         10.0 - lead[2]]]))


def test_test_time_copies_vote_on_each_box_score():
    """With test-time copies, NMS keeps the best box of each lesion and every copy votes on its score: the mean over
    copies of each copy's best score for a box overlapping it, as ensemble members vote. A box every copy found
    keeps the copies' mean; a box one copy of two found keeps half its score (the max over copies, used before,
    gave a false positive of a single copy its full score)."""
    predictor = _blob_model()
    image = torch.from_numpy(_scan((32, 32, 32)))
    calls = []

    class Boxes(torch.nn.Module):
        def forward(self, features, roi):
            calls.append(roi)
            if len(calls) == 1:  # the window as it is: a lesion (0.8) and a false positive (0.6)
                return [{"boxes": torch.tensor([[4.0, 5, 6, 12, 14, 16], [20, 20, 20, 24, 24, 24]]),
                         "labels_scores": torch.tensor([0.8, 0.6])}]
            # the copy mirrored along y finds the lesion (its mirror image, 1 voxel off) at 0.4, and nothing else
            y = roi[1]
            return [{"boxes": torch.tensor([[4.0, y - 15, 6, 12, y - 5, 16]]), "labels_scores": torch.tensor([0.4])}]

    predictor.model.heads["detection"] = Boxes()
    predictor.spec.heads = ["segmentation", "detection"]
    predictor.inference = InferenceConfig(roi_size=None, mirror_axes=(1,))
    out = predictor.predict_grid(image)
    assert len(calls) == 2 and calls[0][1] == 32  # one window, no padding: grid and window coordinates agree
    torch.testing.assert_close(out.scores, torch.tensor([(0.8 + 0.4) / 2, 0.6 / 2]))
    torch.testing.assert_close(out.boxes, torch.tensor([[4.0, 5, 6, 12, 14, 16], [20, 20, 20, 24, 24, 24]]))


def test_a_checkpoint_folder_copied_out_of_its_run_keeps_its_inference_settings(trained_run, tmp_path):
    """A checkpoint folder holds the run's config, so copied elsewhere it predicts with the run's inference
    settings, not with a config.yaml that happens to lie two folders up; without one it warns and uses defaults."""
    copy = tmp_path / "models" / "brats" / "last"
    shutil.copytree(trained_run / "checkpoints" / "last", copy)
    (tmp_path / "models" / "config.yaml").write_text("inference:\n  overlap: 0.9\n")  # some other config
    own = Predictor.from_pretrained(trained_run, checkpoint="last").inference
    assert own.overlap != 0.9 and Predictor.from_pretrained(copy).inference == own
    (copy / "config.yaml").unlink()
    with pytest.warns(UserWarning, match="default inference settings"):
        assert Predictor.from_pretrained(copy).inference == InferenceConfig()


def test_detection_selection_follows_the_inference_settings():
    """The detection head picks each window's boxes with the score threshold, NMS and box count of the inference
    settings in use (``--set inference.max_detections=...``), not with those model.json was built with (here the
    defaults: score 0.05, which an untrained head's scores near the 0.01 prior never reach)."""
    torch.manual_seed(0)
    spec = ModelSpec(encoder="resenc", in_channels=1, channel_names=["CT"], heads=["detection"], spacing=[1.0] * 3,
                     encoder_kwargs={"channels": [4, 8, 8, 8, 8], "blocks": [1, 1, 1, 1, 1]},
                     regions={"lesion": [1]}, labels={"background": 0, "lesion": 1},
                     detection={"anchor_shapes": [[3, 3, 3], [5, 4, 4]]})
    model = MultiTaskModel(spec)
    image = torch.randn(1, 32, 32, 32)
    assert len(Predictor(model, InferenceConfig(), "cpu").predict_grid(image).scores) == 0
    many = Predictor(model, InferenceConfig(score_threshold=0.0, nms_threshold=0.5), "cpu").predict_grid(image)
    few = Predictor(model, InferenceConfig(score_threshold=0.0, nms_threshold=0.5, max_detections=3),
                    "cpu").predict_grid(image)
    assert len(few.scores) == 3 < len(many.scores) <= 20
    torch.testing.assert_close(few.scores, many.scores[:3])  # the three best, in order


def test_boxes_of_an_oblique_scan_map_back_exactly():
    """A scan rotated 20 degrees about z: the model grid is its reoriented, resampled copy, so a box found there is
    one exact box in the scan's voxels (mapped straight, not through an axis-aligned world box, which would enlarge
    it twice); its world box is that of the voxel box."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    affine = np.array([[c, -s, 0, 10.0], [s, c, 0, -5.0], [0, 0, 1.5, 2.0], [0, 0, 0, 1]])
    geometry = make_geometry(affine, (40, 30, 20), (2.0, 2.0, 2.0))
    truth = np.array([10.0, 12.0, 4.0, 20.0, 24.0, 14.0])
    on_grid = voxel_box_to_grid(truth, np.linalg.inv(geometry.model_affine) @ affine)
    grid = GridOutput(None, torch.tensor(on_grid[None], dtype=torch.float32), torch.tensor([0.9]), {})
    pred = _blob_model().to_input_grid("oblique", geometry, grid)
    np.testing.assert_allclose(pred.boxes_voxel[0], truth, atol=1e-4)
    np.testing.assert_allclose(pred.boxes_world[0], voxel_box_to_world(truth, affine), atol=1e-4)


def test_geometry_model_grid_maps_to_world_like_the_input():
    affine = np.array([[0, 0, -1.5, 100], [1.0, 0, 0, -20], [0, 2.0, 0, 5], [0, 0, 0, 1]])
    g = make_geometry(affine, (40, 30, 20), (3.0, 3.0, 3.0))
    # the model grid covers exactly the input's field of view (edges to edges), whatever the axis order
    box = np.array([0, 0, 0, *g.model_shape], dtype=float)
    world_model = voxel_box_to_world(box, g.model_affine)
    world_input = voxel_box_to_world(np.array([0, 0, 0, 40, 30, 20], dtype=float), affine)
    np.testing.assert_allclose(world_model, world_input, atol=1e-6)


def test_sliding_windows_agree_with_one_window():
    predictor = _blob_model()
    image = _scan((40, 36, 28))
    whole = predictor.predict(image, np.eye(4)).mask
    predictor.inference = InferenceConfig(roi_size=(8, 8, 8), overlap=0.5)
    tiled = predictor.predict(image, np.eye(4)).mask
    assert (whole == tiled).mean() > 0.995


def test_mirroring_makes_every_head_flip_equivariant():
    """With mirror_axes = all three axes, a flipped scan runs the encoder on exactly the same 8 copies as the scan
    itself, so its outputs must be the flipped outputs: region probabilities flipped, boxes flipped, class
    probabilities unchanged. A random unmirrored network is not equivariant, so the test can fail."""
    torch.manual_seed(0)
    spec = ModelSpec(encoder="resenc", in_channels=2, channel_names=["FLAIR", "T1"],
                     heads=["segmentation", "detection", "classification"], spacing=[2.0, 2.0, 2.0],
                     encoder_kwargs={"channels": [4, 8, 8, 8, 8], "blocks": [1, 1, 1, 1, 1]},
                     regions=REGIONS, labels=LABELS,
                     tasks={"grade": {"kind": "binary", "classes": ["LGG", "HGG"]}},
                     detection={"anchor_shapes": [[3, 3, 3], [5, 4, 4]]})
    model = MultiTaskModel(spec)  # untrained scores sit near the 0.01 prior: score_threshold 0.0 below
    image = torch.randn(2, 32, 16, 16)  # divisible by the encoder's size divisor: no padding breaks the symmetry
    plain = Predictor(model, InferenceConfig(score_threshold=0.0), "cpu")
    mirrored = Predictor(model, InferenceConfig(mirror_axes=(0, 1, 2), score_threshold=0.0), "cpu")
    reference = mirrored.predict_grid(image)
    assert len(reference.boxes) > 0
    for axis in range(3):
        flipped = mirrored.predict_grid(torch.flip(image, [axis + 1]))
        torch.testing.assert_close(flipped.region_probs, torch.flip(reference.region_probs, [axis + 1]),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(flipped.class_probs["grade"], reference.class_probs["grade"], atol=1e-5, rtol=1e-4)
        expected = unflip_boxes(reference.boxes, [axis], image.shape[1:])  # flipping is its own inverse
        order, expected_order = torch.argsort(flipped.scores), torch.argsort(reference.scores)
        torch.testing.assert_close(flipped.boxes[order], expected[expected_order], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(flipped.scores[order], reference.scores[expected_order])  # the same copies' vote
        unmirrored = torch.flip(plain.predict_grid(image).region_probs, [axis + 1])
        assert (plain.predict_grid(torch.flip(image, [axis + 1])).region_probs - unmirrored).abs().max() > 1e-3
    for bad in [(3,), (0, 0)]:
        with pytest.raises(ValueError, match="mirror_axes"):
            Predictor(model, InferenceConfig(mirror_axes=bad), "cpu")


def test_permuting_axes_makes_every_head_transpose_equivariant():
    """With test-time copies closed under swapping two axes (every order of the permuted axes, with or without the
    flips), a scan with those axes swapped runs the encoder on the same copies as the scan itself: region
    probabilities come out transposed, boxes with those coordinates swapped, class probabilities unchanged. Without
    the copies a random network is not equivariant, so the test can fail."""
    torch.manual_seed(0)
    spec = ModelSpec(encoder="resenc", in_channels=1, channel_names=["MRA"],
                     heads=["segmentation", "detection", "classification"], spacing=[1.0, 1.0, 1.0],
                     encoder_kwargs={"channels": [4, 8, 8, 8, 8], "blocks": [1, 1, 1, 1, 1]},
                     regions={"lesion": [1]}, labels={"background": 0, "lesion": 1},
                     tasks={"aneurysm": {"kind": "binary", "classes": ["no", "yes"]}},
                     detection={"anchor_shapes": [[3, 3, 3], [5, 4, 4]]})
    model = MultiTaskModel(spec)
    assert len(window_copies((0, 1, 2), (0, 1, 2))) == 48 and window_copies((), ())[0] == ([0, 1, 2], [])
    image = torch.randn(1, 32, 32, 32)  # the encoder's size divisor: no padding, and a 2^3 deepest map
    plain = Predictor(model, InferenceConfig(score_threshold=0.0), "cpu")
    for mirror, permute, (a, b) in [((0, 1, 2), (0, 1), (0, 1)), ((), (0, 1, 2), (0, 2)), ((), (1, 2), (1, 2))]:
        predictor = Predictor(model, InferenceConfig(mirror_axes=mirror, permute_axes=permute, score_threshold=0.0),
                              "cpu")
        reference = predictor.predict_grid(image)
        assert len(reference.boxes) > 0
        order = [0, 1, 2, 3]
        order[a + 1], order[b + 1] = b + 1, a + 1
        swapped = predictor.predict_grid(image.permute(order))
        torch.testing.assert_close(swapped.region_probs, reference.region_probs.permute(order), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(swapped.class_probs["aneurysm"], reference.class_probs["aneurysm"],
                                   atol=1e-5, rtol=1e-4)
        columns = [0, 1, 2]
        columns[a], columns[b] = b, a
        expected = reference.boxes[:, columns + [c + 3 for c in columns]]
        got, want = swapped.boxes[torch.argsort(swapped.scores)], expected[torch.argsort(reference.scores)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        transposed = plain.predict_grid(image).region_probs.permute(order)
        assert (plain.predict_grid(image.permute(order)).region_probs - transposed).abs().max() > 1e-3
    with pytest.raises(ValueError, match="permute_axes"):  # a window of unequal sizes along permuted axes
        Predictor(model, InferenceConfig(permute_axes=(0, 1)), "cpu").predict_grid(torch.randn(1, 64, 32, 32))
    for bad in [(1,), (0, 0), (0, 3)]:
        with pytest.raises(ValueError, match="permute_axes"):
            InferenceConfig(permute_axes=bad)


def test_padding_centres_the_volume_as_training_does():
    """A volume smaller than the encoder's size divisor is padded evenly on both sides, as training pads a volume
    smaller than its patch (pad_to): a whole-volume classifier then sees the object where it saw it in training, and
    with even padding a mirrored copy is the mirror of the padded input, so mirroring stays equivariant. Padding at
    the end of each axis (the earlier behaviour) fails both checks."""
    torch.manual_seed(0)
    spec = ModelSpec(encoder="resenc", in_channels=2, channel_names=["FLAIR", "T1"],
                     heads=["segmentation", "classification"], spacing=[1.0, 1.0, 1.0],
                     encoder_kwargs={"channels": [4, 8, 8, 8, 8], "blocks": [1, 1, 1, 1, 1]},
                     regions=REGIONS, labels=LABELS, tasks={"grade": {"kind": "binary", "classes": ["LGG", "HGG"]}})
    model = MultiTaskModel(spec).eval()
    image = torch.randn(2, 28, 12, 14)  # padded to 32 x 16 x 16: 2 + 2, 2 + 2, 1 + 1
    out = Predictor(model, InferenceConfig(), "cpu").predict_grid(image)
    with torch.no_grad():
        direct = model(pad_to(image, (32, 16, 16))[None])
    torch.testing.assert_close(out.class_probs["grade"], torch.sigmoid(direct["classification"]["grade"][0]))
    torch.testing.assert_close(out.region_probs, torch.sigmoid(direct["segmentation"][0, :, 2:30, 2:14, 1:15]))
    mirrored = Predictor(model, InferenceConfig(mirror_axes=(0, 1, 2)), "cpu")
    reference = mirrored.predict_grid(image)
    for axis in range(3):
        flipped = mirrored.predict_grid(torch.flip(image, [axis + 1]))
        torch.testing.assert_close(flipped.class_probs["grade"], reference.class_probs["grade"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(flipped.region_probs, torch.flip(reference.region_probs, [axis + 1]),
                                   atol=1e-5, rtol=1e-4)


def test_unflip_boxes_matches_the_box_of_the_unflipped_mask():
    mask = np.zeros((10, 12, 7), dtype=bool)
    mask[2:5, 7:11, 1:3] = True
    def box(m):
        idx = np.argwhere(m)
        return torch.tensor([[*idx.min(0), *(idx.max(0) + 1)]], dtype=torch.float32)  # half-open edges
    for axes in ([0], [1, 2], [0, 1, 2]):
        flipped_box = box(np.flip(mask, axes))
        torch.testing.assert_close(unflip_boxes(flipped_box, axes, mask.shape), box(mask))


@pytest.fixture(scope="module")
def trained_run(synth_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(synth_dataset), "-c", "tiny", "-o", str(run), "-q",
                 "--set", "training.epochs=1", "--set", "training.iterations_per_epoch=2"]) == 0
    return run


def test_inference_settings_of_a_run_can_be_overridden(trained_run):
    assert Predictor.from_pretrained(trained_run).inference.mirror_axes == ()  # the tiny recipe does not mirror
    predictor = Predictor.from_pretrained(trained_run, inference={"mirror_axes": [0, 2], "overlap": 0.5})
    assert predictor.inference.mirror_axes == (0, 2) and predictor.inference.overlap == 0.5
    with pytest.raises(ValueError, match="unknown key"):
        Predictor.from_pretrained(trained_run, inference={"mirror": [0]})


def test_boxes_in_world_coordinates_match_voxel_boxes(trained_run, synth_dataset):
    predictor = Predictor.from_pretrained(trained_run)
    predictor.inference.score_threshold = 0.0
    spec, cases = load_dataset(synth_dataset)
    channels, affine = read_channels(cases[0].image_files, cases[0].case_id)
    pred = predictor.predict([cases[0].image_files[i] for i in range(4)], case_id=cases[0].case_id)
    assert pred.mask.shape == channels[0].shape
    assert len(pred.scores) > 0
    for voxel, world in zip(pred.boxes_voxel, pred.boxes_world):
        np.testing.assert_allclose(voxel_box_to_world(voxel, affine), world, atol=1e-3)
        assert np.all(voxel[:3] >= -1e-3) and np.all(voxel[3:] <= np.array(channels[0].shape) + 1e-3)
    assert set(pred.probabilities["grade"]) == {"LGG", "HGG"}
    assert sum(pred.probabilities["grade"].values()) == pytest.approx(1.0)


def test_predict_command_shards_skips_and_survives_a_corrupt_case(trained_run, synth_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    spec, cases = load_dataset(data)
    scan = nib.load(cases[0].image_files[0])  # a scanner's header: qform and sform codes 1, units mm and s
    scan = nib.Nifti1Image(np.asarray(scan.dataobj), scan.affine)
    scan.set_qform(scan.affine, code=1)
    scan.set_sform(scan.affine, code=1)
    scan.header.set_xyzt_units("mm", "sec")
    nib.save(scan, cases[0].image_files[0])
    bad = cases[1].image_files[0]
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "out"
    codes = [main(["predict", "-m", str(trained_run), "-i", str(data), "-o", str(out), "-q",
                   "--num-parts", "3", "--part-id", str(k)]) for k in range(3)]
    assert codes.count(1) == 1 and codes.count(0) == 2  # only the part holding the corrupt case fails
    assert cases[1].case_id in capsys.readouterr().err
    for case in cases:
        files = [out / f"{case.case_id}_{s}" for s in ("seg.nii.gz", "boxes.json", "class.json")]
        assert all(f.is_file() for f in files) == (case is not cases[1]), case.case_id
    first = out / f"{cases[0].case_id}_seg.nii.gz"
    seg = nib.load(first)
    source = nib.load(cases[0].image_files[0])
    assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
    assert [int(seg.header[k]) for k in ("qform_code", "sform_code", "xyzt_units")] == [1, 1, 10]  # the input's
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
    boxes = json.loads((out / f"{cases[0].case_id}_boxes.json").read_text())["boxes"]
    assert all(len(b["voxel"]) == 6 and len(b["world"]) == 6 for b in boxes)
    stamp = first.stat().st_mtime_ns
    assert main(["predict", "-m", str(trained_run), "-i", str(data), "-o", str(out), "-q",
                 "--num-parts", "3", "--part-id", "0"]) in (0, 1)
    assert first.stat().st_mtime_ns == stamp  # outputs exist: skipped without --overwrite
    ids = [c.case_id for c in discover_cases([data], spec_channel_names(data))]
    shards = [ids[k::3] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids) and sum(map(len, shards)) == len(ids)


def test_a_rerun_keeps_the_rows_of_skipped_cases_and_one_failing_case_stops_nothing(trained_run, synth_dataset,
                                                                                    tmp_path, monkeypatch, capsys):
    """``predictions.csv`` lists every case predicted into the folder, also after a rerun that skipped the cases
    already done (it used to list only the cases of the last call); a case that runs out of memory is reported and
    the others go on, as any failing case, and loses its row. An unreadable table stops the call before any case."""
    out = tmp_path / "out"
    assert main(["predict", "-m", str(trained_run), "-i", str(synth_dataset), "-o", str(out), "-q"]) == 0

    def rows():
        with open(out / "predictions.csv", newline="") as f:
            return {row["case"]: row for row in csv.DictReader(f)}

    first = rows()
    ids = sorted(first)
    assert len(ids) == len(load_dataset(synth_dataset)[1])
    for case_id in ids[:2]:
        (out / f"{case_id}_seg.nii.gz").unlink()  # two cases to predict again; the others are skipped
    predict = Predictor.predict

    def out_of_memory(self, images, affine=None, case_id="case"):
        if case_id == ids[1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return predict(self, images, affine, case_id)

    monkeypatch.setattr(Predictor, "predict", out_of_memory)
    assert main(["predict", "-m", str(trained_run), "-i", str(synth_dataset), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert ids[1] in err and "CUDA out of memory" in err and "Traceback" not in err
    assert (out / f"{ids[0]}_seg.nii.gz").is_file() and not (out / f"{ids[1]}_seg.nii.gz").exists()
    assert not list(out.glob(f"{ids[1]}_*"))  # a failed case keeps no outputs (its old boxes and classes went too)
    # the skipped cases' rows kept, the case predicted again gives the same row, the failed case has none
    assert rows() == {case_id: row for case_id, row in first.items() if case_id != ids[1]}
    (out / "predictions.csv").write_bytes(b"case,num_boxes\n\xff\xfe\n")
    with pytest.raises(ValueError, match="predictions.csv: not a predictions table"):
        predict_folder(trained_run, [synth_dataset], out, progress=False)


def test_an_interrupted_call_keeps_its_rows_and_a_rerun_reads_the_rest_off_the_files(trained_run, synth_dataset,
                                                                                      tmp_path, monkeypatch):
    """The table is rewritten after every case: a call stopped part way (Ctrl-C, a job's time limit) keeps the rows of
    the cases it did. A rerun skips every case with outputs and gives each one without a row (cut off between its
    files and its row, or predicted by a shard) the row its files hold: the same row the prediction gave."""
    out = tmp_path / "out"
    assert main(["predict", "-m", str(trained_run), "-i", str(synth_dataset), "-o", str(out), "-q"]) == 0
    with open(out / "predictions.csv", newline="") as f:
        complete = {row["case"]: row for row in csv.DictReader(f)}
    ids = sorted(complete)
    (out / "predictions.csv").unlink()
    for case_id in ids[3:]:
        for path in out.glob(f"{case_id}_*"):
            path.unlink()
    predict, calls = Predictor.predict, []

    def interrupted(self, images, affine=None, case_id="case"):
        calls.append(case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict(self, images, affine, case_id)

    monkeypatch.setattr(Predictor, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(trained_run, [synth_dataset], out, progress=False)
    with open(out / "predictions.csv", newline="") as f:
        kept = {row["case"]: row for row in csv.DictReader(f)}
    assert sorted(kept) == ids[:5]  # three read off the files, two predicted, then the interruption
    monkeypatch.setattr(Predictor, "predict", predict)
    assert predict_folder(trained_run, [synth_dataset], out, progress=False) == []
    with open(out / "predictions.csv", newline="") as f:
        assert {row["case"]: row for row in csv.DictReader(f)} == complete


def test_missing_channel_files_need_a_model_trained_with_missing_channels(trained_run, synth_dataset, tmp_path):
    """The synthetic dataset has every channel, so its model refuses a case without its T1 file, naming the case's
    folder; the same weights marked as trained with missing channels predict it, the channel zero-filled."""
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    _, cases = load_dataset(data)
    cases[0].image_files[1].unlink()
    out = tmp_path / "out"
    failures = predict_folder(trained_run, [data], out, progress=False)
    assert [case_id for case_id, _ in failures] == [cases[0].case_id]
    assert "missing channel(s) ['T1']" in failures[0][1] and "not trained with missing channels" in failures[0][1]
    assert f"file {data / 'imagesTr'}: " in failures[0][1]  # the folder the file was looked for in
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for spec_file in run.rglob("model.json"):
        spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "missing_channels": True}))
    assert predict_folder(run, [data], out, progress=False) == []
    assert (out / f"{cases[0].case_id}_seg.nii.gz").is_file()


def spec_channel_names(data):
    spec, _ = load_dataset(data)
    return [spec.channel_names[i] for i in sorted(spec.channel_names)]


def test_cpu_predictor_holds_the_model_channels_last_with_group_norms_and_predicts_as_built():
    """On the CPU the predictor holds a model as the trainer does (models/memory_format.py); its outputs are those
    of the model as built (contiguous, InstanceNorm3d)."""
    from medtriad.models.memory_format import InstanceNormAsGroupNorm

    torch.manual_seed(0)
    spec = ModelSpec(encoder="resenc", in_channels=2, channel_names=["T1", "T2"], heads=["segmentation", "classification"],
                     spacing=[1.0, 1.0, 1.0], encoder_kwargs={"channels": [4, 8, 8, 8, 8], "blocks": [1, 1, 1, 1, 1]},
                     regions=REGIONS, labels=LABELS, tasks={"grade": {"kind": "binary", "classes": ["LGG", "HGG"]}},
                     classification_hidden=8)
    built = MultiTaskModel(spec).eval()
    image = torch.randn(2, 64, 32, 32)  # multiples of the divisor: one window, no padding
    with torch.no_grad():
        expected = torch.sigmoid(built(image[None])["segmentation"])[0]
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in built.modules())
    predictor = Predictor(built, InferenceConfig(), "cpu")
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in predictor.model.modules())
    assert any(isinstance(m, InstanceNormAsGroupNorm) for m in predictor.model.modules())
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(predictor.predict_grid(image).region_probs, expected, atol=1e-4, rtol=1e-4)
