"""Evaluation metrics for the three tasks, computed with MONAI's implementations.

Segmentation: Dice and HD95 per region (BraTS conventions for empty masks). Detection: COCO-style AP over
a range of IoU thresholds (nnDetection / MONAI matching), plus per-case TP/FP/FN counts. Classification:
AUC, accuracy, sensitivity, specificity and F1 for binary, multiclass and multilabel tasks. ``summarize``
turns per-case dictionaries into the mean/std/median/count table of a ``summary.json``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import (
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_roc_auc,
    get_confusion_matrix,
)

CLASSIFICATION_KINDS = ("binary", "multiclass", "multilabel")
BINARY_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")  # also each label's of a multilabel task


def segmentation_metrics(
    pred: np.ndarray, target: np.ndarray, region_names: Sequence[str], spacing: Sequence[float]
) -> dict[str, float]:
    """Dice and 95th-percentile Hausdorff distance per region of one case.

    Empty masks follow the BraTS challenge convention, so every case yields finite numbers that can be
    averaged: both masks empty -> Dice 1 and HD95 0 (a correct "nothing there"); exactly one empty ->
    Dice 0 and HD95 = the diagonal of the image's field of view in mm, ``sqrt(sum((shape * spacing)**2))``
    (the worst possible distance; 373.13 mm for a 240x240x155 1 mm BraTS volume).

    Args:
        pred: predicted masks, bool (R, X, Y, Z), one channel per region.
        target: reference masks, bool (R, X, Y, Z).
        region_names: R names; keys are ``"dice_<name>"`` and ``"hd95_<name>"``.
        spacing: voxel size in mm along X, Y, Z (3,), so HD95 is in mm.
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (R, X, Y, Z) of one shape, got {pred.shape} and {target.shape}")
    if len(region_names) != pred.shape[0]:
        raise ValueError(f"region_names {list(region_names)} do not match the {pred.shape[0]} mask channels")
    spacing_mm = np.asarray(spacing, dtype=float)
    if spacing_mm.shape != (3,) or np.any(spacing_mm <= 0):
        raise ValueError(f"spacing must be 3 positive values in mm, got {spacing}")
    diagonal_mm = float(np.sqrt(np.sum((np.asarray(pred.shape[1:]) * spacing_mm) ** 2)))

    metrics: dict[str, float] = {}
    for name, p, t in zip(region_names, pred, target):
        p_any, t_any = bool(p.any()), bool(t.any())
        if not p_any and not t_any:
            dice, hd95 = 1.0, 0.0
        elif p_any != t_any:
            dice, hd95 = 0.0, diagonal_mm
        else:
            p_t, t_t = torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None]
            dice = float(compute_dice(p_t, t_t, include_background=True))
            spacing_list = spacing_mm.tolist()
            with warnings.catch_warnings():  # MONAI's own deprecation notice about an argument it passes itself
                warnings.simplefilter("ignore", FutureWarning)
                hd = compute_hausdorff_distance(p_t, t_t, include_background=True, percentile=95,
                                                spacing=spacing_list)
            hd95 = float(hd)
        metrics[f"dice_{name}"] = dice
        metrics[f"hd95_{name}"] = hd95
    return metrics


def _as_boxes(boxes: Any, case: int, what: str) -> np.ndarray:
    """Array-like of boxes -> float (N, 6) array, naming the case index on a bad shape."""
    arr = np.asarray(boxes, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 6))
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise ValueError(f"case {case}: {what} must be (N, 6) xyzxyz boxes, got shape {arr.shape}")
    return arr


def _as_scores(scores: Any, n_boxes: int, case: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=float).reshape(-1)
    if arr.shape[0] != n_boxes:
        raise ValueError(f"case {case}: {arr.shape[0]} scores for {n_boxes} predicted boxes")
    return arr


def detection_metrics(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_thresholds: Sequence[float] = np.arange(0.10, 0.51, 0.05),
) -> dict[str, float]:
    """COCO-style detection metrics over a data set, single class (MONAI's nnDetection port).

    Predictions of all cases are pooled and ranked by score; each is greedily matched, best score first,
    to the unmatched ground-truth box of highest IoU >= threshold in its own case. COCO conventions for
    uneven cases: a case without ground truth contributes only false positives; a case without
    predictions contributes only misses. If no case has any ground-truth box, AP and recall are
    undefined and returned as NaN. At most 100 predictions per case (highest scores) are evaluated.

    Args:
        pred_boxes: per case (N_i, 6) voxel boxes, xyzxyz.
        pred_scores: per case (N_i,) confidences.
        gt_boxes: per case (M_i, 6) reference boxes.
        iou_thresholds: IoU thresholds of the mean AP.

    Returns:
        ``"mAP_IoU_<lo>_<hi>"`` (AP averaged over the thresholds), ``"AP_IoU_<lo>"``, ``"AP_IoU_<hi>"``,
        ``"recall_IoU_<lo>"`` (recall with every prediction kept), ``"num_cases"``, ``"num_gt_boxes"``,
        ``"num_pred_boxes"``; <lo>/<hi> are the first and last thresholds with two decimals.
    """
    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise ValueError(
            f"need one entry per case, got {len(pred_boxes)} pred_boxes, {len(pred_scores)} pred_scores "
            f"and {len(gt_boxes)} gt_boxes"
        )
    thresholds = [float(t) for t in iou_thresholds]
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds) or thresholds != sorted(set(thresholds)):
        raise ValueError(f"iou_thresholds must be non-empty ascending values in (0, 1], got {thresholds}")
    preds = [_as_boxes(b, i, "pred_boxes") for i, b in enumerate(pred_boxes)]
    scores = [_as_scores(s, len(b), i) for i, (s, b) in enumerate(zip(pred_scores, preds))]
    gts = [_as_boxes(b, i, "gt_boxes") for i, b in enumerate(gt_boxes)]

    # Every threshold goes into iou_list (the range is a single point), so arbitrary lists work.
    coco = COCOMetric(
        classes=["lesion"], iou_list=thresholds, iou_range=(thresholds[0], thresholds[0], 1.0),
        max_detection=[100], per_class=False, verbose=False,
    )
    matches = matching_batch(
        iou_fn=box_iou, iou_thresholds=coco.iou_thresholds, pred_boxes=preds,
        pred_classes=[np.zeros(len(b), dtype=int) for b in preds], pred_scores=scores,
        gt_boxes=gts, gt_classes=[np.zeros(len(b), dtype=int) for b in gts], max_detections=100,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco_values, _ = coco(matches)

    def undefined_as_nan(value: float) -> float:  # MONAI marks "no ground truth anywhere" with -1
        return float("nan") if value < 0 else float(value)

    lo, hi = thresholds[0], thresholds[-1]
    ap = [undefined_as_nan(coco_values[f"AP_IoU_{t:.2f}_MaxDet_100"]) for t in thresholds]
    return {
        f"mAP_IoU_{lo:.2f}_{hi:.2f}": float(np.mean(ap)),
        f"AP_IoU_{lo:.2f}": ap[0],
        f"AP_IoU_{hi:.2f}": ap[-1],
        f"recall_IoU_{lo:.2f}": undefined_as_nan(coco_values[f"AR_IoU_{lo:.2f}_MaxDet_100"]),
        "num_cases": float(len(gts)),
        "num_gt_boxes": float(sum(len(b) for b in gts)),
        "num_pred_boxes": float(sum(len(b) for b in preds)),
    }


def per_case_detection(
    pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.1, score_thresh: float = 0.5
) -> dict[str, int]:
    """True positives, false positives and misses of one case, for the per-case CSV.

    Predictions scoring below ``score_thresh`` are dropped; the rest are matched greedily (best score
    first) to ground-truth boxes with IoU >= ``iou``, each ground-truth box at most once.

    Args:
        pred_boxes: (N, 6) xyzxyz boxes; pred_scores: (N,); gt_boxes: (M, 6).

    Returns:
        ``{"tp", "fp", "fn"}`` counts.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    preds = _as_boxes(pred_boxes, 0, "pred_boxes")
    scores = _as_scores(pred_scores, len(preds), 0)
    gts = _as_boxes(gt_boxes, 0, "gt_boxes")
    keep = scores >= score_thresh
    preds, scores = preds[keep], scores[keep]
    if len(preds) == 0 or len(gts) == 0:
        return {"tp": 0, "fp": len(preds), "fn": len(gts)}
    (match,) = matching_batch(
        iou_fn=box_iou, iou_thresholds=[iou], pred_boxes=[preds], pred_classes=[np.zeros(len(preds), dtype=int)],
        pred_scores=[scores], gt_boxes=[gts], gt_classes=[np.zeros(len(gts), dtype=int)], max_detections=len(preds),
    )
    tp = int(match[0]["dtMatches"][0].sum())
    return {"tp": tp, "fp": len(preds) - tp, "fn": len(gts) - tp}


def _known(targets: np.ndarray) -> np.ndarray:
    """True where a target is known: not None, not NaN, not negative (-1 marks unknown)."""
    values = np.array([np.nan if t is None else t for t in targets.reshape(-1)], dtype=float).reshape(targets.shape)
    return np.isfinite(values) & (values >= 0)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of one binary problem through MONAI; NaN (silently) where only one class is present."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)))


def _confusion(pred: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """(N, C) 0/1 predictions and targets -> (C, 4) TP/FP/TN/FN summed over samples (MONAI needs floats)."""
    pred_t, target_t = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (pred, target))
    if not len(pred_t):  # no known target: all counts 0 (MONAI cannot reshape an empty batch), every rate NaN
        return torch.zeros((pred_t.shape[1], 4), dtype=torch.float64)
    return get_confusion_matrix(pred_t, target_t).sum(dim=0)


def _rate(name: str, confusion: torch.Tensor) -> list[float]:
    """Confusion-matrix metric (MONAI name, e.g. "f1 score") per class, (C,); NaN where undefined."""
    return compute_confusion_matrix_metric(name, confusion).reshape(-1).tolist()


def classification_metrics(
    kind: str, probs: np.ndarray, targets: Sequence[Any] | np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Classification metrics of one task over a set of cases, at a 0.5 threshold where one is needed.

    Samples whose target is unknown (None, NaN or -1) are dropped first; for multilabel tasks this is
    done per label. AUC (MONAI's ``compute_roc_auc``) is NaN where it is undefined, i.e. when the kept
    targets hold one class only; macro AUC averages the classes/labels where it is defined. Sensitivity,
    specificity and F1 are likewise NaN where their denominator is zero, and the macro means ignore those.

    Args:
        kind: "binary", "multiclass" or "multilabel".
        probs: binary (N,) or (N, 1) P(class 1); multiclass (N, K) softmax; multilabel (N, L) sigmoids.
        targets: binary (N,) 0/1; multiclass (N,) class index; multilabel (N, L) 0/1.
        class_names: binary: the two classes (negative first); multiclass: K names; multilabel: L names.

    Returns:
        binary: ``auc, accuracy, sensitivity, specificity, f1`` (class 1 is positive);
        multiclass: ``auc`` (macro one-vs-rest), ``accuracy``, ``sensitivity`` and ``specificity`` (macro
        one-vs-rest; the macro sensitivity is the balanced accuracy), ``f1`` (macro), ``sensitivity_<class>``,
        ``specificity_<class>``;
        multilabel: ``auc``, ``accuracy``, ``sensitivity``, ``specificity``, ``f1`` (each the macro mean over labels)
        and each of them per label (``auc_<label>``, ``accuracy_<label>``, ...).
        Every kind also reports ``num_samples`` (known targets; per label for multilabel, the minimum).
    """
    if kind not in CLASSIFICATION_KINDS:
        raise ValueError(f"kind must be one of {CLASSIFICATION_KINDS}, got {kind!r}")
    probs = np.asarray(probs, dtype=float)
    targets = np.asarray(targets, dtype=object)
    names = list(class_names)
    if kind == "binary":
        probs = probs.reshape(-1) if probs.ndim == 2 and probs.shape[1] == 1 else probs
        expected = 2
    else:
        expected = probs.shape[1] if probs.ndim == 2 else -1
    if probs.ndim != (1 if kind == "binary" else 2) or len(names) != expected:
        raise ValueError(f"{kind} task: probs of shape {probs.shape} do not fit class_names {names}")
    if len(targets) != len(probs) or (kind == "multilabel" and targets.shape != probs.shape):
        raise ValueError(f"{kind} task: targets of shape {targets.shape} do not match probs of shape {probs.shape}")

    known = _known(targets)
    if kind == "binary":
        p, y = probs[known], targets[known].astype(int)
        return _binary_metrics(p, y) | {"num_samples": float(len(y))}
    if kind == "multiclass":
        p, y = probs[known], targets[known].astype(int)
        k = len(names)
        if np.any(y >= k):
            raise ValueError(f"multiclass task: target index {int(y.max())} out of range for classes {names}")
        y_onehot, pred_onehot = np.eye(k, dtype=int)[y], np.eye(k, dtype=int)[p.argmax(1)]
        confusion = _confusion(pred_onehot, y_onehot)
        sensitivity, specificity = _rate("sensitivity", confusion), _rate("specificity", confusion)
        metrics = {
            "auc": _nanmean([_auc(p[:, c], y_onehot[:, c]) for c in range(k)]) if len(y) else float("nan"),
            "accuracy": float(np.mean(p.argmax(1) == y)) if len(y) else float("nan"),
            "sensitivity": _nanmean(sensitivity),
            "specificity": _nanmean(specificity),
            "f1": _nanmean(_rate("f1 score", confusion)),
        }
        metrics.update({f"sensitivity_{n}": s for n, s in zip(names, sensitivity)})
        metrics.update({f"specificity_{n}": s for n, s in zip(names, specificity)})
        return metrics | {"num_samples": float(len(y))}
    per_label = {name: _binary_metrics(probs[known[:, c], c], targets[known[:, c], c].astype(int))
                 for c, name in enumerate(names)}  # each label is a binary task of its own
    metrics = {f"{key}_{name}": value for name, found in per_label.items() for key, value in found.items()}
    metrics.update({key: _nanmean([found[key] for found in per_label.values()]) for key in BINARY_METRICS})
    return metrics | {"num_samples": float(known.sum(0).min())}


def _binary_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUC, and accuracy, sensitivity, specificity, F1 at p >= 0.5, of P(positive) ``p`` against 0/1 targets ``y``."""
    confusion = _confusion((p >= 0.5)[:, None], (y == 1)[:, None])
    return {
        "auc": _auc(p, y),
        "accuracy": float(np.mean((p >= 0.5) == y)) if len(y) else float("nan"),
        "sensitivity": _rate("sensitivity", confusion)[0],
        "specificity": _rate("specificity", confusion)[0],
        "f1": _rate("f1 score", confusion)[0],
    }


def _nanmean(values: Sequence[float]) -> float:
    """The mean of the defined values; NaN, without numpy's "Mean of empty slice" warning, when none is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.asarray(values, dtype=float)))


def summarize(per_case: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation (population, ddof=0), median and count of every numeric key.

    NaN values (undefined metrics) are left out of each statistic and of the count; non-numeric values
    (case ids, paths) are skipped. A key whose values are all NaN gets NaN statistics and count 0.

    Args:
        per_case: one dictionary per case, e.g. the merged outputs of the metric functions above.
    """
    columns: dict[str, list[float]] = {}
    for row in per_case:
        for key, value in row.items():
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                columns.setdefault(key, []).append(float(value))
    summary = {}
    for key, values in columns.items():
        finite = np.asarray([v for v in values if not np.isnan(v)])
        if len(finite) == 0:
            summary[key] = {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "count": 0}
            continue
        summary[key] = {
            "mean": float(finite.mean()),
            "std": float(finite.std()),
            "median": float(np.median(finite)),
            "count": int(len(finite)),
        }
    return summary
