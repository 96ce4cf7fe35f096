"""MultiTaskModel: one shared encoder feeding any subset of task heads (MTMed3D's design).

A single-task model is the same class with one head. The encoder runs once per input; every head reads the same
multi-scale feature list. ``ModelSpec`` holds what is needed to rebuild the model from its weights alone (it is
saved as ``model.json`` beside every checkpoint), so prediction never depends on the training dataset.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medtriad.config import HEAD_NAMES as HEADS
from medtriad.io import write_json
from medtriad.models.encoders import create_encoder
from medtriad.models.encoders.coordinates import WithRadialCoordinate
from medtriad.models.heads.classification import ClassificationHead
from medtriad.models.heads.detection import DetectionHead
from medtriad.models.heads.segmentation import build_segmentation_head


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and interpret its outputs.

    Args:
        encoder / encoder_kwargs: registry name and constructor arguments.
        in_channels: number of input contrasts (missing ones arrive zero-filled).
        channel_names: contrast names, in input order.
        heads: the heads built.
        regions: segmentation region -> label values (e.g. WT -> [1, 2, 4]); output channel order.
        labels: label name -> value of the training label maps (to write masks in the training convention).
        tasks: classification task -> {"kind": binary|multiclass|multilabel, "classes": [...]}.
        segmentation: build_segmentation_head keyword arguments (decoder, its channels, prior, deep supervision).
        detection: DetectionHead keyword arguments (anchor shapes, strides, thresholds).
        spacing: the grid (mm) the model works on.
        normalization: the intensity normalisation of its inputs (medtriad.data.transforms.normalize).
        radial_coordinate: the encoder also reads each voxel's distance from the window's centre
            (medtriad.models.encoders.coordinates).
        plugins: encoder "slice2d" only: task -> PluginConfig fields (medtriad.models.anymc3d), one plugin per task.
        missing_channels: trained on a dataset whose cases may lack channels (``allow_missing_channels``):
            ``predict`` then takes a case with some channel files missing (zero-filled), as training saw them.
    """

    encoder: str
    in_channels: int
    channel_names: list[str]
    heads: list[str]
    spacing: list[float]
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    regions: dict[str, list[int]] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    segmentation: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    classification_hidden: int = 128
    classification_dropout: float = 0.0
    normalization: str = "nonzero"
    radial_coordinate: bool = False
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing_channels: bool = False

    def save(self, path: str | Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - known:
            raise ValueError(f"{path}: unknown model spec key(s) {sorted(set(raw) - known)}")
        return cls(**raw)

    @staticmethod
    def task_outputs(task: dict[str, Any]) -> int:
        return 1 if task["kind"] == "binary" else len(task["classes"])


class MultiTaskModel(nn.Module):
    """Shared encoder + ``{task: head}``.

    ``forward(x)`` returns a dict with any of: ``"segmentation"`` region logits (B, R, X, Y, Z) (in training with deep
    supervision also ``"segmentation_deep"``, the coarser levels' logits); ``"classification"`` {task: logits (B, n)};
    ``"detection"`` losses (when ``det_targets`` is given) or boxes.

    ``encoder_gradient`` (set by the trainer; it changes only gradients): head -> the share of that head's gradient
    that flows back into the shared encoder (1 for heads not named: joint training; 0: the head learns on the
    encoder's features without changing them, a stop-gradient). The forward values are the same either way.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        unknown = set(spec.heads) - set(HEADS)
        if unknown or not spec.heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {spec.heads}")
        self.spec = spec
        self.encoder = create_encoder(spec.encoder, spec.in_channels + int(spec.radial_coordinate),
                                      **spec.encoder_kwargs)
        if spec.radial_coordinate:
            self.encoder = WithRadialCoordinate(self.encoder)
        info = self.encoder.feature_info
        self.heads = nn.ModuleDict()
        if "segmentation" in spec.heads:
            if not spec.regions:
                raise ValueError("a segmentation head needs regions (dataset.json medtriad.regions)")
            self.heads["segmentation"] = build_segmentation_head(info, len(spec.regions), **spec.segmentation)
        if "detection" in spec.heads:
            if "anchor_shapes" not in spec.detection:
                raise ValueError("a detection head needs anchor_shapes (derived from the training boxes)")
            self.heads["detection"] = DetectionHead(info, **spec.detection)
        if "classification" in spec.heads:
            if not spec.tasks:
                raise ValueError("a classification head needs at least one task (dataset.json medtriad.classification)")
            self.heads["classification"] = ClassificationHead(
                info, {name: ModelSpec.task_outputs(t) for name, t in spec.tasks.items()},
                hidden=spec.classification_hidden, dropout=spec.classification_dropout)

    @property
    def size_divisible(self) -> int:
        return self.encoder.size_divisible

    def deepest_levels(self) -> dict[str, int]:
        """Per head, the deepest encoder level (index into ``feature_info``) it reads."""
        deepest = len(self.encoder.feature_info) - 1  # the decoder starts there; the pooling reads it
        return {name: max(head.levels) if name == "detection" else deepest for name, head in self.heads.items()}

    def last_shared_layer(self) -> nn.Module:
        """The deepest encoder module every head's gradient passes through (GradNorm's shared layer): the one of the
        shallowest of the heads' deepest levels (a detection pyramid on strides 4-16 of a stride-32 Swin encoder
        never reaches the deepest block)."""
        return self.encoder.last_shared_layer(min(self.deepest_levels().values()))

    def forward(self, x: Tensor, det_targets: list[dict[str, Tensor]] | None = None,
                encoder_gradient: Mapping[str, float] | None = None) -> dict[str, Any]:
        features = self.encoder(x)
        return self.forward_heads(features, tuple(x.shape[2:]), det_targets, encoder_gradient)

    def forward_heads(self, features: list[Tensor], image_size: tuple[int, ...],
                      det_targets: list[dict[str, Tensor]] | None = None,
                      encoder_gradient: Mapping[str, float] | None = None) -> dict[str, Any]:
        unknown = set(encoder_gradient or {}) - set(self.heads)
        if unknown:
            raise ValueError(f"encoder_gradient names {sorted(unknown)}, not heads of this model ({list(self.heads)})")
        shared = lambda head: scale_gradient(features, (encoder_gradient or {}).get(head, 1.0))  # noqa: E731
        out: dict[str, Any] = {}
        if "segmentation" in self.heads:
            seg = self.heads["segmentation"]
            if self.training and seg.deep_supervision:  # coarser levels' logits for the loss, fine to coarse
                out["segmentation"], *out["segmentation_deep"] = seg.forward_deep(shared("segmentation"))
            else:
                out["segmentation"] = seg(shared("segmentation"))
        if "classification" in self.heads:
            out["classification"] = self.heads["classification"](shared("classification"))
        if "detection" in self.heads and (det_targets is not None or not self.training):
            out["detection"] = self.heads["detection"](shared("detection"), image_size, det_targets)
        return out


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (a view: no copy), gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(features: list[Tensor], scale: float) -> list[Tensor]:
    """``features`` unchanged in the forward pass, their gradient multiplied by ``scale`` in the backward pass
    (0: detached, 1: untouched)."""
    if scale == 1.0:
        return features
    if scale == 0.0:
        return [f.detach() for f in features]
    return [_ScaleGradient.apply(f, scale) for f in features]


def build_model(spec: ModelSpec, root: str | Path | None = None) -> nn.Module:
    """The model a spec describes: a MultiTaskModel, or for encoder "slice2d" a PluginModel (a frozen 2D ViT read
    slice by slice with one AnyMC3D plugin per classification task, medtriad.models.anymc3d). ``root`` is the run
    folder, against which a relative backbone path is resolved."""
    if spec.encoder == "slice2d":
        from medtriad.models.anymc3d import build_plugin_model

        return build_plugin_model(spec, root)
    return MultiTaskModel(spec)


def model_weights(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint stores of ``model``: all of a MultiTaskModel; a PluginModel's plugins, not its frozen
    backbone (kept once, in its own file)."""
    trainable = getattr(model, "trainable_state_dict", None)
    return trainable() if trainable is not None else dict(model.state_dict())


def check_input_size(model: nn.Module, input_size: Sequence[int], what: str = "input size") -> None:
    """Raise ``ValueError`` unless ``input_size`` is 3 multiples of the model's ``size_divisible``, not all equal to
    it (the deepest map would be 1 voxel, where instance norm has no statistics to take). ``what`` names the size
    in the message (``"data.patch_size"`` for the trainer)."""
    div = model.size_divisible
    encoder = getattr(getattr(model, "spec", None), "encoder", type(model).__name__)
    if len(input_size) != 3 or any(s % div for s in input_size):
        raise ValueError(f"{what} must be 3 multiples of {div} (the {encoder} encoder's divisor), "
                         f"got {tuple(input_size)}")
    if all(s == div for s in input_size):
        raise ValueError(f"{what} {tuple(input_size)} leaves the deepest map 1 voxel; make one side {2 * div}")


def load_model_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Inverse of :func:`model_weights`; entries of other owners (``balancer.``, the raw ``train.`` weights of an
    EMA run) are ignored."""
    weights = {k: v for k, v in weights.items() if not k.startswith(("balancer.", "train."))}
    loader = getattr(model, "load_trainable_state_dict", None)
    if loader is not None:
        loader(weights)
    else:
        model.load_state_dict(weights)
