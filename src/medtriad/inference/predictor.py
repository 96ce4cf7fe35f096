"""Predictor: one encoder pass per window feeds every head; results land in the input scan's own geometry.

Windows: with ``roi_size`` unset the whole volume (zero-padded evenly on both sides to the encoder's size divisor) is
one window; otherwise Gaussian-weighted sliding windows (MONAI's ``dense_patch_slices`` and importance map) tile it.
Per window the encoder runs once; the segmentation head's probabilities are blended, the detection head's boxes are
shifted into volume coordinates and merged by NMS, and the classification head's attention tokens are gathered so
that the case-level attention pooling runs over the tokens of all windows at once (the same pooling as one window
holding the whole volume). Test-time mirroring (``inference.mirror_axes``) and axis transposition
(``inference.permute_axes``) treat each copy of a window as one more window: one encoder pass per copy feeds every
head, probabilities and boxes are mapped back, and the pooling and NMS run over all copies. The copies then vote on
each box NMS keeps, as the members of an ensemble do (:func:`fuse_box_sets`): its score is the mean over copies of
each copy's best score for a box overlapping it, so a box one copy of 8 found keeps an eighth of its score.

Outputs are mapped back through :class:`medtriad.data.transforms.Geometry`: region probabilities are resampled to
the input grid and decoded into the training label convention (BraTS 0/1/2/4 stays 0/1/2/4) by choosing, per voxel,
the label whose region memberships are most probable; boxes come out in input voxel and world (mm) coordinates (the
voxel boxes mapped straight from the model grid, exact even for an oblique scan; a world box is the axis-aligned box
around the detected box's corners).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data.box_utils import box_iou, non_max_suppression
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size

from medtriad.checkpoint import load_weights, resolve_checkpoint
from medtriad.config import Config, InferenceConfig
from medtriad.data.boxes import centre_index_ranges, instances_from_mask, voxel_box_to_grid, voxel_box_to_world
from medtriad.data.transforms import Geometry, Sample, pad_to, preprocess_images, read_channels, resample
from medtriad.models.heads.classification import ClassificationHead
from medtriad.models.heads.detection import DetectionHead
from medtriad.models.memory_format import channels_last_on_cpu
from medtriad.models.multitask import ModelSpec, MultiTaskModel, build_model, load_model_weights
from medtriad.precision import autocast, autocast_dtype


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Prediction:
    """One case's results on the input grid.

    Attributes:
        mask: (X, Y, Z) label map in the training label convention (None without a segmentation head).
        boxes_voxel / boxes_world: (N, 6) xyzxyz boxes in input voxels (half-open edges) and world mm.
        scores: (N,) detection scores.
        probabilities: task -> {class or label name: probability}.
    """

    case_id: str
    geometry: Geometry
    mask: np.ndarray | None = None
    boxes_voxel: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), np.float32))
    boxes_world: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # task -> (X, Y, Z) in [0, 1], slice2d models


@dataclass
class GridOutput:
    """Raw outputs on the model grid (before mapping back)."""

    region_probs: torch.Tensor | None  # (R, X, Y, Z)
    boxes: torch.Tensor  # (N, 6)
    scores: torch.Tensor  # (N,)
    class_probs: dict[str, torch.Tensor]  # task -> (n,)
    heatmaps: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (X, Y, Z)


class Predictor:
    """Runs a trained :class:`MultiTaskModel` (or slice-plugin model, medtriad.models.anymc3d) on scans.

    Example::

        predictor = Predictor.from_pretrained("runs/brats")
        result = predictor.predict(["case_0000.nii.gz", "case_0001.nii.gz", "case_0002.nii.gz", "case_0003.nii.gz"])

    The predictor takes over the model it is given, as ``module.to`` does: it is moved to the device and set to
    eval mode, and on the CPU it is held channels-last with its instance norms replaced, in place, by the equal group
    norms (:func:`~medtriad.models.memory_format.channels_last_on_cpu`: same parameters, same outputs).
    """

    def __init__(self, model: torch.nn.Module, inference: InferenceConfig | None = None, device: str | None = None,
                 heatmaps: bool = False):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        # on the CPU: channels-last memory and instance norms as the equal group norms (models/memory_format.py)
        self._channels_last = self.device.type == "cpu" and isinstance(model, MultiTaskModel)
        if self._channels_last:
            self.model = channels_last_on_cpu(self.model)
        self.spec: ModelSpec = model.spec
        self.inference = inference or InferenceConfig()
        if "segmentation" in self.spec.heads:  # a misnamed region fails here, not after the first case's pass
            region_thresholds(self.inference.segmentation_threshold, self.spec.regions)
        self.heatmaps = heatmaps  # slice2d models: also each task's attention heatmap (same backbone pass)
        # the encoder and heads' forward passes run under this (None for fp32: float32 throughout)
        self._autocast_dtype = autocast_dtype(self.inference.precision, self.device, "inference.precision")

    def _autocast(self) -> torch.autocast:
        return autocast(self.device, self._autocast_dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, checkpoint: str = "best",
                        heatmaps: bool = False, inference: dict | None = None) -> "Predictor":
        """Load from a run folder (``model.json``, ``config.yaml``, ``checkpoints/<checkpoint>``) or a checkpoint folder
        that holds its own ``model.json``. ``inference`` overrides the run's inference settings by key (e.g.
        ``{"mirror_axes": []}``)."""
        path = Path(path)
        if (path / "model.json").is_file() and (path / "checkpoints").is_dir():
            run, folder = path, path / "checkpoints" / checkpoint
        else:
            run, folder = path.parent.parent, path
        spec_file = folder / "model.json" if (folder / "model.json").is_file() else run / "model.json"
        if not spec_file.is_file():
            raise FileNotFoundError(f"no model.json in {path}: expected a run folder or a checkpoint folder")
        spec = ModelSpec.load(spec_file)
        overrides = {f"inference.{key}": value for key, value in (inference or {}).items()}
        # a run folder: its config.yaml; a checkpoint folder: the copy it holds, else (saved before checkpoints held
        # one) its run's, if its parent's parent is a run; neither: the defaults, with a warning
        own, runs = folder / "config.yaml", run / "config.yaml" if (run / "model.json").is_file() else None
        order = (runs, own) if path == run else (own, runs)
        config_file = next((f for f in order if f is not None and f.is_file()), None)
        if config_file is None:
            warnings.warn(f"{path}: no config.yaml with it or in its run folder: the default inference settings are "
                          f"used (whole volume, no mirroring, no detection gate); set them with ``inference`` "
                          f"(--set inference.KEY=VALUE on the command line)", stacklevel=2)
        config = Config.load(config_file, overrides)
        model = build_model(spec, run)
        load_model_weights(model, load_weights(resolve_checkpoint(folder)))
        return cls(model, config.inference, device, heatmaps)

    @classmethod
    def from_plugins(cls, backbone: str | Path, plugins: Sequence[str | Path], device: str | None = None,
                     inference: InferenceConfig | None = None) -> "Predictor":
        """Several tasks' plugins (``RUN/plugins/<task>.safetensors`` of slice2d runs) on ONE copy of their frozen
        backbone (a Hugging Face folder or state dict): one model predicting every task.

        The plugins must share the backbone, slicing, spacing, normalisation and number of channels they were
        trained with (the first plugin names the channels).
        """
        from medtriad.models.anymc3d import PluginModel, load_plugin, read_plugin_metadata
        from medtriad.models.encoders.slice2d import Slice2DEncoder

        if not plugins:
            raise ValueError("from_plugins needs at least one plugin file")
        metas = [read_plugin_metadata(p)["extra"] for p in plugins]
        if any(not m.get("task") for m in metas):
            raise ValueError("plugin files written by save_plugin without run metadata cannot be predicted from; "
                             "use the plugins/ files of a training run")
        first = metas[0]
        for path, meta in zip(plugins, metas):  # channel names may differ (CT vs MRA), their number may not
            for key in ("spacing", "normalization", "encoder_kwargs"):
                if meta[key] != first[key]:
                    raise ValueError(f"{path}: {key} {meta[key]} differs from {first[key]} of {plugins[0]}")
            if len(meta["channel_names"]) != len(first["channel_names"]):
                raise ValueError(f"{path}: {len(meta['channel_names'])} input channels, {plugins[0]} has "
                                 f"{len(first['channel_names'])}")
        encoder = Slice2DEncoder(len(first["channel_names"]), weights=backbone, **first["encoder_kwargs"])
        loaded = [load_plugin(p, encoder) for p in plugins]
        tasks = {plugin.config.task: meta["task"] for plugin, meta in zip(loaded, metas)}
        if len(tasks) != len(loaded):
            raise ValueError(f"two plugin files serve the same task: {[p.config.task for p in loaded]}")
        spec = ModelSpec(encoder="slice2d", in_channels=len(first["channel_names"]),
                         channel_names=list(first["channel_names"]), heads=["classification"],
                         spacing=list(first["spacing"]), normalization=first["normalization"],
                         encoder_kwargs={"weights": str(backbone), **first["encoder_kwargs"]}, tasks=tasks,
                         plugins={p.config.task: dataclasses.asdict(p.config) for p in loaded})
        return cls(PluginModel(encoder, {p.config.task: p for p in loaded}, spec), inference, device)

    # ------------------------------------------------------------------ model grid
    @torch.no_grad()
    def predict_grid(self, image: torch.Tensor) -> GridOutput:
        """(C, X, Y, Z) normalised image on the model grid -> raw outputs on that grid."""
        if not isinstance(self.model, MultiTaskModel):
            return self._predict_plugins(image)
        heads = self.model.heads
        if "detection" in heads and isinstance(heads["detection"], DetectionHead):  # its own per-window selection
            i = self.inference  # follows the inference settings in use, not those model.json was built with
            heads["detection"].set_box_selection(i.score_threshold, i.nms_threshold, i.max_detections)
        div = self.model.size_divisible
        shape = tuple(image.shape[1:])
        roi = self.inference.roi_size
        roi = round_up(shape if roi is None else roi, div)
        padded_shape = tuple(max(s, r) for s, r in zip(shape, roi))
        x, inside = self._padded_batch(image, padded_shape)
        roi = get_valid_patch_size(padded_shape, roi)
        interval = [max(1, int(r * (1 - self.inference.overlap))) for r in roi]
        slices = dense_patch_slices(padded_shape, roi, interval)
        weight_map = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=self.device)
        seg = heads["segmentation"] if "segmentation" in heads else None
        probs = torch.zeros((len(self.spec.regions), *padded_shape), device=self.device) if seg else None
        weights = torch.zeros(padded_shape, device=self.device) if seg else None
        boxes, scores, copy_ids, tokens = [], [], [], {}
        copies = window_copies(self.inference.mirror_axes, self.inference.permute_axes)
        if len({roi[a] for a in self.inference.permute_axes}) > 1:
            raise ValueError(f"inference.permute_axes {list(self.inference.permute_axes)} needs a window of equal size "
                             f"along those axes; the window is {list(roi)} (set inference.roi_size to a cube, or "
                             f"permute only axes of equal size)")
        for window in slices:
            region = (slice(None), slice(None), *window)
            offset = torch.tensor([w.start for w in window] * 2, device=self.device, dtype=torch.float32)
            for copy_id, (perm, flipped) in enumerate(copies):  # one encoder pass per window and copy feeds every head
                dims = [a + 2 for a in flipped]  # grid axes -> batch tensor dims
                view = torch.flip(x[region], dims) if dims else x[region]
                inverse = [perm.index(a) for a in range(3)]
                with self._autocast():  # outputs back in float32 before they are combined
                    view = view.permute(0, 1, *(a + 2 for a in perm))
                    if self._channels_last:
                        view = view.contiguous(memory_format=torch.channels_last_3d)
                    features = self.model.encoder(view)
                    if seg is not None:
                        window_probs = torch.sigmoid(seg(features).float()).permute(0, 1, *(a + 2 for a in inverse))
                        window_probs = torch.flip(window_probs, dims) if dims else window_probs
                        probs[(slice(None), *window)] += window_probs[0] * weight_map
                        weights[window] += weight_map
                    if "detection" in heads:
                        det = heads["detection"](features, roi)[0]  # roi: the same along permuted axes
                        found = det["boxes"].float()[:, inverse + [a + 3 for a in inverse]]
                        boxes.append(unflip_boxes(found, flipped, roi) + offset)
                        scores.append(det["labels_scores"].float())
                        copy_ids.append(torch.full((len(found),), copy_id))
                    if "classification" in heads:  # tokens pooled over all windows below, in float32
                        for task, (s, v) in heads["classification"].encode(features).items():
                            tokens.setdefault(task, []).append((s.float(), v.float()))
        out = GridOutput(None, torch.zeros((0, 6)), torch.zeros((0,)), {})
        if seg is not None:
            out.region_probs = (probs / weights.clamp_min(1e-6))[(slice(None), *inside)].cpu()
        if boxes:
            all_boxes, all_scores, all_copies = torch.cat(boxes).cpu(), torch.cat(scores).cpu(), torch.cat(copy_ids)
            all_boxes = all_boxes - torch.tensor([s.start for s in inside] * 2, dtype=torch.float32)
            all_boxes = torch.minimum(all_boxes.clamp_min(0), torch.tensor(shape * 2, dtype=torch.float32))
            # a box found (almost) wholly in the padding is left as a sliver on the scan's face when clipped: one that
            # holds no voxel centre of the scan along some axis (half-open edges, centres at i + 0.5) is not a finding;
            # dropped before the boxes of all windows and copies compete, so that it suppresses no real box
            starts, stops = centre_index_ranges(all_boxes.numpy())
            inside_scan = torch.from_numpy((stops > starts).all(1))
            all_boxes, all_scores = all_boxes[inside_scan], all_scores[inside_scan]
            all_copies = all_copies[inside_scan]
            if len(copies) > 1:  # each copy (its boxes from every window) votes on the boxes NMS keeps
                all_boxes, all_scores = fuse_box_sets(
                    [(all_boxes[all_copies == k], all_scores[all_copies == k]) for k in range(len(copies))],
                    self.inference.nms_threshold, self.inference.max_detections)
            elif len(slices) > 1 and len(all_boxes):
                keep = non_max_suppression(all_boxes, all_scores, self.inference.nms_threshold,
                                           max_proposals=self.inference.max_detections)
                all_boxes, all_scores = all_boxes[keep], all_scores[keep]
            out.boxes, out.scores = all_boxes, all_scores
        if tokens:
            head: ClassificationHead = heads["classification"]
            for task, parts in tokens.items():
                pooled = head.pool(torch.cat([s for s, _ in parts], 1), torch.cat([v for _, v in parts], 1))
                out.class_probs[task] = self._class_probs(task, head.decode(task, pooled)[0])
        return out

    def _padded_batch(self, image: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """(C, X, Y, Z) -> a batch of one (1, C, *size) on the device, zero-padded by training's own
        :func:`~medtriad.data.transforms.pad_to` (evenly on both sides of each axis), and the image's place in it.
        A whole-volume classifier sees the object where it saw it in training, and a mirrored copy puts it in the
        same place, not shifted by the padding."""
        inside = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(size, image.shape[1:]))  # pad_to's split
        return pad_to(image.to(self.device, torch.float32), size)[None], inside

    def _class_probs(self, task: str, logits: torch.Tensor) -> torch.Tensor:
        kind = self.spec.tasks[task]["kind"]
        return (torch.softmax(logits, -1) if kind == "multiclass" else torch.sigmoid(logits)).cpu()

    def _predict_plugins(self, image: torch.Tensor) -> GridOutput:
        """A slice-plugin model (encoder "slice2d") reads the whole volume: one pass per slice and view, every task's
        slice pooling over all slices (sliding windows would split the slice stack the pooling attends over)."""
        shape = tuple(image.shape[1:])
        padded = round_up(shape, self.model.size_divisible)
        x, inside = self._padded_batch(image, padded)
        with self._autocast():
            result = self.model(x, aux=False, need_weights=self.heatmaps)  # one pass gives logits and attention
        out = GridOutput(None, torch.zeros((0, 6)), torch.zeros((0,)), {})
        out.class_probs = {task: self._class_probs(task, v[0].float()) for task, v in result["logits"].items()}
        if self.heatmaps:
            out.heatmaps = {task: self.model.heatmap_from(result, task, padded)[(0, *inside)].float().cpu()
                            for task in result["logits"]}
        return out

    # ------------------------------------------------------------------ input grid
    def to_input_grid(self, case_id: str, geometry: Geometry, grid: GridOutput) -> Prediction:
        """Map raw model-grid outputs back onto the input scan's grid and conventions."""
        pred = Prediction(case_id, geometry)
        canon_shape = geometry.to_canonical(np.empty(geometry.shape, dtype=np.uint8)).shape
        if grid.region_probs is not None:
            probs = geometry.from_canonical(resample(grid.region_probs, canon_shape, "trilinear").numpy())
            pred.mask = decode_labels(probs, self.spec.regions, self.spec.labels,
                                      self.inference.segmentation_threshold)
        for task, heatmap in grid.heatmaps.items():
            pred.heatmaps[task] = geometry.from_canonical(resample(heatmap[None], canon_shape, "trilinear").numpy())[0]
        keep = grid.scores >= self.inference.score_threshold
        found = grid.boxes[keep].numpy().reshape(-1, 6)
        pred.boxes_world = voxel_box_to_world(found, geometry.model_affine).astype(np.float32)
        # model grid -> input grid directly (axis order, flips, scale): exact, also for an oblique scan
        to_input = np.linalg.inv(geometry.affine) @ geometry.model_affine
        pred.boxes_voxel = voxel_box_to_grid(found, to_input).astype(np.float32)
        pred.scores = grid.scores[keep].numpy().astype(np.float32)
        if pred.mask is not None:
            if self.inference.detection_gate is not None and "detection" in self.spec.heads:  # else: no gate
                pred.mask = gate_by_boxes(pred.mask, pred.boxes_voxel, pred.scores, self.inference.detection_gate,
                                          self.inference.detection_gate_fraction)
            if self.inference.largest_components:
                pred.mask = keep_largest_components(pred.mask, self.inference.largest_components)
        for task, p in grid.class_probs.items():
            info = self.spec.tasks[task]
            values = p.numpy().tolist()
            if info["kind"] == "binary":
                values = [1.0 - values[0], values[0]]
            pred.probabilities[task] = dict(zip(info["classes"], map(float, values)))
        return pred

    def predict_sample(self, sample: Sample) -> Prediction:
        return self.to_input_grid(sample.case_id, sample.geometry, self.predict_grid(sample.image))

    def predict(self, images: Sequence[str | Path | None] | np.ndarray, affine: np.ndarray | None = None,
                case_id: str = "case") -> Prediction:
        """Predict one case from its channel files (None for a missing contrast, in the model's channel order) or
        from a (C, X, Y, Z) array with its 4x4 ``affine``."""
        if isinstance(images, np.ndarray):
            if affine is None:
                raise ValueError("an image array needs its 4x4 affine")
            if images.ndim != 4 or images.shape[0] != self.spec.in_channels:
                raise ValueError(f"expected an array of shape ({self.spec.in_channels}, X, Y, Z), got {images.shape}")
            channels, affine = list(images.astype(np.float32)), np.asarray(affine)
        else:
            if len(images) != self.spec.in_channels:
                raise ValueError(f"expected {self.spec.in_channels} channel files "
                                 f"({', '.join(self.spec.channel_names)}), got {len(images)}")
            channels, affine = read_channels({i: None if p is None else Path(p) for i, p in enumerate(images)},
                                             case_id)
        image, _, geometry = preprocess_images(channels, affine, self.spec.spacing, case_id,
                                                    self.spec.normalization)
        return self.to_input_grid(case_id, geometry, self.predict_grid(image))


def fuse_box_sets(sets: Sequence[tuple[torch.Tensor, torch.Tensor]], iou_threshold: float, max_detections: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (boxes, scores) that N predictions of one image found (test-time copies, ensemble members) -> one set.

    NMS over all of them picks the boxes; each kept box is scored by the mean over the N of that prediction's best
    score for a box overlapping it by ``iou_threshold`` (0 for one that found nothing there): a box only one of N
    found keeps 1/N of its score, so more copies or members do not add their false positives at full confidence
    (the scoring of weighted box fusion, with the winning box's coordinates kept). The ``max_detections`` best by
    the fused score are kept, sorted by it."""
    boxes, scores = torch.cat([b for b, _ in sets]), torch.cat([s for _, s in sets])
    if not len(boxes):
        return boxes, scores
    kept = boxes[non_max_suppression(boxes, scores, iou_threshold)]  # no cap yet: the vote may reorder them
    fused = torch.zeros(len(kept), dtype=scores.dtype, device=kept.device)
    for member_boxes, member_scores in sets:
        if len(member_boxes):
            overlap = box_iou(kept, member_boxes) >= iou_threshold
            fused += torch.where(overlap, member_scores[None, :], member_scores.new_zeros(())).amax(1)
    fused /= len(sets)
    order = torch.argsort(fused, descending=True, stable=True)[:max_detections]
    return kept[order], fused[order]


def window_copies(mirror_axes: Sequence[int], permute_axes: Sequence[int] = ()) -> list[tuple[list[int], list[int]]]:
    """Every test-time copy of a window as (axis order, flipped axes): each order of ``permute_axes`` (the other
    axes stay) combined with each subset of ``mirror_axes`` flipped; the unchanged window comes first. A copy is the
    window flipped along the flipped axes, then transposed so that its axis i is the flipped window's axis order[i]."""
    flips = [list(c) for k in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, k)]
    orders = []
    for order in itertools.permutations(sorted(permute_axes)):
        perm = [0, 1, 2]
        for axis, source in zip(sorted(permute_axes), order):
            perm[axis] = source
        orders.append(perm)
    return [(perm, flipped) for perm in orders for flipped in flips]


def unflip_boxes(boxes: torch.Tensor, axes: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """(N, 6) xyzxyz boxes found in a copy mirrored along ``axes`` of a window of ``size`` -> boxes in the window."""
    out = boxes.clone()
    for a in axes:
        out[:, a], out[:, a + 3] = size[a] - boxes[:, a + 3], size[a] - boxes[:, a]
    return out


def round_up(sizes: Sequence[int], divisor: int) -> tuple[int, ...]:
    """Each size rounded up to a multiple of ``divisor`` (the encoder's size divisor)."""
    return tuple(int(np.ceil(n / divisor) * divisor) for n in sizes)


def decode_labels(region_probs: np.ndarray, regions: dict[str, Sequence[int]], labels: dict[str, int],
                  threshold: float | Mapping[str, float] = 0.5) -> np.ndarray:
    """Most probable label per voxel given independent region probabilities.

    Each label (background included) implies a membership pattern over the regions (BraTS: edema 2 lies in WT only,
    necrosis 1 in WT and TC, enhancing 4 in all three); the label whose pattern has the highest likelihood under the
    predicted region probabilities wins. For nested regions this reduces to the usual BraTS thresholding cascade.
    ``threshold`` moves the decision point of a region: memberships are scored as p / t against
    (1 - p) / (1 - t), so a lone region is present exactly where p > t (0.5: plain likelihood).

    Args:
        region_probs: (R, X, Y, Z) probabilities in ``regions`` order.
        threshold: probability above which a region counts as present, in (0, 1): one value for every region, or
            region name -> value (regions not named keep 0.5).
    Returns:
        (X, Y, Z) uint8/int16 label map.
    """
    per_region = region_thresholds(threshold, regions)
    eps = 1e-6
    log_p = [(np.log(np.clip(region_probs[r], eps, 1.0)) - np.log(t)).astype(np.float32)
             for r, t in enumerate(per_region)]
    log_q = [(np.log(np.clip(1.0 - region_probs[r], eps, 1.0)) - np.log(1.0 - t)).astype(np.float32)
             for r, t in enumerate(per_region)]
    values = sorted(set(labels.values()) | {0})
    best = np.full(region_probs.shape[1:], -np.inf, dtype=np.float32)
    out = np.zeros(region_probs.shape[1:], dtype=np.uint8 if max(values) < 256 else np.int16)
    for value in values:
        score = sum(log_p[r] if value in members else log_q[r] for r, members in enumerate(regions.values()))
        better = score > best
        out[better], best[better] = value, score[better]
    return out


def region_thresholds(threshold: float | Mapping[str, float], regions: Sequence[str]) -> list[float]:
    """One decision threshold per region, in ``regions`` order, from one value for all or region name -> value
    (regions not named keep 0.5); a name that is not a region, or a value outside (0, 1), is a ValueError."""
    if isinstance(threshold, Mapping):
        unknown = set(threshold) - set(regions)
        if unknown:
            raise ValueError(f"segmentation threshold for unknown region(s) {sorted(unknown)}; "
                             f"the model's regions are {list(regions)}")
        per_region = [float(threshold.get(name, 0.5)) for name in regions]
    else:
        per_region = [float(threshold)] * len(regions)
    if not all(0.0 < t < 1.0 for t in per_region):
        raise ValueError(f"segmentation threshold must lie in (0, 1), got {threshold}")
    return per_region


def keep_largest_components(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """``mask`` (X, Y, Z) label map with every foreground voxel outside its ``n`` largest 26-connected foreground
    components (all labels taken together as one object, as nnU-Net's post-processing does) set to 0; labels
    inside them are kept as they are. Components are the detection boxes' own (:func:`instances_from_mask`);
    MONAI's ``KeepLargestConnectedComponent`` does the same but needs scikit-image."""
    components = instances_from_mask(mask != 0, np.eye(4), 0.0)
    count = int(components.max())
    if count <= n:
        return mask
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    kept = np.zeros(count + 1, dtype=bool)
    kept[1 + np.argsort(-sizes, kind="stable")[:n]] = True
    return np.where(kept[components], mask, 0).astype(mask.dtype, copy=False)


def gate_by_boxes(mask: np.ndarray, boxes: np.ndarray, scores: np.ndarray, min_score: float,
                  min_fraction: float = 0.0) -> np.ndarray:
    """``mask`` (X, Y, Z) label map with every 26-connected foreground component (all labels together) that has no
    voxel centre inside one of the (N, 6) half-open xyzxyz voxel ``boxes`` scoring at least ``min_score`` set to 0;
    when no box reaches ``min_score`` the top-scoring box serves, and without boxes the mask is returned as it is.
    With ``min_fraction`` > 0 a box keeps only the components it touches whose whole size is at least that fraction
    of the largest one it touches (a box stands for one lesion, as boxes derived from masks are one per connected
    component): small false positives inside an oversized box go; a second lesion in a box of its own stays unless
    that box also touches a much larger component. Labels inside kept components are untouched."""
    if not len(boxes) or not mask.any():
        return mask
    confident = scores >= min_score
    chosen = boxes[confident] if confident.any() else boxes[[int(np.argmax(scores))]]
    components = instances_from_mask(mask != 0, np.eye(4), 0.0)
    sizes = np.bincount(components.ravel())
    kept = np.zeros(len(sizes), dtype=bool)
    for lo, hi in zip(*centre_index_ranges(chosen, mask.shape)):
        present = np.bincount(components[tuple(slice(a, b) for a, b in zip(lo, hi))].ravel(), minlength=len(sizes))
        touched = np.flatnonzero(present[1:]) + 1  # ids of the components with a voxel centre in this box
        if len(touched):
            kept[touched[sizes[touched] >= min_fraction * sizes[touched].max()]] = True
    return np.where(kept[components], mask, 0).astype(mask.dtype, copy=False)
