"""`medtriad predict`'s inputs: which cases it finds in a folder and what it names them (files need only exist)."""

from pathlib import Path

import pytest

from medtriad.inference.run import discover_cases

BRATS = ["FLAIR", "T1", "T1CE", "T2"]


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_case_folders_with_prefixed_or_bare_channel_names_and_the_output_folder_inside(tmp_path):
    touch(*(tmp_path / "cases" / "A01" / f"A01_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2")))
    touch(*(tmp_path / "cases" / "B02" / f"{s}.nii.gz" for s in ("t2f", "t1n", "t1c", "t2w")))  # bare 2023 names
    touch(tmp_path / "cases" / "preds" / "A01_seg.nii.gz")  # an earlier call's outputs, inside the input
    cases = discover_cases([tmp_path / "cases"], BRATS, exclude=tmp_path / "cases" / "preds")
    assert [c.case_id for c in cases] == ["A01", "B02"]
    assert [f.name for f in cases[0].files] == ["A01_flair.nii.gz", "A01_t1.nii.gz", "A01_t1ce.nii.gz", "A01_t2.nii.gz"]
    assert [f.name for f in cases[1].files] == ["t2f.nii.gz", "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz"]
    assert cases[1].folder == tmp_path / "cases" / "B02"


def test_two_case_folders_of_one_name_are_refused(tmp_path):
    for site in ("site1", "site2"):
        touch(*(tmp_path / site / "anat" / f"{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2")))
    with pytest.raises(ValueError, match="two case folders share the name 'anat'"):
        discover_cases([tmp_path], BRATS)


def test_dataset_and_images_folders(tmp_path):
    dataset = tmp_path / "Dataset001"
    (dataset / "imagesTs").mkdir(parents=True)  # empty, as nnU-Net datasets often ship it
    touch(*(dataset / "imagesTr" / f"case[1]_{c:04d}.nii.gz" for c in range(4)))  # a glob character in the id
    touch(*(dataset / "imagesTr" / f"case2_{c:04d}.nii.gz" for c in range(3)))  # channel 3 missing
    cases = discover_cases([dataset], BRATS)
    assert [c.case_id for c in cases] == ["case2", "case[1]"]
    assert cases[1].files == [dataset / "imagesTr" / f"case[1]_{c:04d}.nii.gz" for c in range(4)]
    assert cases[0].files[3] is None and cases[0].folder == dataset / "imagesTr"
    direct = discover_cases([dataset / "imagesTr"], BRATS)  # the images folder itself
    assert [(c.case_id, c.files) for c in direct] == [(c.case_id, c.files) for c in cases]
    with pytest.raises(ValueError, match="no cases found"):
        discover_cases([dataset / "imagesTs"], BRATS)


def test_one_case_given_as_files_is_named_after_the_file_or_its_folder(tmp_path):
    bare = [tmp_path / "case7" / f"{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2")]
    named = [tmp_path / "x" / f"BraTS_9_{c:04d}.nii.gz" for c in range(4)]
    touch(*bare, *named)
    assert discover_cases(bare, BRATS)[0].case_id == "case7"
    assert discover_cases(named, BRATS)[0].case_id == "BraTS_9"
    with pytest.raises(ValueError, match="one case needs 4 channel files"):
        discover_cases(bare[:3], BRATS)


def test_outputs_written_into_the_input_folder_and_one_case_folder_given_itself(tmp_path):
    """``-o`` equal to ``-i`` (outputs beside the case folders) still finds every case and takes no output file for
    one; a single case folder given as INPUT is that case, named after it."""
    cases = tmp_path / "cases"
    for case in ("A01", "A02"):
        touch(*(cases / case / f"{case}_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2")))
    touch(cases / "A01_seg.nii.gz")  # an earlier call's output, written beside the case folders
    assert [c.case_id for c in discover_cases([cases], BRATS, exclude=cases)] == ["A01", "A02"]
    assert [c.case_id for c in discover_cases([cases], BRATS, exclude=tmp_path)] == ["A01", "A02"]
    one = discover_cases([cases / "A02"], BRATS, exclude=tmp_path / "out")
    assert [(c.case_id, c.files[0].name) for c in one] == [("A02", "A02_flair.nii.gz")]
