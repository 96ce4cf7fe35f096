"""Dataset integrity check (``medtriad check DATASET``): every problem, each named with case and file.

Training on a dataset with one truncated file fails hours in; this check reads every file once,
up front, and lists all problems at once so they can be fixed in one pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medtriad.data.layout import Case, DatasetSpec, load_dataset
from medtriad.io import CaseFileError, grid_difference, load_nifti

__all__ = ["Problem", "check_dataset", "format_problems"]


@dataclass
class Problem:
    """One thing wrong with a dataset; ``case_id``/``path`` are None for dataset-wide problems."""

    case_id: str | None
    path: Path | None
    message: str

    def __str__(self) -> str:
        where = [f"case {self.case_id}" if self.case_id else "", f"file {self.path}" if self.path else ""]
        return f"{', '.join(w for w in where if w) or 'dataset'}: {self.message}"


def _check_case(spec: DatasetSpec, case: Case) -> list[Problem]:
    problems: list[Problem] = []
    cid = case.case_id
    present = {channel: path for channel, path in case.image_files.items() if path is not None}
    missing = [channel for channel in spec.channel_names if channel not in present]
    if missing and (not spec.allow_missing_channels or not present):
        problems += [
            Problem(cid, spec.image_file(cid, c), f"missing channel {c} ({spec.channel_names[c]})") for c in missing
        ]
    reference: tuple[Path, tuple[int, ...], np.ndarray] | None = None  # first readable file: path, shape, affine
    files = [(path, False) for _, path in sorted(present.items())]
    if case.label_file is not None:
        files.append((case.label_file, True))
    for path, is_label in files:
        try:
            data, affine = load_nifti(path, cid)
        except CaseFileError as error:
            problems.append(Problem(cid, path, error.reason))
            continue
        if reference is None:
            reference = (path, data.shape, affine)
        elif (difference := grid_difference(data.shape, affine, reference)) is not None:
            problems.append(Problem(cid, path, difference))
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            problems.append(Problem(cid, path, f"{int((~np.isfinite(data)).sum())} non-finite values (NaN/inf)"))
        if is_label:
            allowed = np.array(sorted(spec.labels.values()))
            unknown = np.unique(data[~np.isin(data, allowed)])
            if unknown.size:
                message = f"label values {unknown.tolist()} are not in dataset.json labels {allowed.tolist()}"
                problems.append(Problem(cid, path, message))
    for task, value in case.classes.items():
        if value is None:
            problems.append(Problem(cid, spec.root / "classes.csv", f"no value for classification task {task!r}"))
    if case.boxes and reference is not None:
        shape = np.array(reference[1])
        for index, box in enumerate(case.boxes):
            voxel = np.array(box.voxel)
            if (voxel[:3] < 0).any() or (voxel[3:] > shape).any():
                message = f"box {index} {list(box.voxel)} is outside the image {tuple(shape)}"
                problems.append(Problem(cid, spec.root / "boxes.json", message))
    return problems


def check_dataset(root: str | os.PathLike, progress: bool = True) -> list[Problem]:
    """Check a dataset folder and return every problem found (empty list = clean).

    Per case: all channels present (at least one if allow_missing_channels), each file readable
    and 3D, the same shape and affine (atol 1e-3) across channels and label, finite values, label
    values declared in dataset.json, a known value for every classification task, boxes inside
    the image. Per dataset: numTraining (when given) equals the number of cases, and every file in labelsTr belongs
    to a case. An unreadable dataset.json, classes.csv or boxes.json, or a stray file in imagesTr,
    is reported alone since the cases cannot be listed without them (classes.csv: every bad row).
    """
    root = Path(root)
    try:
        spec, cases = load_dataset(root)
    except (OSError, ValueError) as error:
        return [Problem(None, None, line) for line in str(error).splitlines()]  # a problem per line (classes.csv rows)
    if not cases:
        return [Problem(None, spec.images_dir, "no cases found")]
    problems = []
    if spec.num_training and spec.num_training != len(cases):  # e.g. an import that stopped part way
        problems.append(Problem(None, spec.root / "dataset.json",
                                f"numTraining is {spec.num_training} but imagesTr holds {len(cases)} case(s)"))
    if spec.labels_dir.is_dir():  # a label file under another name would leave its case silently unlabelled
        expected = {spec.label_file(case.case_id).name for case in cases}
        for path in sorted(spec.labels_dir.iterdir()):
            if not path.name.startswith(".") and path.name not in expected:
                problems.append(Problem(None, path, f"matches no case: label files are named CASE{spec.file_ending} "
                                                    f"after a case in imagesTr"))
    for case in tqdm(cases, desc=f"check {spec.name}", unit="case", disable=not progress):
        problems += _check_case(spec, case)
    return problems


def format_problems(problems: list[Problem]) -> str:
    """A human-readable report: one line per problem, or a line saying the dataset is clean."""
    if not problems:
        return "No problems found."
    return "\n".join([f"{len(problems)} problem(s) found:", *(f"- {problem}" for problem in problems)])
