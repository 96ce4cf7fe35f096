import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtriad.data.boxes import instances_from_mask, voxel_box_to_world
from medtriad.data.importers import import_brats
from medtriad.data.layout import load_dataset
from medtriad.io import CaseFileError, load_nifti

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # tests/data/ -> repo -> its parent holds shared/
BRATS2018 = DATA / "brats2018-sample" / "MICCAI_BraTS_2018_Data_Training"
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_brats2018_cases_channels_and_grade(brats2018):
    out, _ = brats2018
    spec, cases = load_dataset(out)
    assert len(cases) == 10 and spec.num_training == 10
    assert spec.channel_names == {0: "FLAIR", 1: "T1", 2: "T1ce", 3: "T2"}
    assert spec.regions == {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    grades = [spec.tasks["grade"].classes[case.classes["grade"]] for case in cases]
    assert grades.count("HGG") == 8 and grades.count("LGG") == 2
    for case in cases:
        grade = grades[cases.index(case)]
        source = BRATS2018 / grade / case.case_id
        assert source.is_dir()
        assert all(path is not None for path in case.image_files.values())
        assert case.image_files[2].read_bytes() == (source / f"{case.case_id}_t1ce.nii.gz").read_bytes()
        assert case.label_file is not None


def test_brats2018_labels_are_uint8_copies(brats2018):
    out, _ = brats2018
    _, cases = load_dataset(out)
    for case in cases[:3]:
        label, affine = load_nifti(case.label_file)
        source, source_affine = load_nifti(next(BRATS2018.glob(f"*/{case.case_id}/{case.case_id}_seg.nii.gz")))
        assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(label, source)
        np.testing.assert_allclose(affine, source_affine)


def test_brats2018_boxes_enclose_whole_tumour(brats2018):
    out, _ = brats2018
    spec, cases = load_dataset(out)
    for case in cases:
        label, affine = load_nifti(case.label_file)
        instances = instances_from_mask(np.isin(label, spec.regions["WT"]), affine, 100.0)
        assert len(case.boxes) == instances.max() >= 1
        covered = np.zeros(label.shape, bool)
        for box in case.boxes:
            x0, y0, z0, x1, y1, z1 = (int(v) for v in box.voxel)
            covered[x0:x1, y0:y1, z0:z1] = True
            inside = np.isin(label[x0:x1, y0:y1, z0:z1], spec.regions["WT"])
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight
            np.testing.assert_allclose(box.world, voxel_box_to_world(np.array(box.voxel), affine))
        assert covered[instances > 0].all()


def test_brats2018_source_untouched(brats2018):
    _, before = brats2018
    assert snapshot(BRATS2018) == before


def test_reimport_and_refusals(brats2018, tmp_path):
    out, _ = brats2018
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        import_brats(BRATS2018, tmp_path, progress=False)
    with pytest.raises(ValueError, match="inside the source"):
        import_brats(BRATS2018, BRATS2018 / "out", progress=False)
    synthetic = write_brats2021_tree(tmp_path / "src2021")
    with pytest.raises(ValueError, match="holds dataset 'BraTS2018'"):
        import_brats(synthetic, out, progress=False)


def write_volume(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def write_brats2021_tree(src: Path) -> Path:
    """Two tiny cases: 2021 naming with enhancing tumour stored as 4, 2023 naming with 3."""
    rng = np.random.default_rng(0)
    seg = np.zeros((8, 9, 10), np.int16)
    seg[2:6, 2:6, 2:6] = 2
    seg[3:5, 3:5, 3:5] = 4
    for case, names, label in [
        ("BraTS2021_00001", ["flair", "t1", "t1ce", "t2"], seg),
        ("BraTS2021_00002", ["flair", "t1", "t1ce", "t2"], np.where(seg == 4, 1, seg)),
        ("BraTS-GLI-00003-000", ["t2f", "t1n", "t1c", "t2w"], np.where(seg == 4, 3, seg).astype(np.uint8)),
    ]:
        separator = "-" if case.startswith("BraTS-") else "_"
        for channel, name in enumerate(names):
            image = rng.normal(size=seg.shape).astype(np.float32) + channel
            write_volume(src / case / f"{case}{separator}{name}.nii.gz", image)
        write_volume(src / case / f"{case}{separator}seg.nii.gz", label)
    return src


def test_brats2021_style_import(tmp_path):
    src = write_brats2021_tree(tmp_path / "src")
    out = import_brats(src, tmp_path / "out", min_box_volume_mm3=10.0, progress=False)
    spec, cases = load_dataset(out)
    assert spec.name == "BraTS"  # 2021 and 2023 case names mixed
    assert spec.labels["enhancing_tumor"] == 3 and spec.regions == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    assert spec.tasks == {} and not (out / "classes.csv").exists()
    assert [c.case_id for c in cases] == ["BraTS-GLI-00003-000", "BraTS2021_00001", "BraTS2021_00002"]
    labels = {case.case_id: load_nifti(case.label_file)[0] for case in cases}
    np.testing.assert_array_equal(labels["BraTS2021_00001"], labels["BraTS-GLI-00003-000"])  # 4 mapped to 3
    assert set(np.unique(labels["BraTS2021_00001"]).tolist()) == {0, 2, 3}
    assert set(np.unique(labels["BraTS2021_00002"]).tolist()) == {0, 1, 2}
    flair = load_nifti(cases[0].image_files[0])[0]
    t2 = load_nifti(cases[0].image_files[3])[0]
    assert flair.mean() < t2.mean()  # channel 0 is t2f (FLAIR), channel 3 is t2w
    assert all(case.boxes and case.boxes[0].voxel == (2, 2, 2, 6, 6, 6) for case in cases)
    again = import_brats(src, out, min_box_volume_mm3=10.0, progress=False)  # same dataset: overwritten in place
    assert json.loads((again / "boxes.json").read_text()) == json.loads((out / "boxes.json").read_text())


def test_missing_or_corrupt_source_file_names_case_and_file(tmp_path):
    src = write_brats2021_tree(tmp_path / "src")
    t1 = src / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz"
    t1.unlink()
    with pytest.raises(CaseFileError, match="missing T1 file") as info:
        import_brats(src, tmp_path / "out1", progress=False)
    assert info.value.case_id == "BraTS2021_00002" and info.value.path == t1
    t1.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CaseFileError, match="cannot read") as info:
        import_brats(src, tmp_path / "out2", progress=False)
    assert info.value.case_id == "BraTS2021_00002" and info.value.path == t1


def test_a_file_on_another_grid_is_refused_with_case_and_file(tmp_path):
    """A channel of another shape, or a label with another affine, stops the import naming the case and file (the
    boxes, read off the label, would not fit the images), as `check` and training would refuse the case."""
    src = write_brats2021_tree(tmp_path / "src")
    t2 = src / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    write_volume(t2, np.zeros((8, 9, 11), np.float32))
    message = r"shape \(8, 9, 11\) differs from \(8, 9, 10\) of BraTS2021_00002_flair"
    with pytest.raises(CaseFileError, match=message) as info:
        import_brats(src, tmp_path / "out1", progress=False)
    assert info.value.case_id == "BraTS2021_00002" and info.value.path == t2
    write_volume(t2, np.zeros((8, 9, 10), np.float32))
    seg = src / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(seg).dataobj), np.diag([-1.0, -1.0, 1.5, 1.0])), seg)
    with pytest.raises(CaseFileError, match="affine .* differs from .* of BraTS2021_00001_flair") as info:
        import_brats(src, tmp_path / "out2", progress=False)
    assert info.value.case_id == "BraTS2021_00001" and info.value.path == seg


def test_unexpected_label_values_rejected(tmp_path):
    src = write_brats2021_tree(tmp_path / "src")
    seg_path = src / "BraTS-GLI-00003-000" / "BraTS-GLI-00003-000-seg.nii.gz"
    write_volume(seg_path, np.full((8, 9, 10), 5, np.uint8))
    with pytest.raises(CaseFileError, match=r"unexpected label values \[5\]") as info:
        import_brats(src, tmp_path / "out", progress=False)
    assert info.value.path == seg_path


def test_resection_cavity_of_the_2023_naming_is_refused(tmp_path):
    """In BraTS 2021 files 4 is enhancing tumour (mapped to 3); in the 2023+ naming it is BraTS 2024's resection
    cavity, which must not become enhancing tumour."""
    src = write_brats2021_tree(tmp_path / "src")
    seg_path = src / "BraTS-GLI-00003-000" / "BraTS-GLI-00003-000-seg.nii.gz"
    seg = load_nifti(seg_path)[0]
    write_volume(seg_path, np.where(seg == 3, 4, seg).astype(np.uint8))
    with pytest.raises(CaseFileError, match="resection cavity") as info:
        import_brats(src, tmp_path / "out", progress=False)
    assert info.value.path == seg_path


def test_unpacked_nii_sources_import_like_compressed_ones(tmp_path):
    """A release unpacked to .nii: found, stored as .nii.gz holding the same bytes once decompressed, and read back
    as the same data; the source stays .nii."""
    import gzip

    src = write_brats2021_tree(tmp_path / "src")
    reference = import_brats(src, tmp_path / "ref", min_box_volume_mm3=10.0, progress=False)
    case = src / "BraTS2021_00001"
    for path in sorted(case.glob("*.nii.gz")):
        nib.save(nib.load(path), path.with_name(path.name[:-3]))
        path.unlink()
    unpacked = snapshot(src)
    out = import_brats(src, tmp_path / "out", min_box_volume_mm3=10.0, progress=False)
    assert snapshot(src) == unpacked
    _, cases = load_dataset(out)
    _, expected = load_dataset(reference)
    for got, want in zip(cases, expected):
        for channel in range(4):
            np.testing.assert_array_equal(load_nifti(got.image_files[channel])[0],
                                          load_nifti(want.image_files[channel])[0])
        np.testing.assert_array_equal(load_nifti(got.label_file)[0], load_nifti(want.label_file)[0])
    flair = out / "imagesTr" / "BraTS2021_00001_0000.nii.gz"
    assert gzip.decompress(flair.read_bytes()) == (case / "BraTS2021_00001_flair.nii").read_bytes()


def test_hidden_and_archiver_folders_are_not_cases(tmp_path):
    """A notebook's ``.ipynb_checkpoints`` or a zip's ``__MACOSX`` beside the case folders is not a case, in both
    release styles (the 2018 style used to stop with "missing FLAIR file")."""
    src = write_brats2021_tree(tmp_path / "src2021")
    (src / "__MACOSX" / "BraTS2021_00001").mkdir(parents=True)
    out = import_brats(src, tmp_path / "out2021", min_box_volume_mm3=10.0, progress=False)
    assert len(load_dataset(out)[1]) == 3
    src2018 = tmp_path / "src2018"
    shutil.copytree(src / "BraTS2021_00001", src2018 / "HGG" / "BraTS2021_00001")
    (src2018 / "HGG" / ".ipynb_checkpoints").mkdir()
    (src2018 / "LGG" / "__MACOSX").mkdir(parents=True)
    out = import_brats(src2018, tmp_path / "out2018", min_box_volume_mm3=10.0, progress=False)
    spec, cases = load_dataset(out)
    assert [c.case_id for c in cases] == ["BraTS2021_00001"] and cases[0].classes == {"grade": 1}
