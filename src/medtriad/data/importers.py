"""Importers: public dataset releases -> the medtriad layout (medtriad.data.layout).

``import_brats`` reads a BraTS training release as distributed and writes imagesTr/labelsTr,
dataset.json, boxes.json (components of the whole tumour) and, for BraTS 2018, classes.csv with
the glioma grade. The source folder is only read: images are copied byte for byte (an uncompressed ``.nii`` is
gzip-compressed into ``.nii.gz``), label files are re-written as uint8 (the releases mix int16 and uint8).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medtriad.data.boxes import boxes_from_mask
from medtriad.data.layout import ClassificationTask, DatasetSpec, write_boxes_json, write_classes_csv
from medtriad.io import CaseFileError, atomic_copy, load_nifti, same_grid, save_nifti

__all__ = ["import_brats"]

#: BraTS channels in the imported order (channel index = position) and each one's file-name suffixes: BraTS
#: 2018-2021 names, then BraTS 2023 names (``medtriad predict`` finds a BraTS case's files by the same table)
BRATS_CHANNELS = {"FLAIR": ("flair", "t2f"), "T1": ("t1", "t1n"), "T1ce": ("t1ce", "t1c"), "T2": ("t2", "t2w")}
CHANNEL_NAMES = dict(enumerate(BRATS_CHANNELS))
_GRADES = ("LGG", "HGG")


@dataclass
class _SourceCase:
    case_id: str
    folder: Path
    grade: str | None  # BraTS 2018 only


def _modality_file(case: _SourceCase, names: tuple[str, ...]) -> Path | None:
    """``<case>_<name>`` (BraTS 2018-2021) or ``<case>-<name>`` (2023+), as .nii.gz or an unpacked .nii."""
    for name in names:
        for separator in ("_", "-"):
            for ending in (".nii.gz", ".nii"):
                path = case.folder / f"{case.case_id}{separator}{name}{ending}"
                if path.is_file():
                    return path
    return None


def _case_folders(parent: Path) -> list[Path]:
    """The sub-folders of ``parent`` that can be cases: not hidden (``.ipynb_checkpoints``) and not an archiver's
    (``__MACOSX``)."""
    return [f for f in sorted(parent.iterdir()) if f.is_dir() and not f.name.startswith((".", "__"))]


def _find_cases(src: Path) -> tuple[str, list[_SourceCase]]:
    """Detect the release style ("2018" with HGG/LGG folders, "2021" with case folders) and list its cases."""
    if any((src / grade).is_dir() for grade in _GRADES):
        cases = [
            _SourceCase(folder.name, folder, grade)
            for grade in _GRADES
            if (src / grade).is_dir()
            for folder in _case_folders(src / grade)
        ]
        style = "2018"
    else:
        cases = [_SourceCase(folder.name, folder, None) for folder in _case_folders(src)]
        style = "2021"
    if not cases:
        raise ValueError(
            f"{src}: no BraTS cases found; pass the folder holding HGG/ and LGG/ (BraTS 2018) "
            "or the case folders (BraTS 2021+)"
        )
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{src}: case ids appear in both HGG and LGG: {duplicates}")
    return style, cases


def _spec(out: Path, style: str, cases: list[_SourceCase], min_box_volume_mm3: float) -> DatasetSpec:
    if style == "2018":
        labels = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}
        tasks = {"grade": ClassificationTask("grade", "binary", _GRADES)}
        name = "BraTS2018"
    else:
        labels = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}
        tasks = {}
        # BraTS2021_00000 -> BraTS2021, BraTS-GLI-00000-000 -> BraTS-GLI; "BraTS" when the cases disagree
        prefixes = {re.sub(r"[_-]\d.*$", "", case.case_id) for case in cases}
        name = prefixes.pop() if len(prefixes) == 1 else "BraTS"
    core, enhancing = labels["necrotic_core"], labels["enhancing_tumor"]
    return DatasetSpec(
        root=out,
        name=name,
        channel_names=dict(CHANNEL_NAMES),
        labels=labels,
        regions={"WT": (core, labels["edema"], enhancing), "TC": (core, enhancing), "ET": (enhancing,)},
        tasks=tasks,
        detection_region="WT",
        min_box_volume_mm3=min_box_volume_mm3,
        num_training=len(cases),
    )


def _prepare_out(src: Path, out: Path, name: str) -> None:
    """Refuse to write into SRC, into a non-empty non-dataset folder, or over another dataset."""
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"output folder {out} is inside the source folder {src}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "dataset.json").is_file():
            raise ValueError(f"output folder {out} is not empty and holds no dataset.json; choose an empty folder")
        existing = DatasetSpec.load(out).name
        if existing != name:
            raise ValueError(f"output folder {out} holds dataset {existing!r}, not {name!r}; choose another folder")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)


def _read_label(path: Path, case_id: str, style: str) -> tuple[np.ndarray, np.ndarray]:
    """The label map as uint8 in the dataset's convention; BraTS 2021 files (``<case>_seg``) holding 4 for enhancing
    tumour get 4 -> 3. In the 2023+ naming (``<case>-seg``) 4 is BraTS 2024's resection cavity: refused."""
    label, affine = load_nifti(path, case_id)
    values = set(np.unique(label).tolist())
    allowed = {0, 1, 2, 4} if style == "2018" else {0, 1, 2, 3}
    if style == "2021" and 4 in values and path.name.startswith(f"{case_id}-"):
        raise CaseFileError(case_id, path, "label 4 in a BraTS 2023+ file is BraTS 2024's resection cavity, which "
                                           "this importer does not map (labels 0/1/2/3 expected)")
    if style == "2021" and 4 in values:
        if 3 in values:
            raise CaseFileError(case_id, path, "label file holds both 3 and 4 (enhancing tumour); cannot map 4 -> 3")
        label = np.where(label == 4, 3, label)
        values = (values - {4}) | {3}
    if not values <= allowed:
        message = f"unexpected label values {sorted(values - allowed)}; expected {sorted(allowed)}"
        raise CaseFileError(case_id, path, message)
    return label.astype(np.uint8), affine


def import_brats(
    src: str | os.PathLike, out: str | os.PathLike, min_box_volume_mm3: float = 100.0, progress: bool = True
) -> Path:
    """Import a BraTS training release from ``src`` into the medtriad dataset folder ``out``.

    BraTS 2018 style: ``src/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``, labels 0/1/2/4,
    task "grade" (LGG/HGG) from the parent folder. BraTS 2021+ style: ``src/<case>/`` with
    ``<case>_{flair,t1,t1ce,t2,seg}`` (2021) or ``<case>-{t2f,t1n,t1c,t2w,seg}`` (2023), labels
    0/1/2/3 (a 2021 file holding 4 for enhancing tumour is mapped to 3; a 4 in a 2023-named file, BraTS 2024's
    resection cavity, is refused), no classification task. Files are .nii.gz or unpacked .nii.
    Channels: 0 FLAIR, 1 T1, 2 T1ce, 3 T2. A case without seg file gets no label and no boxes.
    ``out`` must be empty, absent, or an earlier import of the same dataset (files are overwritten).
    Raises CaseFileError naming case and file for missing or unreadable source files, and for a channel or label
    file whose shape or affine differs from the case's first channel.
    Returns ``out`` as a Path.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"source folder {src} does not exist")
    style, cases = _find_cases(src)
    spec = _spec(out, style, cases, min_box_volume_mm3)
    _prepare_out(src, out, spec.name)
    spec.save()  # first, so an interrupted import can be resumed into the same folder
    boxes, classes = {}, {}
    for case in tqdm(cases, desc=f"import {spec.name}", unit="case", disable=not progress):
        grid = None  # the first channel's (path, shape, affine): every channel and the label must share it
        for channel, names in enumerate(BRATS_CHANNELS.values()):
            path = _modality_file(case, names)
            if path is None:
                expected = case.folder / f"{case.case_id}_{names[0]}.nii.gz"
                raise CaseFileError(case.case_id, expected, f"missing {CHANNEL_NAMES[channel]} file (also looked "
                                                            f"for {case.case_id}-{names[1]}.nii.gz and .nii files)")
            data, affine = load_nifti(path, case.case_id)  # reads everything: corrupt or truncated files fail here
            grid = same_grid(case.case_id, path, data.shape, affine, grid)
            atomic_copy(path, spec.image_file(case.case_id, channel), compress=path.suffix == ".nii")
        seg = _modality_file(case, ("seg",))
        if seg is not None:
            label, affine = _read_label(seg, case.case_id, style)
            same_grid(case.case_id, seg, label.shape, affine, grid)  # else its boxes would not fit the images
            save_nifti(spec.label_file(case.case_id), label, affine, nib.load(seg).header)
            wt = np.isin(label, spec.regions[spec.detection_region])
            boxes[case.case_id] = boxes_from_mask(wt, affine, min_box_volume_mm3)
        if case.grade is not None:
            classes[case.case_id] = {"grade": _GRADES.index(case.grade)}
    write_boxes_json(out / "boxes.json", boxes)
    if spec.tasks:
        write_classes_csv(out / "classes.csv", spec, classes)
    return out
