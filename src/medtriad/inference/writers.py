"""Prediction files: the mask as NIfTI in the input's own geometry, boxes and class probabilities as JSON.

Per case (all written atomically: a crash never leaves a half-written file):

    CASE_seg.nii.gz     label map, same shape / affine / orientation as the input channels
    CASE_boxes.json     [{"voxel": [x0,y0,z0,x1,y1,z1], "world": [...], "score": s, "label": 0}, ...]
    CASE_class.json     {task: {class or label: probability}}
    CASE_heatmap_TASK.nii.gz   slice2d models with heatmaps on: where the task looked, float in [0, 1], input geometry
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medtriad.inference.predictor import Prediction
from medtriad.io import save_nifti, write_json


def output_files(folder: str | Path, case_id: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"seg": folder / f"{case_id}_seg.nii.gz", "boxes": folder / f"{case_id}_boxes.json",
            "class": folder / f"{case_id}_class.json"}


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
        path = Path(folder) / f"{prediction.case_id}_heatmap_{task}.nii.gz"
        save_nifti(path, heatmap.astype(np.float32), prediction.geometry.affine, reference_header)
        written[f"heatmap_{task}"] = path
    return written
