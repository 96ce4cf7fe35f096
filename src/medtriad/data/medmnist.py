"""MedMNIST 3D (.npz, Yang et al., "MedMNIST v2", Scientific Data 2023) -> the medtriad dataset layout.

One NIfTI per case (``imagesTr/{split}_{index:04d}_0000.nii.gz``, index 0-based into that split's arrays, uint8 as
released, array axes kept in the stored order, 1 mm isotropic identity affine), ``classes.csv`` with one task from the
label (binary for two classes, multiclass otherwise), ``dataset.json`` and ``splits.json`` {"train", "val", "test"}
with the official splits. Select models on val only; report test once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medtriad.data.layout import ClassificationTask, DatasetSpec, write_classes_csv
from medtriad.io import save_nifti, write_json

__all__ = ["import_medmnist", "SPLITS"]

SPLITS = ("train", "val", "test")
_CLASS_NAMES = {
    "adrenalmnist3d": ("normal", "adrenal_mass"),
    "vesselmnist3d": ("healthy", "aneurysm"),
    "nodulemnist3d": ("benign", "malignant"),
    "synapsemnist3d": ("inhibitory", "excitatory"),
}


def import_medmnist(npz_path: str | os.PathLike, out_dir: str | os.PathLike, task: str = "label",
                    channel_name: str = "CT", class_names: tuple[str, ...] | None = None,
                    progress: bool = False) -> Path:
    """Write the MedMNIST 3D file ``npz_path`` as a medtriad dataset in ``out_dir`` (empty or absent).

    Args:
        task: name of the classification task.
        channel_name: the one channel's name in dataset.json ("CT"; e.g. "MRA" for VesselMNIST3D).
        class_names: names of the label values 0..K-1; default from the dataset name (e.g. adrenalmnist3d:
            normal, adrenal_mass), else "0", "1", ...

    Returns ``out_dir`` as a Path. Raises ValueError naming the file for a missing key or bad arrays.
    """
    npz_path, out = Path(npz_path), Path(out_dir)
    if not npz_path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {npz_path}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} is not empty; choose an empty or new folder")
    with np.load(npz_path) as data:
        arrays = {}
        for split in SPLITS:
            for kind in ("images", "labels"):
                key = f"{split}_{kind}"
                if key not in data:
                    raise ValueError(f"{npz_path}: missing array {key!r}; expected {[f'{s}_images' for s in SPLITS]}")
                arrays[key] = data[key]
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"{npz_path}: {split}_images must be (N, D, H, W) with one label each, got "
                             f"{images.shape} and {len(labels)} labels (a 2D MedMNIST file?)")
    num_classes = int(max(arrays[f"{s}_labels"].max() for s in SPLITS)) + 1
    name = npz_path.name.removesuffix(".npz")
    names = class_names or _CLASS_NAMES.get(name.split("_")[0]) or tuple(str(i) for i in range(max(2, num_classes)))
    if len(names) < num_classes:
        raise ValueError(f"{npz_path}: labels go up to {num_classes - 1} but only {len(names)} class names given")
    kind = "binary" if len(names) == 2 else "multiclass"
    total = sum(len(arrays[f"{s}_labels"]) for s in SPLITS)
    spec = DatasetSpec(root=out, name=name, channel_names={0: channel_name}, labels={"background": 0}, regions={},
                       tasks={task: ClassificationTask(task, kind, tuple(names))}, num_training=total)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    spec.save()
    affine = np.eye(4)
    splits: dict[str, list[str]] = {}
    classes = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        ids = [f"{split}_{i:04d}" for i in range(len(images))]
        for case_id, image, label in tqdm(list(zip(ids, images, labels)), desc=f"import {name} {split}",
                                          disable=not progress):
            save_nifti(spec.image_file(case_id, 0), np.ascontiguousarray(image), affine)
            classes[case_id] = {task: int(label)}
        splits[split] = ids
    write_classes_csv(out / "classes.csv", spec, classes)
    write_json(out / "splits.json", splits)
    return out
