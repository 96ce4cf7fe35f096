import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.ndimage import gaussian_filter
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from medtriad.evaluation.metrics import (
    classification_metrics,
    detection_metrics,
    per_case_detection,
    segmentation_metrics,
    summarize,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation in get_mask_edges


def random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return gaussian_filter(rng.random(shape), sigma=2.0) > 0.52


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], side: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + side) for s in start)] = True
    return mask


# --- segmentation -------------------------------------------------------------------------------------------------


def test_segmentation_matches_monai_on_random_blobs():
    rng = np.random.default_rng(0)
    pred = np.stack([random_blob(rng, (32, 28, 24)) for _ in range(2)])
    target = np.stack([random_blob(rng, (32, 28, 24)) for _ in range(2)])
    spacing = (1.0, 1.5, 2.0)
    result = segmentation_metrics(pred, target, ["WT", "TC"], spacing)
    for r, name in enumerate(["WT", "TC"]):
        p, t = torch.from_numpy(pred[r])[None, None], torch.from_numpy(target[r])[None, None]
        assert result[f"dice_{name}"] == pytest.approx(float(compute_dice(p, t)), abs=1e-6)
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing))
        assert result[f"hd95_{name}"] == pytest.approx(float(hd), abs=1e-6)


def test_segmentation_matches_an_independent_reference_on_random_blobs():
    """Not MONAI against itself: Dice by counting, HD95 from scipy's Euclidean distance transform (in mm) between
    the two masks' surface voxels (each mask less its erosion), the 95th percentile of each direction, the larger."""
    from scipy.ndimage import binary_erosion, distance_transform_edt

    rng = np.random.default_rng(1)
    spacing = (1.0, 1.5, 2.0)
    for _ in range(3):
        pred, target = random_blob(rng, (32, 28, 24)), random_blob(rng, (32, 28, 24))
        result = segmentation_metrics(pred[None], target[None], ["WT"], spacing)
        assert result["dice_WT"] == pytest.approx(2 * (pred & target).sum() / (pred.sum() + target.sum()), abs=1e-6)
        surface = {k: m & ~binary_erosion(m) for k, m in (("p", pred), ("t", target))}
        to_t = distance_transform_edt(~surface["t"], sampling=spacing)[surface["p"]]
        to_p = distance_transform_edt(~surface["p"], sampling=spacing)[surface["t"]]
        hd95 = max(np.percentile(to_t, 95), np.percentile(to_p, 95))
        assert result["hd95_WT"] == pytest.approx(hd95, abs=1e-4)


@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_cubes_have_known_dice_and_hd95(shift):
    side, shape = 10, (30, 30, 30)
    pred = cube(shape, (5, 5, 5), side)[None]
    target = cube(shape, (5 + shift, 5, 5), side)[None]
    iso = segmentation_metrics(pred, target, ["WT"], (1.0, 1.0, 1.0))
    assert iso["dice_WT"] == pytest.approx((side - shift) / side, abs=1e-6)
    # a whole face (>5% of the surface) sits `shift` voxels from the other cube and nothing is farther
    assert iso["hd95_WT"] == pytest.approx(shift)
    stretched_x = segmentation_metrics(pred, target, ["WT"], (2.5, 1.0, 1.0))
    assert stretched_x["hd95_WT"] == pytest.approx(2.5 * shift)
    assert stretched_x["dice_WT"] == pytest.approx(iso["dice_WT"])
    stretched_y = segmentation_metrics(pred, target, ["WT"], (1.0, 3.0, 1.0))
    assert stretched_y["hd95_WT"] == pytest.approx(shift)


def test_empty_mask_conventions():
    shape = (20, 16, 12)
    spacing = (1.0, 2.0, 3.0)
    blob = cube(shape, (2, 2, 2), 4)
    empty = np.zeros(shape, dtype=bool)
    pred = np.stack([empty, blob, empty])
    target = np.stack([empty, empty, blob])
    result = segmentation_metrics(pred, target, ["WT", "TC", "ET"], spacing)
    diagonal = math.sqrt(20.0**2 + 32.0**2 + 36.0**2)
    assert (result["dice_WT"], result["hd95_WT"]) == (1.0, 0.0)
    assert result["dice_TC"] == 0.0 and result["hd95_TC"] == pytest.approx(diagonal)
    assert result["dice_ET"] == 0.0 and result["hd95_ET"] == pytest.approx(diagonal)


def test_segmentation_rejects_bad_input():
    mask = np.zeros((2, 8, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(mask, mask[:1], ["WT", "TC"], (1, 1, 1))
    with pytest.raises(ValueError, match="region_names"):
        segmentation_metrics(mask, mask, ["WT"], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(mask, mask, ["WT", "TC"], (1, 0, 1))


# --- detection ----------------------------------------------------------------------------------------------------

GT = [np.array([[10, 10, 10, 20, 20, 20.0]]), np.array([[5, 5, 5, 15, 15, 15.0], [30, 30, 30, 40, 40, 36.0]])]
SCORES = [np.array([0.9]), np.array([0.8, 0.7])]


def test_perfect_detection_has_ap_one():
    result = detection_metrics(GT, SCORES, GT)
    assert result["mAP_IoU_0.10_0.50"] == pytest.approx(1.0)
    assert result["AP_IoU_0.10"] == pytest.approx(1.0) and result["AP_IoU_0.50"] == pytest.approx(1.0)
    assert result["recall_IoU_0.10"] == pytest.approx(1.0)
    assert (result["num_cases"], result["num_gt_boxes"], result["num_pred_boxes"]) == (2, 3, 3)


def test_shifted_boxes_count_at_low_iou_only():
    shift = np.array([4, 0, 0, 4, 0, 0.0])  # 10-wide boxes shifted by 4: IoU = 6 / 14 = 0.43
    preds = [b + shift for b in GT]
    result = detection_metrics(preds, SCORES, GT)
    assert result["AP_IoU_0.10"] == pytest.approx(1.0)
    assert result["AP_IoU_0.50"] == pytest.approx(0.0)
    assert result["mAP_IoU_0.10_0.50"] == pytest.approx(7 / 9)  # matched at 0.10, 0.15, ..., 0.40; not 0.45, 0.50


def test_no_predictions_gives_zero_and_no_ground_truth_gives_nan():
    none = [np.zeros((0, 6)), np.zeros((0, 6))]
    missed = detection_metrics(none, [np.zeros(0), np.zeros(0)], GT)
    assert missed["mAP_IoU_0.10_0.50"] == 0.0 and missed["recall_IoU_0.10"] == 0.0
    undefined = detection_metrics(GT, SCORES, none)
    assert math.isnan(undefined["mAP_IoU_0.10_0.50"]) and math.isnan(undefined["AP_IoU_0.10"])
    assert math.isnan(undefined["recall_IoU_0.10"])
    with pytest.raises(ValueError, match="ascending"):  # the result's keys name the first and last threshold
        detection_metrics(GT, SCORES, GT, iou_thresholds=[0.5, 0.1])


def test_case_without_ground_truth_adds_false_positives():
    preds = GT + [np.array([[0, 0, 0, 5, 5, 5.0]])]
    gts = GT + [np.zeros((0, 6))]
    low = detection_metrics(preds, SCORES + [np.array([0.1])], gts)
    high = detection_metrics(preds, SCORES + [np.array([0.99])], gts)
    assert low["AP_IoU_0.10"] == pytest.approx(1.0)  # ranked after every true positive
    assert high["AP_IoU_0.10"] < 0.9


def test_higher_scoring_false_positives_lower_ap():
    far = np.array([[60, 60, 60, 70, 70, 70.0]])
    preds = [np.vstack([b, far]) for b in GT]
    ranked_last = detection_metrics(preds, [np.append(s, 0.05) for s in SCORES], GT)
    ranked_first = detection_metrics(preds, [np.append(s, 0.95) for s in SCORES], GT)
    assert ranked_last["AP_IoU_0.10"] == pytest.approx(1.0)
    assert ranked_first["AP_IoU_0.10"] < ranked_last["AP_IoU_0.10"]
    assert ranked_first["recall_IoU_0.10"] == pytest.approx(1.0)


def test_per_case_detection_counts():
    far = [60, 60, 60, 70, 70, 70.0]
    preds = np.array([GT[1][0], far, GT[1][1]])
    assert per_case_detection(preds, [0.9, 0.8, 0.3], GT[1]) == {"tp": 1, "fp": 1, "fn": 1}
    assert per_case_detection(preds, [0.9, 0.8, 0.3], GT[1], score_thresh=0.2) == {"tp": 2, "fp": 1, "fn": 0}
    assert per_case_detection(preds, [0.9, 0.8, 0.3], np.zeros((0, 6))) == {"tp": 0, "fp": 2, "fn": 0}
    with pytest.raises(ValueError, match="scores"):
        per_case_detection(preds, [0.9], GT[1])


# --- classification -----------------------------------------------------------------------------------------------


def test_binary_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    result = classification_metrics("binary", p[:, None], y, ["LGG", "HGG"])
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    assert result["auc"] == pytest.approx(roc_auc_score(y, p))
    assert result["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    assert result["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert result["specificity"] == pytest.approx(tn / (tn + fp))
    assert result["f1"] == pytest.approx(f1_score(y, p >= 0.5))


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 80)
    logits = rng.normal(size=(80, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    result = classification_metrics("multiclass", p, y, ["a", "b", "c"])
    assert result["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert result["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert result["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    for name, sens in zip("abc", recall_score(y, p.argmax(1), average=None)):
        assert result[f"sensitivity_{name}"] == pytest.approx(sens)
    assert result["sensitivity"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    matrix = confusion_matrix(y, p.argmax(1))  # one vs rest: a class's negatives are the other classes' cases
    negatives = [matrix.sum() - matrix[c].sum() for c in range(3)]
    specificity = [(negatives[c] - matrix[:, c].sum() + matrix[c, c]) / negatives[c] for c in range(3)]
    for name, spec in zip("abc", specificity):
        assert result[f"specificity_{name}"] == pytest.approx(spec)
    assert result["specificity"] == pytest.approx(np.mean(specificity))


def test_multilabel_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (70, 3))
    p = np.clip(0.4 * y + 0.6 * rng.random((70, 3)), 0, 1)
    result = classification_metrics("multilabel", p, y, ["x", "y", "z"])
    aucs = [roc_auc_score(y[:, c], p[:, c]) for c in range(3)]
    f1s = [f1_score(y[:, c], p[:, c] >= 0.5) for c in range(3)]
    accuracies = [np.mean((p[:, c] >= 0.5) == y[:, c]) for c in range(3)]
    sensitivities = [recall_score(y[:, c], p[:, c] >= 0.5) for c in range(3)]
    specificities = [recall_score(y[:, c], p[:, c] >= 0.5, pos_label=0) for c in range(3)]  # recall of label absent
    for c, name in enumerate("xyz"):
        assert result[f"auc_{name}"] == pytest.approx(aucs[c])
        assert result[f"f1_{name}"] == pytest.approx(f1s[c])
        assert result[f"accuracy_{name}"] == pytest.approx(accuracies[c])
        assert result[f"sensitivity_{name}"] == pytest.approx(sensitivities[c])
        assert result[f"specificity_{name}"] == pytest.approx(specificities[c])
    assert result["auc"] == pytest.approx(np.mean(aucs))
    assert result["f1"] == pytest.approx(np.mean(f1s))
    assert result["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["sensitivity"] == pytest.approx(np.mean(sensitivities))
    assert result["specificity"] == pytest.approx(np.mean(specificities))


def test_unknown_targets_are_dropped():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    with_unknown = np.array(list(y) + [None, -1, None], dtype=object)
    p_unknown = np.concatenate([p, [0.99, 0.01, 0.7]])
    assert classification_metrics("binary", p_unknown, with_unknown, ["n", "p"]) == pytest.approx(
        classification_metrics("binary", p, y, ["n", "p"])
    )
    y_ml = rng.integers(0, 2, (40, 2)).astype(float)
    p_ml = rng.random((40, 2))
    y_ml_unknown = y_ml.copy()
    y_ml_unknown[:5, 0] = np.nan
    result = classification_metrics("multilabel", p_ml, y_ml_unknown, ["u", "v"])
    assert result["auc_u"] == pytest.approx(roc_auc_score(y_ml[5:, 0], p_ml[5:, 0]))
    assert result["auc_v"] == pytest.approx(roc_auc_score(y_ml[:, 1], p_ml[:, 1]))
    assert result["num_samples"] == 35


def test_auc_is_nan_when_one_class_only():
    result = classification_metrics("binary", np.array([0.2, 0.7, 0.9]), np.array([1, 1, 1]), ["n", "p"])
    assert math.isnan(result["auc"]) and math.isnan(result["specificity"])
    assert result["sensitivity"] == pytest.approx(2 / 3)


def test_undefined_multiclass_metrics_are_nan_without_warnings():
    """One class present, or no known target: the macro means over classes are NaN, with no numpy warning printed
    on the command line."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = classification_metrics("multiclass", np.full((3, 3), 1 / 3), np.zeros(3), ["a", "b", "c"])
        unknown = classification_metrics("multiclass", np.full((2, 3), 1 / 3), np.array([None, None], dtype=object),
                                         ["a", "b", "c"])
    assert math.isnan(one["auc"]) and one["accuracy"] == 1.0
    assert math.isnan(unknown["auc"]) and math.isnan(unknown["f1"]) and unknown["num_samples"] == 0


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        classification_metrics("ordinal", np.zeros(3), np.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics("multiclass", np.full((4, 3), 1 / 3), np.zeros(4), ["a", "b"])
    with pytest.raises(ValueError, match="out of range"):
        classification_metrics("multiclass", np.full((2, 2), 0.5), np.array([0, 5]), ["a", "b"])


# --- summary ------------------------------------------------------------------------------------------------------


def test_summarize_ignores_nan_and_text():
    rows = [
        {"case": "A", "dice_WT": 0.8, "auc": float("nan"), "tp": 1},
        {"case": "B", "dice_WT": 0.6, "auc": float("nan"), "tp": 3},
        {"case": "C", "dice_WT": float("nan"), "auc": float("nan"), "tp": 2},
    ]
    summary = summarize(rows)
    assert "case" not in summary
    assert summary["dice_WT"]["mean"] == pytest.approx(0.7)
    assert summary["dice_WT"]["std"] == pytest.approx(np.std([0.8, 0.6]))
    assert summary["dice_WT"]["count"] == 2
    assert summary["tp"]["median"] == 2.0 and summary["tp"]["count"] == 3
    assert summary["auc"]["count"] == 0 and math.isnan(summary["auc"]["mean"])


def test_summary_of_a_multilabel_task_without_any_known_target_is_nan():
    """Evaluating a findings model on cases whose findings are all unknown (no classes.csv) gives NaN metrics for
    that task and scores the rest, instead of failing on a (cases, 0) target array."""
    from medtriad.evaluation.evaluate import CaseScore, summarize_scores
    from medtriad.models.multitask import ModelSpec

    spec = ModelSpec(encoder="resenc", in_channels=1, channel_names=["CT"], heads=["classification"],
                     spacing=[1.0] * 3, tasks={"findings": {"kind": "multilabel", "classes": ["a", "b", "c"]},
                                               "grade": {"kind": "binary", "classes": ["LGG", "HGG"]}})
    probs = [[0.2, 0.9, 0.4], [0.7, 0.1, 0.5], [0.6, 0.3, 0.8]]
    scores = [CaseScore({"case": f"c{i}"}, classes={"findings": (p, -1), "grade": (p[0], i % 2)})
              for i, p in enumerate(probs)]
    _, summary = summarize_scores(scores, spec)
    findings = summary["classification"]["findings"]
    assert math.isnan(findings["auc"]) and math.isnan(findings["auc_b"]) and findings["num_samples"] == 0
    assert summary["classification"]["grade"]["num_samples"] == 3
    binary = classification_metrics("binary", np.array([0.3, 0.8]), np.array([-1, None], dtype=object), ["n", "p"])
    assert binary["num_samples"] == 0 and all(math.isnan(binary[k]) for k in ("auc", "accuracy", "f1"))
    scores[1].classes["findings"] = (probs[1], (1, 0, 1))  # one known case: per-label counts of 1
    _, summary = summarize_scores(scores, spec)
    assert summary["classification"]["findings"]["num_samples"] == 1
