"""The training-progress plot (nnU-Net style): losses and validation metrics per epoch, redrawn every epoch."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medtriad.io import atomic_write_bytes  # noqa: E402


def validation_curves(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(epoch, value)] for Dice per region, AP@0.10 and each task's AUC."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        val, epoch = record.get("validation") or {}, record["epoch"] + 1
        for key, stats in val.get("segmentation", {}).items():
            if key.startswith("dice_"):
                curves.setdefault(f"Dice {key[5:]}", []).append((epoch, stats["mean"]))
        if "detection" in val:
            curves.setdefault("AP@0.10", []).append((epoch, val["detection"].get("AP_IoU_0.10", math.nan)))
        for task, metrics in val.get("classification", {}).items():
            curves.setdefault(f"AUC {task}", []).append((epoch, metrics.get("auc", metrics.get("macro_auc", math.nan))))
    return curves


def plot_progress(history: list[dict[str, Any]], path: str | Path) -> None:
    """Two panels: training losses (log scale) with loss weights, and validation metrics."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    epochs = [r["epoch"] + 1 for r in history]
    names = sorted({k for r in history for k in r["losses"]})  # none while no batch held a target
    for name in names:
        ax_loss.plot(epochs, [r["losses"].get(name, math.nan) for r in history], marker=".", label=name)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    if names:
        ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    curves = validation_curves(history)
    for name, points in curves.items():
        ax_val.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
    ax_val.set_ylim(0, 1)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation")
    if curves:
        ax_val.legend(fontsize=8)
    ax_val.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
