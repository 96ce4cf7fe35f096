"""Ensembles: several trained runs predicting as one model (nnU-Net's fold ensembling, here any runs of one task set).

Per case the image is read and normalised once; each member predicts on the model grid with its own inference
settings (windows, mirroring); then region probabilities, class probabilities and heatmaps are averaged (a heatmap
over the members that make one: slice2d plugin models). Boxes are pooled and merged by NMS, as the test-time copies
of one model are (:func:`medtriad.inference.predictor.fuse_box_sets`), and each kept box is scored as the mean over
members of that member's best score for a box overlapping it by the NMS threshold (0 for a member that found nothing
there): a box only one of N members found keeps 1/N of its score, so adding members does not add their false
positives at full confidence (the scoring of weighted box fusion, with the winning box's coordinates kept). The
first run's settings decide what happens after that (NMS
threshold and maximum detections, segmentation threshold, detection gate, largest components, score threshold).

Members must agree on what goes in and what comes out: channels, spacing, normalisation, heads, regions, labels and
tasks. Their encoders and recipes may differ (a ``swin`` run beside a ``resenc`` run, runs of several seeds or folds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from medtriad.inference.predictor import GridOutput, Predictor, fuse_box_sets

# ModelSpec fields every member must share: they fix the input the members read and the meaning of their outputs
SHARED_SPEC_FIELDS = ("channel_names", "spacing", "normalization", "heads", "regions", "labels", "tasks")


def run_folders(run: str | Path | Sequence[str | Path]) -> list[Path]:
    """One run folder or several (an ensemble) as a list."""
    return [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]


def _comparable(spec, key: str):
    """A spec field as the members must agree on it: region order is output channel order; head order means nothing."""
    value = getattr(spec, key)
    return list(value.items()) if key == "regions" else sorted(value) if key == "heads" else value


def check_specs_agree(specs: Sequence, names: Sequence[str], fields: Sequence[str], who: str) -> None:
    """Raise a ValueError naming the first model whose ``fields`` differ from the first model's (``who`` must share
    them: "the members of an ensemble", "the folds of a cross-validation")."""
    for name, spec in zip(names[1:], specs[1:]):
        for key in fields:
            if _comparable(spec, key) != _comparable(specs[0], key):
                raise ValueError(f"{name}: model {key} {getattr(spec, key)} differs from {getattr(specs[0], key)} of "
                                 f"{names[0]}; {who} must share {', '.join(fields)}")


class EnsemblePredictor(Predictor):
    """Averages the predictions of several :class:`Predictor` s; used wherever a ``Predictor`` is.

    Example::

        predictor = EnsemblePredictor.from_pretrained_runs(["runs/seed0", "runs/seed1", "runs/seed2"])
        result = predictor.predict(["case_0000.nii.gz"])
    """

    def __init__(self, members: Sequence[Predictor], names: Sequence[str] | None = None):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
        first = members[0]
        check_specs_agree([m.spec for m in members], names, SHARED_SPEC_FIELDS, "the members of an ensemble")
        self.members = list(members)
        self.names = names
        # a case with missing channels only where every member was trained for them
        self.spec = dataclasses.replace(first.spec, missing_channels=all(m.spec.missing_channels for m in members))
        self.device, self.model = first.device, first.model
        self.inference, self.heatmaps = first.inference, first.heatmaps

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise TypeError("an ensemble is built from several runs: EnsemblePredictor.from_pretrained_runs([...])")

    @classmethod
    def from_plugins(cls, *args, **kwargs):
        raise TypeError("plugins on one backbone are one model: Predictor.from_plugins(...)")

    @classmethod
    def from_pretrained_runs(cls, paths: str | Path | Sequence[str | Path], device: str | None = None,
                             checkpoint: str = "best", heatmaps: bool = False,
                             inference: dict | None = None) -> Predictor:
        """One :meth:`Predictor.from_pretrained` per run folder (or checkpoint folder), the same ``checkpoint``
        and ``inference`` overrides for each; a single path gives that run's plain Predictor."""
        paths = run_folders(paths)
        if not paths:
            raise ValueError("no run folder given")
        members = [Predictor.from_pretrained(p, device=device, checkpoint=checkpoint, heatmaps=heatmaps,
                                              inference=inference) for p in paths]
        return members[0] if len(members) == 1 else cls(members, [str(p) for p in paths])

    @torch.no_grad()
    def predict_grid(self, image: torch.Tensor) -> GridOutput:
        outputs = [member.predict_grid(image) for member in self.members]
        first = outputs[0]
        out = GridOutput(None, torch.zeros((0, 6)), torch.zeros((0,)), {})
        if first.region_probs is not None:
            out.region_probs = torch.stack([o.region_probs for o in outputs]).mean(0)
        out.class_probs = {task: torch.stack([o.class_probs[task] for o in outputs]).mean(0)
                           for task in first.class_probs}
        for task in dict.fromkeys(t for o in outputs for t in o.heatmaps):
            out.heatmaps[task] = torch.stack([o.heatmaps[task] for o in outputs if task in o.heatmaps]).mean(0)
        # pooled by NMS, each kept box scored by the members' mean best overlapping score (see the module doc)
        out.boxes, out.scores = fuse_box_sets([(o.boxes, o.scores) for o in outputs], self.inference.nms_threshold,
                                              self.inference.max_detections)
        return out
