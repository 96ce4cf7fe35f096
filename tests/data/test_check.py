from pathlib import Path

import numpy as np
import pytest

from medtriad.data.check import Problem, check_dataset, format_problems
from medtriad.data.layout import Box, ClassificationTask, DatasetSpec, write_boxes_json, write_classes_csv
from medtriad.io import save_nifti

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (6, 7, 8)


def test_clean_real_dataset_has_no_problems(brats2018):
    problems = check_dataset(brats2018[0], progress=False)
    assert problems == [], format_problems(problems)
    assert format_problems(problems) == "No problems found."


def make_dataset(root: Path) -> DatasetSpec:
    """A tiny two-channel dataset: one clean case per defect plus a clean case, all broken at once."""
    spec = DatasetSpec(
        root=root,
        name="Tiny",
        channel_names={0: "FLAIR", 1: "T1"},
        labels={"background": 0, "tumour": 1, "enhancing": 4},
        regions={"WT": (1, 4)},
        tasks={"grade": ClassificationTask("grade", "binary", ("LGG", "HGG"))},
        detection_region="WT",
    )
    spec.save()
    rng = np.random.default_rng(0)
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:3, 1:3] = 4
    names = ["clean", "truncated", "shape", "affine", "nan", "label7", "noclass", "nochannel", "badbox"]
    for case in names:
        for channel in spec.channel_names:
            save_nifti(spec.image_file(case, channel), rng.normal(size=SHAPE).astype(np.float32), AFFINE)
        save_nifti(spec.label_file(case), label, AFFINE)
    write_classes_csv(root / "classes.csv", spec, {case: {"grade": 1} for case in names if case != "noclass"})
    box = Box((1, 1, 1, 3, 3, 3), (0, 0, 0, 1, 1, 1), 0, 8)
    outside = Box((4, 4, 4, 7, 7, 9), (0,) * 6)
    write_boxes_json(root / "boxes.json", {case: [box] for case in names} | {"badbox": [box, outside]})

    truncated = spec.image_file("truncated", 1)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    save_nifti(spec.image_file("shape", 1), np.zeros((6, 7, 9), np.float32), AFFINE)
    save_nifti(spec.image_file("affine", 0), np.zeros(SHAPE, np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    broken = rng.normal(size=SHAPE).astype(np.float32)
    broken[0, 0, 0] = np.nan
    save_nifti(spec.image_file("nan", 1), broken, AFFINE)
    seven = label.copy()
    seven[5, 5, 5] = 7
    save_nifti(spec.label_file("label7"), seven, AFFINE)
    spec.image_file("nochannel", 0).unlink()
    return spec


def test_every_defect_reported_with_case_and_file(tmp_path):
    spec = make_dataset(tmp_path)
    problems = check_dataset(tmp_path, progress=False)
    found = {(p.case_id, p.path.name) for p in problems}
    assert found == {
        ("truncated", "truncated_0001.nii.gz"),
        ("shape", "shape_0001.nii.gz"),
        ("affine", "affine_0001.nii.gz"),  # channel 0 is the reference, so channel 1 and the label differ
        ("affine", "affine.nii.gz"),
        ("nan", "nan_0001.nii.gz"),
        ("label7", "label7.nii.gz"),
        ("noclass", "classes.csv"),
        ("nochannel", "nochannel_0000.nii.gz"),
        ("badbox", "boxes.json"),
    }
    by_case = {p.case_id: p.message for p in problems}
    assert "cannot read" in by_case["truncated"]
    assert "(6, 7, 9)" in by_case["shape"]
    assert "non-finite" in by_case["nan"]
    assert "[7]" in by_case["label7"]
    assert "grade" in by_case["noclass"]
    assert "missing channel 0 (FLAIR)" in by_case["nochannel"]
    assert "box 1" in by_case["badbox"]
    report = format_problems(problems)
    assert report.startswith(f"{len(problems)} problem(s) found:")
    assert f"case label7, file {spec.label_file('label7')}: " in report


def test_allow_missing_channels(tmp_path):
    spec = make_dataset(tmp_path)
    spec.allow_missing_channels = True
    spec.save()
    cases = {p.case_id for p in check_dataset(tmp_path, progress=False)}
    assert "nochannel" not in cases and "truncated" in cases


def test_every_bad_row_of_classes_csv_is_a_problem(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "classes.csv").write_text("case,grade\nclean,HGG\nshape,MGG\nnan,HGG\naffine,high\n")
    problems = check_dataset(tmp_path, progress=False)
    assert len(problems) == 2 and all(p.case_id is None and "classes.csv" in p.message for p in problems)
    assert "row 3: grade = 'MGG'" in problems[0].message and "row 5: grade = 'high'" in problems[1].message
    assert format_problems(problems).startswith("2 problem(s) found:")


def test_dataset_level_problem(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    (problem,) = check_dataset(tmp_path, progress=False)
    assert problem.case_id is None and "dataset.json" in problem.message
    assert str(Problem(None, None, "x")) == "dataset: x"


def test_loading_a_label_with_nan_or_fractions_names_case_and_file(tmp_path):
    """`evaluate` and `predict` load cases without `check` first: a float label map holding NaN or 1.4 fails with
    the case and file named instead of being rounded (NaN to an arbitrary integer, 1.4 to 1)."""
    from medtriad.data.layout import load_dataset
    from medtriad.data.transforms import load_sample
    from medtriad.io import CaseFileError

    spec = make_dataset(tmp_path)
    _, cases = load_dataset(tmp_path)
    clean = next(c for c in cases if c.case_id == "clean")
    assert load_sample(clean, spec, (1.0, 1.0, 1.0)).label.max() == 4
    for value, message in [(np.nan, "NaN"), (1.4, "non-integer values")]:
        label = np.zeros(SHAPE, np.float32)
        label[1:3, 1:3, 1:3] = 4
        label[4, 4, 4] = value
        save_nifti(spec.label_file("clean"), label, AFFINE)
        with pytest.raises(CaseFileError, match=message) as info:
            load_sample(clean, spec, (1.0, 1.0, 1.0))
        assert info.value.case_id == "clean" and info.value.path == spec.label_file("clean")


def test_a_short_import_and_a_misnamed_label_file_are_reported(tmp_path):
    """An import that stopped part way leaves dataset.json with the full numTraining (nnU-Net checks it too); a label
    file under another name than CASE.nii.gz leaves its case silently unlabelled: both are reported."""
    spec = make_dataset(tmp_path)
    spec.num_training = 12
    spec.save()
    save_nifti(spec.labels_dir / "clean_seg.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    (spec.labels_dir / ".DS_Store").write_bytes(b"")  # hidden files are not label files
    problems = [p for p in check_dataset(tmp_path, progress=False) if p.case_id is None]
    assert [(p.path.name, p.message.split(":")[0]) for p in problems] == [
        ("dataset.json", "numTraining is 12 but imagesTr holds 9 case(s)"), ("clean_seg.nii.gz", "matches no case")]
    spec.num_training = 9
    spec.save()
    (spec.labels_dir / "clean_seg.nii.gz").unlink()
    assert [p for p in check_dataset(tmp_path, progress=False) if p.case_id is None] == []
