import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

import medtriad.io as mio
from medtriad.io import CaseFileError, atomic_write_bytes, load_nifti, save_nifti, write_json

AFFINE = np.array([[-1.0, 0, 0, 5], [0, -1.0, 0, 239], [0, 0, 2.0, 0], [0, 0, 0, 1]])


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_json(path, {"epoch": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(mio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b'{"epoch": 2}')
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # temp file removed


def test_atomic_writes_flush_the_folder_after_the_rename(tmp_path, monkeypatch):
    """The rename that makes a write visible is a change of its folder: the folder is flushed after it (as
    checkpoints always did), for JSON files and NIfTI masks alike (``predict``'s outputs)."""
    events = []
    replace, fsync_path = mio.os.replace, mio.fsync_path
    monkeypatch.setattr(mio.os, "replace", lambda a, b: (events.append(("replace", b)), replace(a, b)))
    monkeypatch.setattr(mio, "fsync_path", lambda p: (events.append(("fsync", p)), fsync_path(p)))
    write_json(tmp_path / "a.json", {"x": 1})
    assert events[-2:] == [("replace", tmp_path / "a.json"), ("fsync", tmp_path)]
    save_nifti(tmp_path / "m.nii.gz", np.zeros((2, 2, 2), np.uint8), AFFINE)
    assert events[-2:] == [("replace", tmp_path / "m.nii.gz"), ("fsync", tmp_path)]


def test_write_json_replaces_and_uses_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": [1, 2]})
    write_json(path, {"x": [3]})
    assert json.loads(path.read_text()) == {"x": [3]}
    assert path.read_text().endswith("\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_nifti_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "mask.nii.gz"
    save_nifti(path, np.ones((3, 4, 5), np.uint8), AFFINE)

    def broken_save(image, filename):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(mio.nib, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_nifti(path, np.zeros((3, 4, 5), np.uint8), AFFINE)
    data, _ = load_nifti(path)
    assert data.sum() == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_save_nifti_keeps_reference_codes_and_array_dtype(tmp_path):
    reference = nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), AFFINE)
    reference.set_qform(AFFINE, code=1)
    reference.set_sform(AFFINE, code=4)
    array = (np.arange(60).reshape(3, 4, 5) % 3).astype(np.uint8)
    save_nifti(tmp_path / "out.nii.gz", array, AFFINE, reference.header)
    written = nib.load(tmp_path / "out.nii.gz")
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
    assert written.get_data_dtype() == np.uint8
    data, affine = load_nifti(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(data, array)
    np.testing.assert_allclose(affine, AFFINE)


def test_save_nifti_rejects_other_extensions(tmp_path):
    with pytest.raises(ValueError, match="out.nrrd"):
        save_nifti(tmp_path / "out.nrrd", np.zeros((2, 2, 2)), AFFINE)


def test_load_nifti_truncated_file_names_case_and_file(tmp_path):
    path = tmp_path / "case7_0000.nii.gz"
    save_nifti(path, np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), AFFINE)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseFileError) as info:
        load_nifti(path, "case7")
    error = info.value
    assert error.case_id == "case7" and error.path == path
    assert str(error).startswith(f"case case7, file {path}: ")
    assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize(
    "content, reason",
    [(None, "not found"), (b"not a nifti file at all", "cannot read"), (gzip.compress(b"\0" * 400), "cannot read")],
)
def test_load_nifti_missing_or_corrupt(tmp_path, content, reason):
    path = tmp_path / "x.nii.gz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CaseFileError, match=reason):
        load_nifti(path, "c1")


def test_load_nifti_squeezes_trailing_singletons_and_rejects_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4, 1), np.float64), AFFINE), tmp_path / "a.nii.gz")
    data, _ = load_nifti(tmp_path / "a.nii.gz")
    assert data.shape == (2, 3, 4) and data.dtype == np.float32
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4, 2), np.float32), AFFINE), tmp_path / "b.nii.gz")
    with pytest.raises(CaseFileError, match=r"expected 3D data, got shape \(2, 3, 4, 2\)"):
        load_nifti(tmp_path / "b.nii.gz", "c2")


def test_load_nifti_keeps_integer_dtype(tmp_path):
    save_nifti(tmp_path / "l.nii.gz", np.full((2, 2, 2), 4, np.int16), AFFINE)
    data, _ = load_nifti(tmp_path / "l.nii.gz")
    assert data.dtype == np.int16 and (data == 4).all()


def test_save_nifti_on_the_reference_grid_keeps_its_own_qform_and_sform(tmp_path):
    """A registration tool may leave an image's qform and sform different; a mask written on that image's grid keeps
    both as they are, so each viewer places it where it places the image (the qform used to become the sform)."""
    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    qform[:3, 3] = (-10, -20, 5)
    sform = AFFINE.copy()
    reference = nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), sform)
    reference.set_qform(qform, code=1)
    reference.set_sform(sform, code=2)
    save_nifti(tmp_path / "mask.nii.gz", np.ones((3, 4, 5), np.uint8), reference.affine, reference.header)
    written = nib.load(tmp_path / "mask.nii.gz").header
    np.testing.assert_allclose(written.get_qform(), qform)
    np.testing.assert_allclose(written.get_sform(), sform)
    assert int(written["qform_code"]) == 1 and int(written["sform_code"]) == 2
    other = np.diag([4.0, 4.0, 4.0, 1.0])  # another grid (e.g. the model's): both become its affine
    save_nifti(tmp_path / "coarse.nii.gz", np.ones((2, 2, 3), np.uint8), other, reference.header)
    written = nib.load(tmp_path / "coarse.nii.gz").header
    np.testing.assert_allclose(written.get_qform(), other)
    np.testing.assert_allclose(written.get_sform(), other)
