"""A self-contained HTML report (images embedded as base64 PNG): metrics, training curves, and per-case views.

Per case: one axial slice through the largest ground-truth lesion, each contrast with true (green) and predicted
(red) whole-tumour contours, enhancing-tumour contours dashed, true (green, dashed) and predicted (red, score >= 0.5)
boxes that cross the slice, and the class probabilities next to the true class.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from medtriad.inference.predictor import Prediction  # noqa: E402
from medtriad.io import atomic_write_text  # noqa: E402

BOX_SCORE = 0.5  # predicted boxes drawn in the case views (the per-case TP/FP/FN counts use the same threshold)


@dataclass
class CaseView:
    """What the report shows of one case: its channels on the input grid, the truth and the prediction."""

    case_id: str
    channels: list[np.ndarray | None]  # (X, Y, Z) each, input grid
    channel_names: list[str]
    label: np.ndarray | None  # (X, Y, Z)
    true_boxes: np.ndarray | None  # (M, 6) input voxels
    true_classes: dict[str, Any]
    prediction: Prediction


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _slice_index(label: np.ndarray | None, pred: np.ndarray | None, depth: int) -> int:
    """The axial slice with the most (true, else predicted) tumour voxels, else the middle."""
    for volume in (label, pred):
        if volume is not None and volume.any():
            return int(np.argmax((volume > 0).sum(axis=(0, 1))))
    return depth // 2


def boxes_on_slice(boxes: np.ndarray, z: int) -> np.ndarray:
    """Which (N, 6) voxel boxes (xyzxyz, edges on voxel edges: voxel k spans [k, k + 1)) hold the centre of axial
    slice ``z``: a predicted box [10.3, 10.9) along z is drawn on slice 10."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 6)
    return (boxes[:, 2] <= z + 0.5) & (z + 0.5 < boxes[:, 5])


def case_figure(view: CaseView, regions: dict[str, Sequence[int]]) -> str:
    """One row of panels (one per contrast) for a case; returns base64 PNG."""
    pred = view.prediction.mask
    shape = next(c.shape for c in view.channels if c is not None)
    z = _slice_index(view.label, pred, shape[2])
    names = list(regions)  # contours: the first region solid, the last dashed (BraTS: WT and ET); none without
    outlines = list(zip(dict.fromkeys(names[:1] + names[-1:]), ("solid", "dashed")))  # (region, style)
    fig, axes = plt.subplots(1, len(view.channels), figsize=(3.2 * len(view.channels), 3.4))
    for ax, channel, name in zip(np.atleast_1d(axes), view.channels, view.channel_names):
        ax.set_title(name, fontsize=10)
        ax.axis("off")
        if channel is None:
            ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.imshow(channel[:, :, z].T, cmap="gray", origin="lower")
        for volume, colour in ((view.label, "lime"), (pred, "red")):
            if volume is None:
                continue
            for region_name, style in outlines:
                region = np.isin(volume[:, :, z], list(regions[region_name])).T.astype(float)
                if region.any():
                    ax.contour(region, levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)
        confident = view.prediction.scores >= BOX_SCORE
        for boxes, scores, colour, style in (
                (view.true_boxes, None, "lime", "--"),
                (view.prediction.boxes_voxel[confident], view.prediction.scores[confident], "red", "-")):
            if boxes is None:
                continue
            boxes = np.asarray(boxes).reshape(-1, 6)
            for i in np.flatnonzero(boxes_on_slice(boxes, z)):
                b = boxes[i]
                ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[3] - b[0], b[4] - b[1], fill=False,
                                       edgecolor=colour, linestyle=style, linewidth=1.2))
                if scores is not None:
                    ax.text(b[0], b[4] + 1, f"{scores[i]:.2f}", color=colour, fontsize=7)
    contours = "".join(f"{style} contour: {region_name}; " for region_name, style in outlines)
    fig.suptitle(f"{view.case_id}, axial slice {z}  (green: truth, red: prediction; {contours}boxes scoring >= "
                 f"{BOX_SCORE})", fontsize=9)
    return _png(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def metrics_tables(summary: dict[str, Any]) -> str:
    """HTML tables for segmentation (mean ± std), detection and classification metrics."""
    parts = []
    seg = summary.get("segmentation")
    if seg:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v['mean'])}</td><td>{_fmt(v['std'])}</td>"
                       f"<td>{_fmt(v['median'])}</td><td>{int(v['count'])}</td></tr>" for k, v in seg.items())
        parts.append("<h3>Segmentation</h3><table><tr><th>metric</th><th>mean</th><th>std</th><th>median</th>"
                     f"<th>cases</th></tr>{rows}</table><p class=note>HD95 in mm. Empty masks: both empty gives "
                     "Dice 1 / HD95 0; one empty gives Dice 0 / HD95 = image diagonal.</p>")
    det = summary.get("detection")
    if det:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in det.items())
        parts.append(f"<h3>Detection</h3><table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
    for task, metrics in summary.get("classification", {}).items():
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in metrics.items())
        parts.append(f"<h3>Classification: {html.escape(task)}</h3><table><tr><th>metric</th><th>value</th></tr>"
                     f"{rows}</table>")
    return "\n".join(parts)


def _probabilities(view: CaseView, tasks: dict[str, dict[str, Any]]) -> str:
    items = []
    for task, probs in view.prediction.probabilities.items():
        truth = view.true_classes.get(task)
        classes = tasks[task]["classes"]
        if isinstance(truth, int):
            truth = classes[truth]
        cells = ", ".join(f"{html.escape(c)} {p:.2f}" for c, p in probs.items())
        items.append(f"<b>{html.escape(task)}</b>: {cells} (true: {html.escape(str(truth))})")
    return "<br>".join(items)


def write_report(path: str | Path, title: str, summary: dict[str, Any], views: Sequence[CaseView],
                 regions: dict[str, Sequence[int]], tasks: dict[str, dict[str, Any]],
                 progress_png: str | Path | None = None, notes: Sequence[str] = ()) -> Path:
    """Write the report; returns its path."""
    path = Path(path)
    sections = [f"<h1>{html.escape(title)}</h1>"]
    sections += [f"<p>{html.escape(n)}</p>" for n in notes]
    sections.append(f'<h2 id="metrics">Metrics ({summary.get("num_cases", "?")} held-out cases)</h2>')
    sections.append(metrics_tables(summary))
    if progress_png and Path(progress_png).is_file():
        data = base64.b64encode(Path(progress_png).read_bytes()).decode("ascii")
        sections.append(f'<h2 id="training">Training curves</h2>{_img(data, "training curves")}')
    sections.append('<h2 id="cases">Cases</h2>')
    for view in views:
        sections.append(f'<div class=case><h3>{html.escape(view.case_id)}</h3>'
                        f'{_img(case_figure(view, regions), view.case_id)}'
                        f'<p class=probs>{_probabilities(view, tasks)}</p></div>')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
            "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}.note{color:#555;font-size:90%}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    atomic_write_text(path, page)
    return path
