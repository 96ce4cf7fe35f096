"""Run configuration: dataclasses for data, model, training and inference, YAML in and out.

A config file names only what it changes; everything else takes the defaults below. The fully resolved config is
saved as ``config.yaml`` in every run folder, so a run can always be reproduced and its model rebuilt.
Named recipes ship with the package (``src/medtriad/configs/*.yaml``); ``-c brats-cpu`` finds them by name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medtriad.io import atomic_write_text
from medtriad.precision import PRECISIONS

#: the task heads a model can have
HEAD_NAMES = ("segmentation", "detection", "classification")

INTENSITY_AUGMENTATIONS = ("light", "strong")  # medtriad.data.transforms.intensity_transforms


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4`` and
    reads ``1e-4`` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML text (a config file or a ``--set`` value) safely; a syntax error is a ValueError naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(error).split())})") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set SECTION.KEY=VALUE`` pairs -> {"SECTION.KEY": value}, each value read as YAML (the form
    :meth:`Config.load` takes); a pair without ``=`` or a section is a ValueError naming it."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set expects section.key=value, got {pair!r}")
        out[key] = load_yaml(value, f"--set {pair}")
    return out


@dataclass
class DataConfig:
    """How cases become network inputs.

    Args:
        spacing: target voxel spacing in mm (x, y, z); every case is resampled to it.
        patch_size: training patch in voxels of the target grid; must be a multiple of the encoder's size_divisible
            and leave the deepest map more than one voxel (the trainer checks both before the first step).
        foreground_ratio: share of patches centred on tumour (label > 0); the rest are centred anywhere.
        min_patch_box_voxels: a box cut by the patch border is kept while at least this many of its voxels remain.
        normalization: per-channel intensity normalisation, ``nonzero`` (z-score on non-zero voxels: skull-stripped
            MRI), ``all`` (z-score on all voxels) or ``none``.
        zoom_prob: chance of a random zoom (scale 0.85-1.15) per training patch; 0 = no scaling augmentation.
        rotation_planes: axis pairs of the random 90-degree rotations, e.g. ``[[0, 1], [0, 2], [1, 2]]`` for all 24
            orientations of a cube (with the flips: the full symmetry group, for data without a preferred
            orientation such as vessel segments); the patch must be square in each plane named. ``null`` (default):
            the x-y plane where the patch is square there, else none.
        intensity_augmentation: ``light`` (default: one scale and shift for all channels, noise) or ``strong``
            (adds nnU-Net-like per-channel brightness, contrast, low resolution, inverted gamma, gamma and blur, and a
            bias field, then sets zero voxels back to zero; :func:`medtriad.data.transforms.intensity_transforms`).
    """

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    patch_size: tuple[int, int, int] = (64, 64, 64)
    foreground_ratio: float = 0.67
    min_patch_box_voxels: int = 8
    normalization: str = "nonzero"
    zoom_prob: float = 0.3
    rotation_planes: list[list[int]] | None = None
    intensity_augmentation: str = "light"

    def __post_init__(self) -> None:
        for key, kind in (("spacing", (int, float)), ("patch_size", int)):
            value = getattr(self, key)
            if len(value) != 3 or not all(isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                                          for v in value):
                raise ValueError(f"data.{key} must be 3 positive {'numbers' if key == 'spacing' else 'integers'} "
                                 f"(x, y, z), got {list(value)}")
        if self.intensity_augmentation not in INTENSITY_AUGMENTATIONS:
            raise ValueError(f"data.intensity_augmentation must be one of {INTENSITY_AUGMENTATIONS}, got "
                             f"{self.intensity_augmentation!r}")
        if self.intensity_augmentation == "strong" and self.normalization == "none":
            raise ValueError("data.intensity_augmentation: strong sets voxels that were zero back to zero (background "
                             "after z-scoring); with data.normalization: none a zero is a real value (0 HU): use light")
        if not 0.0 <= self.zoom_prob <= 1.0:  # MONAI would clip it silently
            raise ValueError(f"data.zoom_prob must be a probability in [0, 1], got {self.zoom_prob}")
        for plane in self.rotation_planes or []:
            if (not isinstance(plane, (list, tuple)) or len(plane) != 2 or not all(a in (0, 1, 2) for a in plane)
                    or plane[0] == plane[1]):
                raise ValueError(f"data.rotation_planes holds pairs of two different axes from 0, 1, 2; got {plane}")
            if self.patch_size[plane[0]] != self.patch_size[plane[1]]:
                raise ValueError(f"data.rotation_planes: plane {list(plane)} needs a patch square in it; patch_size is "
                                 f"{list(self.patch_size)}")


@dataclass
class ModelConfig:
    """Which encoder and which heads; any subset of heads builds.

    Args:
        encoder: a name from the encoder registry (``swin``, ``resenc``, ``segresnet``, ``slice2d``).
        encoder_kwargs: passed to the encoder's constructor.
        heads: subset of ``segmentation``, ``detection``, ``classification``.
        segmentation: segmentation head settings: ``decoder`` ``unet`` (default; ``decoder_channels``: one width per
            decoder level, fine to coarse; ``prior``; ``deep_supervision``: coarser decoder levels scored in training;
            see SegmentationHead) or ``segresnet`` (MONAI SegResNet's decoder: ``blocks_up``, ``num_groups``,
            ``upsample_mode``, ``prior``; see SegResNetDecoder).
        detection: detection head settings (anchor shapes are derived from the training boxes when absent); how
            boxes are picked (score, NMS, count) belongs to ``inference``.
        classification_hidden: width of the attention-pooling MLP.
        classification_dropout: dropout on the pooled vector before each task's classifier (timm's ``drop_rate``);
            the 3D encoders' classification head (``slice2d`` plugins have their own head and do not use it).
        radial_coordinate: the encoder reads one more channel, each voxel's distance from the centre of its input
            window (medtriad.models.encoders.coordinates): a position cue for whole-volume classification of centred
            crops, unchanged by flips and 90-degree rotations. Not for ``slice2d``.
        plugin: encoder ``slice2d`` only (AnyMC3D): settings of every task's plugin, the fields of
            medtriad.models.anymc3d.PluginConfig (adapter lora|molre|none, rank, alpha, experts, views, query_dim,
            targets) plus ``aux: true`` for the auxiliary pixel decoder on cases with masks.
        plugin_tasks: task -> settings that differ from ``plugin`` for that task (e.g. {findings: {adapter: molre}}).
    """

    encoder: str = "resenc"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    heads: tuple[str, ...] = HEAD_NAMES
    segmentation: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    classification_hidden: int = 128
    classification_dropout: float = 0.0
    radial_coordinate: bool = False
    plugin: dict[str, Any] = field(default_factory=dict)
    plugin_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.classification_dropout < 1.0:
            raise ValueError(f"model.classification_dropout must lie in [0, 1), got {self.classification_dropout}")
        if self.radial_coordinate and self.encoder == "slice2d":
            raise ValueError("model.radial_coordinate is for the 3D encoders; slice2d reads its slices as images")
        for key in ("score_threshold", "nms_threshold", "max_detections"):  # the predictor sets them per call
            if key in self.detection:
                raise ValueError(f"model.detection.{key} is an inference setting: set inference.{key} instead")


@dataclass
class TrainingConfig:
    """The optimisation recipe.

    Args:
        epochs: number of epochs; each runs ``iterations_per_epoch`` steps, and every ``validate_every``-th (and the
            last) then validates.
        max_minutes: stop (after the current epoch's validation) once this much wall time has passed; 0 = no limit.
        balancing: ``fixed``, ``uncertainty`` (Kendall et al. 2018) or ``gradnorm`` (Chen et al. 2018).
        loss_weights: task -> weight for ``fixed`` (missing tasks weigh 1).
        encoder_gradient: head -> the share of that head's gradient that reaches the shared encoder (heads not
            named: 1, joint training). ``{detection: 0, classification: 0}``: only segmentation shapes the encoder
            and the other heads learn on its features (a stop-gradient); the loss weights still scale each head's
            own gradient. Not with ``gradnorm`` (it weighs tasks by the gradients this scales, and would undo it),
            nor for slice2d plugins (their backbone is frozen); not 0 for every head of a model with several. A
            model with one head (a recipe's single-task variant) ignores it: its head trains the encoder.
        num_folds: k of the stratified k-fold split; ``--fold K`` picks the validation fold.
        accumulate: gradient accumulation steps.
        ema_decay: 0 = off; otherwise an exponential moving average of the weights with this decay per step (timm's
            model EMA, built on PyTorch's ``AveragedModel``; batch-norm statistics averaged too) is what validation
            scores and what the checkpoints hold as the model; the raw training weights ride along for ``--resume``.
        precision: ``auto`` (bfloat16 autocast on CUDA, float16 on a GPU without native bfloat16, float32 on the
            CPU), ``bf16`` (the same on CUDA; bfloat16 on CPUs with native bfloat16 instructions, float32 on other
            CPUs) or ``fp32``; see :mod:`medtriad.precision`.
    """

    epochs: int = 50
    iterations_per_epoch: int = 50
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    warmup_iterations: int = 20
    balancing: str = "fixed"
    loss_weights: dict[str, float] = field(default_factory=dict)
    encoder_gradient: dict[str, float] = field(default_factory=dict)
    gradnorm_alpha: float = 1.5
    num_folds: int = 5
    seed: int = 0
    max_minutes: float = 0.0
    accumulate: int = 1
    num_threads: int = 0
    validate_every: int = 1
    ema_decay: float = 0.0
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:  # its type is checked when the config is read (_check_scalar_type)
            raise ValueError(f"training.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"training.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for head, share in self.encoder_gradient.items():
            if head not in HEAD_NAMES:
                raise ValueError(f"training.encoder_gradient: {head!r} is not a head; heads are {HEAD_NAMES}")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise ValueError(f"training.encoder_gradient.{head} must be a share in [0, 1] (0: stop-gradient, "
                                 f"1: joint training); got {share!r}")
        if self.balancing == "gradnorm" and any(share != 1 for share in self.encoder_gradient.values()):
            raise ValueError(f"balancing 'gradnorm' weighs tasks by their gradients on the shared encoder, which "
                             f"training.encoder_gradient {self.encoder_gradient} scales (GradNorm would undo it): "
                             f"use 'fixed' or 'uncertainty'")


@dataclass
class InferenceConfig:
    """Sliding-window inference settings (used for validation, evaluation and prediction).

    Args:
        roi_size: window in voxels of the target grid; ``None`` = the whole (padded) volume in one window.
        overlap: window overlap fraction.
        score_threshold: detection boxes below this score are dropped.
        nms_threshold: IoU above which overlapping boxes are suppressed (within and across windows); also the
            overlap at which a test-time copy's or ensemble member's box counts as its vote for a kept box.
        max_detections: boxes kept per case.
        mirror_axes: test-time mirroring (nnU-Net's): every combination of flips along these grid axes is one more
            copy of each window (``[0]``: 2 encoder passes per window, ``[0, 1, 2]``: 8, ``[]``: off); each pass
            feeds every head: segmentation probabilities are averaged, boxes flipped back and merged by NMS, each
            kept box scored by the mean over copies of each copy's best overlapping score (a box one copy of 8 found
            keeps an eighth of its score; as ensemble members vote), the classification pooling runs over the tokens
            of all copies. Validation during training never mirrors (it
            only ranks epochs); ``evaluate`` and ``predict`` do. Slice-plugin (slice2d) models do not mirror.
        permute_axes: test-time transposition: every order of these grid axes is one more copy of each window,
            combined with every mirrored copy (``[0, 1, 2]`` with ``mirror_axes: [0, 1, 2]``: all 48 symmetries of
            a cube, 48 passes); outputs are transposed back as mirrored ones are flipped back. The window must have
            equal sizes along these axes. For models trained with ``data.rotation_planes`` in those planes; like
            mirroring, never during training's validation, not for slice2d models.
        segmentation_threshold: region probability above which a region counts as present when the label map is
            decoded (see :func:`medtriad.inference.predictor.decode_labels`): one value for every region, or a
            mapping from region name to its own value (``{ET: 0.4}``; regions not named keep 0.5).
        largest_components: post-processing of the decoded label map (nnU-Net's "keep the largest foreground
            component"): every foreground label taken together as one object, only the N largest 26-connected
            components are kept and the rest set to background (what MONAI's ``KeepLargestConnectedComponent`` does).
            ``None``: off. Removes stray false positives far from the lesion; a second, smaller true lesion goes
            with them unless N allows for it.
        detection_gate: segmentation gated by detection, for models with both heads: every 26-connected foreground
            component of the decoded label map (all labels together) that has no voxel inside a detected box scoring
            at least this value is set to background; when no box reaches it, the top-scoring box serves (a case
            with no box at all keeps its mask). Applied before ``largest_components``; ignored by models without a
            detection head (a recipe's single-task variants). Removes false positives far from every detected lesion
            while keeping a second lesion the detector found. ``None``: off.
        detection_gate_fraction: with ``detection_gate`` on (ignored without it), each of the boxes the gate uses
            keeps only the components it touches that have at least this fraction of the voxels of the largest
            component it touches (a box stands for one lesion): small false positives inside an oversized box go.
            ``0``: off (every component touching a box is kept). See :func:`medtriad.inference.predictor.gate_by_boxes`.
        precision: ``fp32`` (default), or ``bf16``: the encoder and heads run under bfloat16 autocast on CUDA (float16
            on a GPU without native bfloat16) and on CPUs with native bfloat16 instructions (float32 with a warning on
            other CPUs), probabilities and boxes cast back to float32; ``auto``: the same on CUDA only. See
            :mod:`medtriad.precision`.
    """

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.25
    score_threshold: float = 0.05
    nms_threshold: float = 0.1
    max_detections: int = 20
    mirror_axes: tuple[int, ...] = ()
    permute_axes: tuple[int, ...] = ()
    segmentation_threshold: float | dict[str, float] = 0.5
    largest_components: int | None = None
    detection_gate: float | None = None
    detection_gate_fraction: float = 0.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # checked when the config is read, not when a trained run is first evaluated
        if self.precision not in PRECISIONS:
            raise ValueError(f"inference.precision must be one of {PRECISIONS}, got {self.precision!r}")
        n = self.largest_components
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"inference.largest_components must be a whole number >= 1 or null (off); got {n!r}")
        gate = self.detection_gate
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate <= 1):
            raise ValueError(f"inference.detection_gate must be a box score in [0, 1] or null (off); got {gate!r}")
        f = self.detection_gate_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"inference.detection_gate_fraction must be a fraction in [0, 1] (0: off); got {f!r}")
        t = self.segmentation_threshold
        values = list(t.values()) if isinstance(t, dict) else [t]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in values) or (
                isinstance(t, dict) and not all(isinstance(k, str) for k in t)):
            raise ValueError(f"inference.segmentation_threshold must be a probability in (0, 1) or a mapping from "
                             f"region name to one (e.g. {{ET: 0.4}}); got {t!r}")
        axes = list(self.mirror_axes)
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"inference.mirror_axes must be distinct grid axes among 0, 1, 2; got {axes}")
        axes = list(self.permute_axes)
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes) or len(axes) == 1:
            raise ValueError(f"inference.permute_axes must be none or at least two distinct grid axes among 0, 1, 2; "
                             f"got {axes}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        # checked when the config is read, not after a dataset has been loaded for training
        if self.model.encoder == "slice2d" and any(v != 1 for v in self.training.encoder_gradient.values()):
            raise ValueError("training.encoder_gradient is for the 3D encoders; the slice2d backbone is frozen (each "
                             "plugin trains its own adapters)")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def changes_to(self, other: "Config") -> list[str]:
        """``section.key: this value -> other value`` for every setting that differs (empty: the same config)."""
        return _changed_keys(self.to_dict(), other.to_dict())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            section_cls = type(f.default_factory())  # type: ignore[misc]
            section = raw.get(f.name) or {}
            if not isinstance(section, dict):
                raise ValueError(f"config section {f.name!r} must be a mapping of keys, got {section!r}")
            built[f.name] = _build(section_cls, section, f.name)
        return cls(**built)

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "Config":
        """Load a YAML file or a packaged recipe by name; ``None`` gives the defaults.

        ``overrides``: dotted key -> value, ``section.field`` (``training.epochs``) or, for a field that is a mapping,
        one entry of it (``model.segmentation.deep_supervision``: the recipe's other entries stay)."""
        raw: dict[str, Any] = {}
        if name_or_path is not None:
            path = _resolve(name_or_path)
            raw = load_yaml(path.read_text(), str(path)) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: a config is a mapping of sections (data, model, training, inference), got "
                                 f"{type(raw).__name__}")
        for key, value in (overrides or {}).items():
            *path, name = key.split(".")
            if not path or not all(path) or not name:
                raise ValueError(f"override {key!r}: expected section.key (e.g. training.epochs)")
            node = raw
            for depth, part in enumerate(path):
                if node.get(part) is None:
                    node[part] = {}
                if not isinstance(node[part], dict):
                    raise ValueError(f"override {key!r}: {'.'.join(path[:depth + 1])} is {node[part]!r}, not a mapping")
                node = node[part]
            node[name] = value
        return cls.from_dict(raw)


def list_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("medtriad.configs").iterdir()
                  if p.name.endswith(".yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = resources.files("medtriad.configs") / f"{name_or_path}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise ValueError(f"config {str(name_or_path)!r} is neither a file nor a packaged recipe {list_recipes()}")


def _build(section_cls: type, raw: dict[str, Any], section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in config section {section!r}; known: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        default = getattr(section_cls(), name)
        _check_scalar_type(value, default, f"{section}.{name}")
        annotation = str(fields[name].type)  # a string: `from __future__ import annotations`
        if value is None and "None" not in annotation and default is not None:
            raise ValueError(f"{section}.{name} cannot be null")
        if value is not None and annotation.startswith(("tuple[", "list[")) and not isinstance(value, (list, tuple)):
            raise ValueError(f"{section}.{name} must be a list (e.g. [2, 2, 2]), got {value!r}")
        if value is not None and annotation.startswith("dict[") and not isinstance(value, dict):
            raise ValueError(f"{section}.{name} must be a mapping (e.g. {{key: value}}), got {value!r}")
        if isinstance(default, tuple) or (default is None and isinstance(value, list)):
            value = tuple(value) if value is not None else None
        values[name] = value
    return section_cls(**values)


def _check_scalar_type(value: Any, default: Any, key: str) -> None:
    """A setting whose default is a bool, a number or a string takes a value of that kind (an int where a float is
    expected): `--set training.max_minutes=null` or `training.batch_size=abc` is refused here, naming the key, instead
    of failing later inside a library. Settings whose default is None, a tuple or a dict are checked by their section."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ValueError(f"{key} must be {kind}, got {value!r}")


def _changed_keys(mine: dict, other: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(mine) | set(other)):
        x, y = mine.get(key), other.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _changed_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
