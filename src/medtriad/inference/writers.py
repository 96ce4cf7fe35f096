"""Prediction files: the mask as NIfTI in the input's own geometry, boxes and class probabilities as JSON.

Per case (all written atomically: a crash never leaves a half-written file):

    CASE_seg.nii.gz     label map, same shape / affine / orientation as the input channels
    CASE_boxes.json     [{"voxel": [x0,y0,z0,x1,y1,z1], "world": [...], "score": s, "label": 0}, ...]
    CASE_class.json     {task: {class or label: probability}}
    CASE_heatmap_TASK.nii.gz   slice2d models with heatmaps on: where the task looked, float in [0, 1], input geometry

and read back: :func:`row_from_files` (a case's row of ``predictions.csv``), :func:`remove_outputs`.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import numpy as np

from medtriad.inference.predictor import Prediction
from medtriad.io import load_nifti, save_nifti, write_json


def output_files(folder: str | Path, case_id: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"seg": folder / f"{case_id}_seg.nii.gz", "boxes": folder / f"{case_id}_boxes.json",
            "class": folder / f"{case_id}_class.json"}


def heatmap_file(folder: str | Path, case_id: str, task: str) -> Path:
    """Where a slice2d task's heatmap of a case goes."""
    return Path(folder) / f"{case_id}_heatmap_{task}.nii.gz"


def write_prediction(folder: str | Path, prediction: Prediction, heads: list[str],
                     reference_header: Any = None) -> dict[str, Path]:
    """Write the files of the heads the model has; returns what was written."""
    files = output_files(folder, prediction.case_id)
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = {}
    if "segmentation" in heads and prediction.mask is not None:
        save_nifti(files["seg"], prediction.mask, prediction.geometry.affine, reference_header)
        written["seg"] = files["seg"]
    if "detection" in heads:
        boxes = [{"voxel": [round(float(v), 3) for v in bv], "world": [round(float(v), 3) for v in bw],
                  "score": round(float(s), 5), "label": 0}
                 for bv, bw, s in zip(prediction.boxes_voxel, prediction.boxes_world, prediction.scores)]
        write_json(files["boxes"], {"case": prediction.case_id, "convention": "xyzxyz, voxel edges half-open; "
                                    "world = axis-aligned mm box of the voxel box in the image affine's space",
                                    "boxes": boxes})
        written["boxes"] = files["boxes"]
    if "classification" in heads:
        write_json(files["class"], prediction.probabilities)
        written["class"] = files["class"]
    for task, heatmap in prediction.heatmaps.items():
        path = heatmap_file(folder, prediction.case_id, task)
        save_nifti(path, heatmap.astype(np.float32), prediction.geometry.affine, reference_header)
        written[f"heatmap_{task}"] = path
    return written


def row_from_files(files: dict[str, Path], case_id: str, heads: list[str]) -> dict:
    """A case's row of ``predictions.csv``, read off its output files: number of boxes, best box score, tumour
    voxels, class probabilities (for a case just predicted and for one a rerun finds done alike)."""
    scores = [b["score"] for b in json.loads(files["boxes"].read_text())["boxes"]] if "detection" in heads else []
    row = {"case": case_id, "num_boxes": len(scores), "max_box_score": round(max(scores), 4) if scores else ""}
    if "segmentation" in heads:
        row["tumour_voxels"] = int((load_nifti(files["seg"], case_id)[0] > 0).sum())
    if "classification" in heads:
        for task, probs in json.loads(files["class"].read_text()).items():
            row.update({f"p_{task}_{c}": round(p, 4) for c, p in probs.items()})
    return row


def remove_outputs(out: Path, case_id: str) -> None:
    """Delete a case's output files, so that a failed case leaves none and the next call predicts it again."""
    heatmaps = heatmap_file(out, glob.escape(case_id), "*").name  # every task's
    for path in [*output_files(out, case_id).values(), *Path(out).glob(heatmaps)]:
        path.unlink(missing_ok=True)
