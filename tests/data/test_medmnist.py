"""MedMNIST 3D import: layout, official split sizes and labels (real AdrenalMNIST3D when present)."""

import json
from pathlib import Path

import numpy as np
import pytest

from medtriad.data.layout import load_dataset
from medtriad.data.medmnist import import_medmnist
from medtriad.io import load_nifti

MEDMNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist3d"


def _fake_npz(path: Path, labels_max: int = 1) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 6, 7, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, labels_max + 1, (n, 1), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def test_import_synthetic_multiclass(tmp_path):
    out = import_medmnist(_fake_npz(tmp_path / "fracturemnist3d.npz", labels_max=2), tmp_path / "out")
    spec, cases = load_dataset(out)
    assert spec.tasks["label"].kind == "multiclass" and spec.tasks["label"].classes == ("0", "1", "2")
    assert [c.case_id for c in cases][:2] == ["test_0000", "test_0001"] and len(cases) == 10
    data, affine = load_nifti(cases[0].image_files[0])
    assert data.shape == (6, 7, 8) and data.dtype == np.uint8
    np.testing.assert_array_equal(affine, np.eye(4))
    with pytest.raises(ValueError, match="not empty"):
        import_medmnist(tmp_path / "fracturemnist3d.npz", out)


def test_import_real_adrenalmnist3d(tmp_path):
    npz = MEDMNIST / "adrenalmnist3d.npz"
    if not npz.is_file():
        pytest.skip(f"real MedMNIST data not found at {npz}")
    out = import_medmnist(npz, tmp_path / "adrenal")
    splits = json.loads((out / "splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 1188, "val": 98, "test": 298}
    assert splits["train"][1] == "train_0001"
    spec, cases = load_dataset(out)
    assert spec.channel_names == {0: "CT"} and spec.tasks["label"].kind == "binary"
    assert spec.tasks["label"].classes == ("normal", "adrenal_mass")
    assert len(cases) == 1188 + 98 + 298
    with np.load(npz) as raw:
        by_id = {c.case_id: c for c in cases}
        for split in ("train", "val", "test"):
            labels = raw[f"{split}_labels"].reshape(-1)
            assert [by_id[i].classes["label"] for i in splits[split]] == labels.tolist()
        data, _ = load_nifti(by_id["val_0007"].image_files[0])
        np.testing.assert_array_equal(data, raw["val_images"][7])
    train = [by_id[i].classes["label"] for i in splits["train"]]
    assert (train.count(0), train.count(1)) == (929, 259)
