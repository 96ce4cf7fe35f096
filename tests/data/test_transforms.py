"""Training augmentation: which transforms may change an object's size; resampling of the targets."""

import numpy as np
import pytest
import torch

from medtriad.data.boxes import boxes_from_instances, boxes_from_mask, voxel_box_to_world
from medtriad.data.layout import Box, DatasetSpec, load_dataset, write_boxes_json
from medtriad.data.transforms import PlainCompose, intensity_transforms, load_sample, training_transforms
from medtriad.io import save_nifti


def _augmented(zoom_prob: float, n: int = 24, rotation_planes=None) -> list[torch.Tensor]:
    """``n`` augmented draws (the whole volume) of a 9x7x5 box in a 24^3 volume: the region masks."""
    regions = torch.zeros((1, 24, 24, 24), dtype=torch.float32)
    regions[0, 6:15, 8:15, 10:15] = 1
    data = {"image": regions.clone(), "regions": regions, "instances": regions.to(torch.int32),
            "foreground": regions}
    transforms = training_transforms((24, 24, 24), foreground_ratio=1.0, zoom_prob=zoom_prob,
                                     rotation_planes=rotation_planes)
    out = []
    for seed in range(n):
        transforms.set_random_state(seed=seed)
        out.append(torch.as_tensor(transforms(dict(data))[0]["regions"]))
    return out


def _draws(zoom_prob: float, n: int = 24) -> list[int]:
    """Foreground voxel counts of the box after ``n`` draws."""
    return [int(r.sum()) for r in _augmented(zoom_prob, n)]


def _extents(regions: torch.Tensor) -> tuple[int, ...]:
    """The box's extent along each axis."""
    return tuple(int(regions[0].any(dim=tuple(d for d in range(3) if d != axis)).sum()) for axis in range(3))


def test_zoom_off_keeps_object_size_exactly():
    """Without zoom the spatial augmentation only flips and rotates by 90 degrees: the size never changes; with
    zoom on every draw it does in most draws (``data.zoom_prob``)."""
    assert _draws(zoom_prob=0.0) == [9 * 7 * 5] * 24
    zoomed = _draws(zoom_prob=1.0)
    assert sum(c != 9 * 7 * 5 for c in zoomed) >= 12, zoomed


def test_rotation_planes_set_which_orientations_a_patch_takes():
    """By default 90-degree rotations turn the x-y plane only, so the box's z extent stays 5; with all three planes
    (``data.rotation_planes``) each of its three extents reaches the z axis, and the box never changes size."""
    default = {_extents(r) for r in _augmented(0.0, 32)}
    assert {e[2] for e in default} == {5}
    assert {e[0] for e in default} == {9, 7}
    every = _augmented(0.0, 48, rotation_planes=[(0, 1), (0, 2), (1, 2)])
    assert {_extents(r)[2] for r in every} == {9, 7, 5}
    assert {int(r.sum()) for r in every} == {9 * 7 * 5}
    with pytest.raises(ValueError, match="square"):
        training_transforms((24, 24, 16), 1.0, 0.0, rotation_planes=[(0, 2)])


def test_the_instance_map_follows_the_mask_through_crops_flips_rotations_and_zoom():
    """Box-aware augmentation: after every draw (crop, flips, 90-degree turns in all planes, zoom) the instance map,
    which the patch's boxes are read off, covers exactly the whole-tumour mask's voxels, and every id keeps its
    voxels (ids 1 and 2 stand for the lesions left and right of x = 20)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    mask = torch.from_numpy(gaussian_filter(rng.random((40, 40, 40)), 2.5) > 0.53)  # irregular lesions
    instances = torch.zeros(mask.shape, dtype=torch.int32)
    instances[:20][mask[:20]], instances[20:][mask[20:]] = 1, 2  # two lesion ids (split at x = 20)
    data = {"image": mask[None].float(), "regions": mask[None].float(), "instances": instances[None],
            "foreground": mask[None].float()}
    transforms = training_transforms((24, 24, 24), foreground_ratio=1.0, zoom_prob=1.0,
                                     rotation_planes=[(0, 1), (0, 2), (1, 2)])
    seen = 0
    for seed in range(16):
        transforms.set_random_state(seed=seed)
        out = transforms(dict(data))[0]
        ids, regions = torch.as_tensor(out["instances"])[0], torch.as_tensor(out["regions"])[0] > 0
        assert torch.equal(ids > 0, regions), seed
        assert set(torch.unique(ids).tolist()) <= {0, 1, 2}  # nearest-neighbour: no id blended into another
        seen += len(boxes_from_instances(ids))
    assert seen >= 16


def test_patches_are_plain_tensors_and_metadata_tracking_is_restored():
    """Training patches come out as plain tensors (a MetaTensor batch routes every layer of the forward pass through
    MONAI's ``__torch_function__``), with the same draws as MONAI's own Compose, and MONAI's global tracking switch
    is left as it was."""
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import Compose

    regions = torch.zeros((1, 24, 24, 24), dtype=torch.float32)
    regions[0, 6:15, 8:15, 10:15] = 1
    data = {"image": regions + 0.5, "regions": regions, "instances": regions.to(torch.int32), "foreground": regions}

    def build():
        return training_transforms((16, 16, 16), 1.0, 0.0, rotation_planes=[(0, 1), (0, 2), (1, 2)])

    plain, tracked = build(), Compose(build().transforms)  # separate transform objects: separate random streams
    assert get_track_meta()
    for seed in range(6):
        plain.set_random_state(seed=seed)
        tracked.set_random_state(seed=seed)
        out, reference = plain(dict(data))[0], tracked(dict(data))[0]
        assert get_track_meta()
        for key in ("image", "regions"):
            assert type(out[key]) is torch.Tensor
            assert isinstance(reference[key], MetaTensor)
            torch.testing.assert_close(out[key], reference[key].as_tensor())


def test_per_channel_draws_each_channel_on_its_own():
    """``PerChannel`` gives each channel its own gamma (MONAI's ``RandAdjustContrast`` alone draws one for all), and
    a seed gives the same draws again."""
    from monai.transforms import RandAdjustContrast, RandAdjustContrastd, RandGaussianSmooth

    from medtriad.data.transforms import PerChannel

    base = torch.rand(1, 8, 8, 8) + 0.1
    image = torch.cat([base, base, base])
    wrapped = PerChannel("image", RandAdjustContrast(prob=1.0, gamma=(0.5, 2.0)))
    shared = RandAdjustContrastd("image", prob=1.0, gamma=(0.5, 2.0))
    for seed in range(5):
        for t in (wrapped, shared):
            t.set_random_state(seed=seed)
        out, same = wrapped({"image": image})["image"], shared({"image": image})["image"]
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
        assert torch.allclose(same[0], same[1]) and torch.allclose(same[1], same[2])
        wrapped.set_random_state(seed=seed)
        assert torch.equal(wrapped({"image": image})["image"], out)
    never = PerChannel("image", RandAdjustContrast(prob=1.0, gamma=(0.5, 2.0)), prob=0.0)
    assert torch.equal(never({"image": image})["image"], image)
    # a probability per patch and one per channel: where anything changed, channel 0 was left alone in about a third
    # of the patches (1/3 expected; the wrapper and the wrapped transform seeded alike made it 0)
    twice = PerChannel("image", RandGaussianSmooth(prob=0.5), prob=0.5)
    changed = untouched = 0
    for seed in range(200):
        twice.set_random_state(seed=seed)
        out = twice({"image": image[:2]})["image"]
        if not torch.equal(out, image[:2]):
            changed += 1
            untouched += torch.equal(out[0], image[0])
    assert 50 <= changed <= 110 and 0.15 * changed <= untouched <= 0.5 * changed, (changed, untouched)


def test_strong_intensity_augmentation_keeps_masks_and_background():
    """``data.intensity_augmentation: strong`` in the training transforms: the patch's masks are those of the light
    profile with the same seed (intensity never moves a voxel), the three identical channels come out different in
    most patches (the light profile scales them together: never), and the background and a zero-filled (missing)
    channel stay zero, noise and shift included, as at inference (the light profile keeps the missing channel at zero
    too, and moves the background)."""
    torch.manual_seed(0)
    regions = torch.zeros((1, 24, 24, 24), dtype=torch.float32)
    regions[0, 6:15, 8:15, 10:15] = 1
    brain = torch.zeros(1, 24, 24, 24)
    brain[0, 5:18, 6:19, 8:20] = 1  # the patch reaches past it
    base = (torch.randn(1, 24, 24, 24) + 2 * regions) * brain
    image = torch.cat([base, base, base, torch.zeros_like(base)])
    data = {"image": image, "regions": regions, "instances": regions.to(torch.int32), "foreground": regions}

    def draws(kind: str) -> list[dict]:
        if kind == "none":  # the spatial transforms alone (they come first, so they get the same seeds)
            spatial = training_transforms((16, 16, 16), 1.0, 0.0).transforms[:-len(intensity_transforms("light"))]
            transforms = PlainCompose(spatial)
        else:
            transforms = training_transforms((16, 16, 16), 1.0, 0.0, intensity=kind)
        out = []
        for seed in range(40):
            transforms.set_random_state(seed=seed)
            out.append(transforms(dict(data))[0])
        return out

    strong, light, plain = draws("strong"), draws("light"), draws("none")
    moved = 0  # patches whose background the light profile moves (shift, noise); the strong one never does
    for s, l, n in zip(strong, light, plain):
        assert torch.equal(s["regions"], l["regions"]) and torch.equal(s["regions"], n["regions"])
        assert set(s) == set(l)
        background = n["image"][0] == 0
        assert 0 < int(background.sum()) < background.numel()
        moved += float(l["image"][:3, background].abs().max()) > 0
        assert float(s["image"][3].abs().max()) == 0.0
        assert float(s["image"][:3, background].abs().max()) == 0.0
        assert float(l["image"][3].abs().max()) == 0.0  # light too leaves a missing channel at zero
    assert moved >= 10

    def differ(d: dict) -> bool:  # channels 0 and 1 scaled apart (noise alone moves the ratio by about 0.002)
        return abs(float(d["image"][0].std() / d["image"][1].std()) - 1) > 0.02

    assert sum(map(differ, strong)) >= 12  # 20 of 40 here; about 60 % expected
    assert not any(map(differ, light))
    with pytest.raises(ValueError, match="light"):
        training_transforms((16, 16, 16), 1.0, 0.0, intensity="heavy")


@pytest.mark.parametrize("affine", [np.eye(4), np.diag([-1.0, -1.0, 1.0, 1.0])], ids=["RAS", "LPS"])
def test_instances_resample_onto_the_regions_voxels(tmp_path, affine):
    """At 1 mm -> 3 mm the lesion instances (the detection boxes' source) land on the same model voxels as the
    region masks, whatever the lesion's offset on the input grid: both take the input voxel under each output voxel's
    centre. (Taking the first input voxel an output voxel covers shifted them by one output voxel at some offsets.)"""
    spec = DatasetSpec(root=tmp_path, name="Grid", channel_names={0: "T1"}, labels={"background": 0, "tumour": 1},
                       regions={"WT": (1,)}, tasks={}, detection_region="WT", min_box_volume_mm3=0.0)
    spec.save()
    shape = (30, 30, 30)
    for offset in range(3):
        label = np.zeros(shape, np.uint8)
        label[6 + offset:18 + offset, 9 + offset:15 + offset, 3:21 + offset] = 1  # offsets on every axis
        label[24:27, 24:26, 24 + offset:29] = 1  # a second, small lesion
        save_nifti(spec.image_file(f"case{offset}", 0), np.ones(shape, np.float32), affine)
        save_nifti(spec.label_file(f"case{offset}"), label, affine)
    _, cases = load_dataset(tmp_path)
    assert len(cases) == 3
    for case in cases:
        sample = load_sample(case, spec, (3.0, 3.0, 3.0))
        assert sample.instances.shape == sample.regions.shape[1:] == (10, 10, 10)
        assert torch.equal(sample.instances > 0, sample.regions[0] > 0), case.case_id
        assert len(boxes_from_instances(sample.instances)) == 2


def test_the_boxes_file_is_the_training_truth_when_it_differs_from_the_mask(tmp_path):
    """Evaluation scores against boxes.json: training takes its boxes from the same file. Where the file holds the
    mask's components (as the importers write it) the components move with the patch, as without a file; where a
    user's box differs from them (here one hand-drawn box around both lesions) the training boxes are the file's."""
    spec = DatasetSpec(root=tmp_path, name="Boxes", channel_names={0: "T1"}, labels={"background": 0, "tumour": 1},
                       regions={"WT": (1,)}, tasks={}, detection_region="WT", min_box_volume_mm3=0.0)
    spec.save()
    label = np.zeros((12, 12, 12), np.uint8)
    label[1:4, 1:5, 2:6] = 1
    label[7:10, 6:11, 5:9] = 1
    for case in ("same", "user"):
        save_nifti(spec.image_file(case, 0), np.ones(label.shape, np.float32), np.eye(4))
        save_nifti(spec.label_file(case), label, np.eye(4))
    user = Box((1, 1, 2, 10, 11, 9), tuple(voxel_box_to_world(np.array([1, 1, 2, 10, 11, 9.0]), np.eye(4))), 0)
    write_boxes_json(tmp_path / "boxes.json", {"same": boxes_from_mask(label, np.eye(4), 0.0), "user": [user]})
    _, cases = load_dataset(tmp_path)
    same, hand = (load_sample(c, spec, (1.0, 1.0, 1.0)) for c in cases)
    assert torch.equal(same.instances > 0, same.regions[0] > 0)  # the components, not their boxes
    assert len(boxes_from_instances(same.instances)) == 2
    np.testing.assert_array_equal(boxes_from_instances(hand.instances), [[1, 1, 2, 10, 11, 9]])
    assert int((hand.instances > 0).sum()) == 9 * 10 * 7


def test_imported_brats_boxes_are_the_mask_components_so_training_moves_the_lesions(brats2018):
    """On the real BraTS cases the importer's boxes.json holds the whole tumour's components, so training keeps the
    lesion-shaped instance map (not painted boxes): the shipped recipe's detection targets are the tumour's."""
    dataset, _ = brats2018
    spec, cases = load_dataset(dataset)
    for case in cases[:2]:
        sample = load_sample(case, spec, (2.0, 2.0, 2.0))
        box = boxes_from_instances(sample.instances)[0]
        assert len(case.boxes) == 1 and int((sample.instances > 0).sum()) < 0.6 * float(np.prod(box[3:] - box[:3]))
