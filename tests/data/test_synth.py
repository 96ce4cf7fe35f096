"""The synthetic BraTS-like generator: anatomy, BraTS label structure, contrasts, grade cues, files on disk."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from medtriad.data.layout import load_dataset
from medtriad.data.synth import CHANNELS, generate_dataset, load_template, synth_case
from medtriad.io import load_nifti

SIZE = 64
NUM_CASES = 20
FLAIR, T1, T1CE, T2 = (CHANNELS.index(name) for name in ("FLAIR", "T1", "T1ce", "T2"))


@pytest.fixture(scope="module")
def template():
    return load_template(SIZE)


@pytest.fixture(scope="module")
def cases(template):
    return [synth_case(np.random.default_rng([7, i]), template) for i in range(NUM_CASES)]


def shell(mask: np.ndarray) -> np.ndarray:
    """Voxels just outside ``mask`` (face neighbours)."""
    return ndi.binary_dilation(mask) & ~mask


def test_template_holds_the_whole_brain_at_its_spacing(template):
    faces = [template.mask[i] for i in (0, -1)] + [template.mask[:, i] for i in (0, -1)]
    faces += [template.mask[:, :, i] for i in (0, -1)]
    assert not any(face.any() for face in faces), "brain touches the cube's border"
    assert np.allclose(np.abs(np.diag(template.affine)[:3]), template.spacing)
    brain_ml = template.mask.sum() * template.spacing**3 / 1000
    assert 1200 < brain_ml < 2200, f"implausible brain volume {brain_ml:.0f} ml"
    inside = template.mask > 0
    assert np.allclose((template.gm + template.wm + template.csf)[inside], 1.0, atol=1e-4)
    assert not (template.gm + template.wm + template.csf)[~inside].any()
    # The cube sits on MNI space: the brain's centre of mass is near the MNI origin (anterior commissure).
    centre = template.affine @ np.append(np.argwhere(inside).mean(0), 1.0)
    assert np.all(np.abs(centre[:3]) < 25), f"brain centre at {centre[:3]} mm"


def test_case_shapes_labels_and_tumour_inside_brain(cases):
    for index, (image, label, grade) in enumerate(cases):
        assert image.shape == (4, SIZE, SIZE, SIZE) and image.dtype == np.float32
        assert label.shape == (SIZE,) * 3 and label.dtype == np.uint8
        assert grade in (0, 1)
        assert set(np.unique(label)) <= {0, 1, 2, 4}
        brain = image[T1] > 0
        assert all(((image[ch] > 0) == brain).all() for ch in range(4)), f"case {index}: channels disagree on brain"
        whole = label > 0
        assert whole.any() and not (whole & ~brain).any(), f"case {index}: tumour outside the brain"
        share = whole.sum() / brain.sum()
        assert 0.005 < share < 0.15, f"case {index}: whole tumour is {share:.3f} of the brain"


def test_tumour_core_is_wrapped_in_oedema(cases):
    for index, (image, label, _) in enumerate(cases):
        core = np.isin(label, (1, 4))
        around = shell(core) & (image[T1] > 0)
        assert label[around].size and (label[around] == 2).mean() > 0.6, f"case {index}: core not inside oedema"


def rim_share(label: np.ndarray) -> float:
    """Share of the voxels around label 1 that enhance: ~1 when necrosis sits inside an enhancing rim."""
    necrosis = label == 1
    return float((label[shell(necrosis)] == 4).mean()) if necrosis.any() else 0.0


def test_hgg_shows_necrosis_in_an_enhancing_rim_more_often_than_lgg(cases):
    ring = np.array([rim_share(label) > 0.9 and (label == 4).sum() > 0 for _, label, _ in cases])
    grades = np.array([grade for _, _, grade in cases])
    assert 0 < grades.sum() < len(grades), "need both grades among the test cases"
    hgg_ring, lgg_ring = ring[grades == 1].mean(), ring[grades == 0].mean()
    assert hgg_ring >= 0.75 and lgg_ring <= 0.35, f"ring share HGG {hgg_ring:.2f}, LGG {lgg_ring:.2f}"


def test_contrasts_follow_mri_physics(template, cases):
    deep_wm = ndi.binary_erosion(template.wm > 0.9, iterations=2)  # white matter whatever the deformation
    for index, (image, label, _) in enumerate(cases):
        wm = deep_wm & ~ndi.binary_dilation(label > 0, iterations=3)
        oedema, enhancing, whole = label == 2, label == 4, label > 0
        mean = lambda channel, region: float(image[channel][region].mean())  # noqa: E731
        assert mean(FLAIR, oedema) > 1.2 * mean(FLAIR, wm), f"case {index}: oedema not bright on FLAIR"
        assert mean(T2, oedema) > 1.2 * mean(T2, wm), f"case {index}: oedema not bright on T2"
        assert mean(T1, whole) < mean(T1, wm), f"case {index}: tumour not hypointense on T1"
        if enhancing.sum() >= 30:
            assert mean(T1CE, enhancing) > 1.1 * mean(T1CE, wm), f"case {index}: no enhancement on T1ce"
            # The contrast agent brightens the rim on T1ce only, not on T1.
            assert mean(T1CE, enhancing) / mean(T1CE, wm) > mean(T1, enhancing) / mean(T1, wm)
    image, label, _ = cases[0]
    csf = (template.csf > 0.8) & (label == 0)
    gm = (template.gm > 0.8) & (label == 0)
    assert image[T2][csf].mean() > image[T2][gm].mean(), "CSF not bright on T2"
    assert image[FLAIR][csf].mean() < image[FLAIR][gm].mean(), "CSF not suppressed on FLAIR"


def test_same_seed_same_case_other_seed_other_case(template):
    first, again, other = (synth_case(np.random.default_rng(seed), template) for seed in (3, 3, 4))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert not np.array_equal(first[1], other[1]) and not np.allclose(first[0], other[0])


def test_generate_dataset_writes_a_consistent_dataset(tmp_path):
    root = generate_dataset(tmp_path / "synth", num_cases=3, size=48, seed=5, progress=False)
    spec, cases = load_dataset(root)
    assert spec.channel_names == dict(enumerate(CHANNELS))
    assert spec.labels == {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}
    assert spec.regions == {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    assert spec.tasks["grade"].classes == ("LGG", "HGG") and spec.detection_region == "WT"
    assert spec.num_training == len(cases) == 3
    template = load_template(48)
    for case in cases:
        label, affine = load_nifti(case.label_file, case.case_id)
        assert label.dtype == np.uint8 and np.allclose(affine, template.affine)
        for path in case.image_files.values():
            image, image_affine = load_nifti(path, case.case_id)
            assert image.dtype == np.float32 and image.shape == label.shape
            assert np.allclose(image_affine, affine) and image[label > 0].min() > 0
        assert case.classes["grade"] in (0, 1)
        components, count = ndi.label(label > 0, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(components.ravel())[1:] * template.spacing**3
        big = [i + 1 for i in range(count) if sizes[i] >= spec.min_box_volume_mm3]
        assert case.boxes is not None and len(case.boxes) == len(big), f"{case.case_id}: one box per WT component"
        for component in big:
            voxels = np.argwhere(components == component)
            assert any(
                np.all(voxels >= box.voxel[:3]) and np.all(voxels < box.voxel[3:]) for box in case.boxes
            ), f"{case.case_id}: WT component {component} not enclosed by any box"

    same = generate_dataset(tmp_path / "same", num_cases=1, size=48, seed=5, progress=False)
    other = generate_dataset(tmp_path / "other", num_cases=1, size=48, seed=6, progress=False)
    name = "imagesTr/SYNTH_000_0000.nii.gz"
    reference = load_nifti(root / name)[0]
    assert np.array_equal(load_nifti(same / name)[0], reference)
    assert not np.array_equal(load_nifti(other / name)[0], reference)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="size=8"):
        load_template(8)
    with pytest.raises(ValueError, match="num_cases=0"):
        generate_dataset(tmp_path, num_cases=0, progress=False)
