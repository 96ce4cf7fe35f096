"""Evaluate a model on cases: per-case rows and a summary for all three tasks.

Used for validation every epoch and by ``medtriad evaluate``. Segmentation is scored on the input's own grid
(the written mask against the label file, regions derived from both); detection with COCO-style AP over all cases
(boxes in input voxel coordinates); classification over the cases' class probabilities.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medtriad.data.transforms import Sample, regions_from_label
from medtriad.evaluation.metrics import (
    classification_metrics,
    detection_metrics,
    per_case_detection,
    segmentation_metrics,
    summarize,
)
from medtriad.inference.predictor import Prediction, Predictor
from medtriad.models.multitask import ModelSpec
from medtriad.io import atomic_write_text, write_json


@dataclass
class CaseScore:
    """One case's metrics row plus what the data-set-level metrics need (small and picklable, so that the cases
    scored on several ranks can be gathered on one)."""

    row: dict[str, Any]
    det: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # predicted boxes, scores, true boxes
    classes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # task -> (probabilities, target)


def score_case(predictor: Predictor, sample: Sample) -> tuple[CaseScore, Prediction]:
    """Predict one case and compute its per-case metrics."""
    spec = predictor.spec
    pred = predictor.predict_sample(sample)
    score = CaseScore({"case": sample.case_id})
    row = score.row
    if pred.mask is not None and sample.label is not None:
        p = regions_from_label(pred.mask, spec.regions).astype(bool)
        t = regions_from_label(sample.label, spec.regions).astype(bool)
        row.update(segmentation_metrics(p, t, list(spec.regions), sample.geometry.spacing))
    if "detection" in spec.heads and sample.boxes is not None:
        row.update({f"det_{k}": v for k, v in per_case_detection(pred.boxes_voxel, pred.scores,
                                                                 sample.boxes).items()})
        row["det_num_pred"] = int(len(pred.scores))
        score.det = (pred.boxes_voxel, pred.scores, sample.boxes)
    for task, probs in pred.probabilities.items():
        for name, value in probs.items():
            row[f"p_{task}_{name}"] = round(value, 6)
        target = sample.classes.get(task)
        row[f"target_{task}"] = "" if target is None else (
            ";".join(map(str, target)) if isinstance(target, (tuple, list)) else target)
        values = list(probs.values())
        score.classes[task] = (values[1] if spec.tasks[task]["kind"] == "binary" else values,
                               -1 if target is None else target)
    return score, pred


def summarize_scores(scores: list[CaseScore], spec: ModelSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-case rows (sorted by case) and the data-set summary (see :func:`evaluate_samples`)."""
    scores = sorted(scores, key=lambda s: s.row["case"])
    rows = [s.row for s in scores]
    summary: dict[str, Any] = {"num_cases": len(rows)}
    seg_rows = [{k: v for k, v in r.items() if k.startswith(("dice_", "hd95_"))} for r in rows]
    if any(seg_rows):
        summary["segmentation"] = summarize([r for r in seg_rows if r])
    det = [s.det for s in scores if s.det is not None]
    if det:
        summary["detection"] = detection_metrics(*map(list, zip(*det)))
    classification = {}
    for task, info in spec.tasks.items():
        pairs = [s.classes[task] for s in scores if task in s.classes]
        if pairs:
            probs, targets = zip(*pairs)
            classification[task] = classification_metrics(info["kind"], np.asarray(probs, dtype=float),
                                                           _targets(list(targets), info["kind"], len(info["classes"])),
                                                           info["classes"])
    if classification:
        summary["classification"] = classification
    summary["score"] = selection_score(summary, list(spec.regions))
    return rows, summary


def evaluate_samples(predictor: Predictor, samples: Iterable[Sample], progress: bool = False,
                     keep_predictions: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any], list[Prediction]]:
    """Predict and score every sample.

    Returns:
        rows: one dict per case (Dice/HD95 per region, detection TP/FP/FN at IoU 0.1, class probabilities and targets);
        summary: ``{"segmentation": {metric: {mean, std, median, count}}, "detection": {...},
        "classification": {task: {...}}, "score": model-selection score, "num_cases": n}``;
        predictions: the Prediction objects when ``keep_predictions`` (for reports), else empty.
    """
    scores, kept = [], []
    # one sample at a time: a generator of samples is read as it is scored, never held whole (a BraTS case at 1 mm
    # takes about 0.2 GB loaded)
    total = len(samples) if hasattr(samples, "__len__") else None
    for sample in tqdm(samples, total=total, desc="evaluate", unit="case", disable=not progress, leave=False):
        score, pred = score_case(predictor, sample)
        scores.append(score)
        if keep_predictions:
            kept.append(pred)
    rows, summary = summarize_scores(scores, predictor.spec)
    return rows, summary, kept


def _targets(targets: list, kind: str, num_classes: int) -> np.ndarray:
    """Targets as an array; an unknown multi-label target (-1) becomes a row of -1 over every label, so a task whose
    targets are all unknown still gives an (N, labels) array (and NaN metrics), not an (N, 0) one."""
    if kind == "multilabel":
        return np.array([t if t != -1 else [-1] * num_classes for t in targets], dtype=float).reshape(-1, num_classes)
    return np.asarray(targets, dtype=float)


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The few numbers a summary is judged by: mean ``dice_<region>``, ``AP@0.10`` and ``AUC_<task>`` (macro AUC for
    multi-label tasks); NaN where undefined."""
    out: dict[str, float] = {}
    for key, stats in summary.get("segmentation", {}).items():
        if key.startswith("dice_"):
            out[key] = float(stats["mean"])
    if "detection" in summary:
        out["AP@0.10"] = float(summary["detection"].get("AP_IoU_0.10", math.nan))
    for task, metrics in summary.get("classification", {}).items():
        out[f"AUC_{task}"] = float(metrics.get("auc", metrics.get("macro_auc", math.nan)))
    return out


def selection_score(summary: dict[str, Any], regions: list[str]) -> float:
    """One number to pick the best epoch: the mean of the available task scores (mean Dice over ``regions``,
    AP at IoU 0.10, and each task's AUC); undefined parts (NaN) are left out."""
    headline = headline_metrics(summary)
    dice = [headline[f"dice_{r}"] for r in regions if f"dice_{r}" in headline]
    parts = [float(np.mean(dice))] if dice else []
    parts += [v for k, v in headline.items() if k == "AP@0.10" or k.startswith("AUC_")]
    parts = [p for p in parts if np.isfinite(p)]
    return float(np.mean(parts)) if parts else math.nan


def write_results(folder: str | Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``per_case.csv`` and ``summary.json`` in ``folder`` (atomic writes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(folder / "per_case.csv", buffer.getvalue())
    write_json(folder / "summary.json", summary)
