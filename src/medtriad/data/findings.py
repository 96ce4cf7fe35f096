"""Multi-label "findings" derived from BraTS ground truth: a real multilabel task for the classification heads.

Per case with a label map, five 0/1 findings (in :data:`FINDINGS` order):

- ``necrosis``: necrotic / non-enhancing core present (label 1);
- ``enhancement``: enhancing tumour present (label 4 in BraTS 2018, 3 in 2021+; read from dataset.json);
- ``multifocal``: more than one whole-tumour component of at least ``min_component_mm3`` (26-connectivity, as the
  detection boxes);
- ``crosses_midline``: whole-tumour voxels on both sides of the mid-sagittal plane (see ``midline`` below);
- ``large_edema``: oedema volume (mm^3) above the median over the dataset's labelled cases.

Mid-sagittal plane. The plane is x = 0 in world coordinates when that plane cuts through the image. BraTS files do
not honour this: their affine is diag(-1, -1, 1) with the origin at a corner, so world x runs from -239 to 0 and
x = 0 is the image's edge; there ``midline="auto"`` uses the world x of the image centre instead (the SRI24 volumes
are centred on the brain). ``midline="world"`` forces x = 0, ``midline="center"`` forces the centre.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from medtriad.data.layout import ClassificationTask, DatasetSpec, load_dataset, read_classes_csv, write_classes_csv
from medtriad.io import load_nifti

__all__ = ["FINDINGS", "brats_findings", "add_findings_task"]

FINDINGS = ("necrosis", "enhancement", "multifocal", "crosses_midline", "large_edema")


def _label_value(spec: DatasetSpec, names: tuple[str, ...]) -> int:
    for name in names:
        if name in spec.labels:
            return spec.labels[name]
    raise ValueError(f"{spec.root / 'dataset.json'}: no label named one of {names}; labels are {spec.labels}")


def _midline_x(affine: np.ndarray, shape: tuple[int, ...], midline: str) -> float:
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    xs = (corners @ affine.T)[:, 0]
    centre = float((xs.min() + xs.max()) / 2)
    if midline == "center":
        return centre
    inside = xs.min() < 0 < xs.max()
    if midline == "world":
        return 0.0
    return 0.0 if inside and min(-xs.min(), xs.max()) > 0.1 * (xs.max() - xs.min()) else centre


def brats_findings(dataset_dir: str | os.PathLike, min_component_mm3: float = 100.0,
                   midline: Literal["auto", "world", "center"] = "auto") -> dict[str, tuple[int, ...]]:
    """{case: (necrosis, enhancement, multifocal, crosses_midline, large_edema)} for every case with a label map.

    ``dataset_dir`` is an imported BraTS dataset (medtriad layout, labels named necrotic_core / edema /
    enhancing_tumor as medtriad.data.importers writes them). Cases without labels are left out.
    """
    if midline not in ("auto", "world", "center"):
        raise ValueError(f"midline must be 'auto', 'world' or 'center', got {midline!r}")
    spec, cases = load_dataset(dataset_dir)
    necrotic = _label_value(spec, ("necrotic_core", "NCR", "necrosis"))
    edema = _label_value(spec, ("edema", "ED", "oedema"))
    enhancing = _label_value(spec, ("enhancing_tumor", "ET", "enhancing"))
    partial: dict[str, list[int]] = {}
    edema_mm3: dict[str, float] = {}
    structure = np.ones((3, 3, 3), dtype=bool)
    for case in cases:
        if case.label_file is None:
            continue
        label, affine = load_nifti(case.label_file, case.case_id)
        voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
        wt = np.isin(label, (necrotic, edema, enhancing))
        components, n = ndimage.label(wt, structure=structure)
        sizes = np.bincount(components.ravel())[1:] * voxel_mm3 if n else np.zeros(0)
        crosses = 0
        if wt.any():
            x = affine[0, :3] @ np.argwhere(wt).T + affine[0, 3]
            plane = _midline_x(affine, label.shape, midline)
            crosses = int(x.min() < plane < x.max())
        partial[case.case_id] = [int((label == necrotic).any()), int((label == enhancing).any()),
                                 int((sizes >= min_component_mm3).sum() > 1), crosses]
        edema_mm3[case.case_id] = float((label == edema).sum()) * voxel_mm3
    if not partial:
        return {}
    median = float(np.median(list(edema_mm3.values())))
    return {case: (*values, int(edema_mm3[case] > median)) for case, values in partial.items()}


def add_findings_task(dataset_dir: str | os.PathLike, task: str = "findings", **kwargs) -> dict[str, tuple[int, ...]]:
    """Add the multilabel task ``task`` (classes :data:`FINDINGS`) to dataset.json and its values to classes.csv.

    Existing tasks and values are kept; an earlier findings task of the same name is recomputed, another task of that
    name is refused (its labels could not be recovered). Cases without a label map
    get empty (unknown) findings. ``kwargs`` go to :func:`brats_findings`. Returns the findings.
    """
    root = Path(dataset_dir)
    spec, cases = load_dataset(root)
    earlier = spec.tasks.get(task)
    if earlier is not None and (earlier.kind, earlier.classes) != ("multilabel", FINDINGS):
        raise ValueError(f"{root / 'dataset.json'}: task {task!r} exists as a {earlier.kind} task "
                         f"{list(earlier.classes)}; replacing it would lose its labels: choose another name (--task)")
    findings = brats_findings(root, **kwargs)
    classes_path = root / "classes.csv"
    classes = read_classes_csv(classes_path, spec) if classes_path.is_file() else {}
    spec.tasks[task] = ClassificationTask(task, "multilabel", FINDINGS)
    for case in cases:
        classes.setdefault(case.case_id, dict.fromkeys(spec.tasks))
    for case_id, values in classes.items():
        values[task] = findings.get(case_id)
    spec.save()  # first: a classes.csv without the new task's columns stays valid (unknown), the reverse does not
    write_classes_csv(classes_path, spec, classes)
    return findings
