"""From channel files to network inputs and back: preprocessing, training patches, and the inverse geometry.

Preprocessing (:func:`load_sample`, :func:`preprocess_images`): channels are read with nibabel, reoriented to the
closest canonical (RAS) axes, resampled to the model's spacing, and z-scored per channel on foreground (non-zero)
voxels (or as ``normalization`` says). Missing channels arrive zero-filled (zero is the mean after z-scoring) with ``channel_mask`` False.
Every step is recorded in :class:`Geometry`, which maps model-grid outputs back onto the input file's own grid:
masks land on the same voxels, boxes come out in input voxel and world (mm) coordinates.

Training patches (:func:`training_transforms`): MONAI dictionary transforms crop foreground-oversampled patches and
augment them (flips, 90-degree rotations, scaling, intensity). Boxes stay consistent with masks by construction: a
connected-component instance map travels through the same spatial transforms as the image (nearest-neighbour), and
each patch's boxes are read off the augmented instance map (:func:`medtriad.data.boxes.boxes_from_instances`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensity,
    RandAdjustContrast,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmooth,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolution,
    RandShiftIntensityd,
    RandZoomd,
)
from monai.utils import MAX_SEED

from medtriad.config import INTENSITY_AUGMENTATIONS
from medtriad.data.boxes import boxes_from_instances, instances_from_boxes, instances_from_mask, same_boxes
from medtriad.data.layout import Case, DatasetSpec
from medtriad.io import CaseFileError, load_nifti, same_grid


@dataclass
class Geometry:
    """How the model grid relates to the input file's grid.

    Attributes:
        affine / shape: the input file's affine and array shape.
        ornt: nibabel orientation transform from the input array to the canonical (RAS) array.
        model_affine / model_shape: affine and shape of the resampled canonical grid the model sees.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    ornt: np.ndarray
    model_affine: np.ndarray
    model_shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) input-grid array -> canonical axes (leading axes untouched)."""
        return _apply_ornt(array, self.ornt)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        return _apply_ornt(array, nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), self.ornt))


def _apply_ornt(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    lead = array.ndim - 3
    full = np.concatenate([[[k, 1] for k in range(lead)], ornt + [[lead, 0]]]) if lead else ornt
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, full))


def make_geometry(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> Geometry:
    """The canonical, resampled grid for an input of ``shape`` with ``affine`` at target ``spacing`` (mm)."""
    ornt = nib.orientations.io_orientation(affine)
    canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    canon_shape = tuple(int(shape[int(ax)]) for ax in ornt[:, 0].argsort())
    canon_spacing = np.sqrt((canon_affine[:3, :3] ** 2).sum(0))
    model_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(canon_shape, canon_spacing, spacing))
    scale = np.array(canon_shape, dtype=float) / np.array(model_shape, dtype=float)
    # align_corners=False resampling: model index j sits at canonical index (j + 0.5) * scale - 0.5
    resample = np.eye(4)
    resample[:3, :3] = np.diag(scale)
    resample[:3, 3] = 0.5 * scale - 0.5
    return Geometry(np.asarray(affine, dtype=float), tuple(int(s) for s in shape), ornt, canon_affine @ resample,
                    model_shape)


def resample(array: np.ndarray | torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """(C, X, Y, Z) -> (C, *size) by ``F.interpolate`` in ``mode``: ``trilinear`` (align_corners=False, the grid
    convention of :func:`make_geometry`) for images and region masks, ``nearest-exact`` for instance maps (output
    voxel j takes input voxel floor((j + 0.5) * scale), the one under its centre: at an odd integer scale the same
    voxels as the thresholded trilinear regions, and never more than half an input voxel off that centre at any
    scale, where PyTorch's ``nearest``, floor(j * scale), lies (scale - 1) / 2 input voxels before it: a shift of
    the boxes that grows with the scale)."""
    t = torch.as_tensor(array)
    dtype = t.dtype
    out = F.interpolate(t[None].float(), size=tuple(size), mode=mode,
                        **({"align_corners": False} if mode == "trilinear" else {}))[0]
    return out if mode == "trilinear" else out.to(dtype)


NORMALIZATIONS = ("nonzero", "all", "none")


def normalize(image: torch.Tensor, mode: str = "nonzero") -> torch.Tensor:
    """Per-channel intensity normalisation.

    ``"nonzero"``: z-score over non-zero (foreground) voxels, background left at 0, as nnU-Net does for skull-stripped
    MRI; ``"all"``: z-score over all voxels (images whose non-zero voxels share one value, e.g. MedMNIST's shape
    masks, where a foreground z-score would erase everything); ``"none"``: unchanged.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    image = image.float().clone()  # MONAI's transform works in place; the caller's tensor stays as it was
    if mode == "none":
        return image
    return NormalizeIntensity(nonzero=mode == "nonzero", channel_wise=True)(image).as_tensor().float()


@dataclass
class Sample:
    """One case on the model grid.

    Attributes:
        image: (C, X, Y, Z) float32, normalised; missing channels are zeros.
        channel_mask: (C,) bool, True where the channel was present.
        regions: (R, X, Y, Z) uint8 region masks, or None without a label file.
        instances: (X, Y, Z) int32 lesion instance ids (boxes' source), or None.
        label: the label map on the input grid (for evaluation), or None.
    """

    case_id: str
    image: torch.Tensor
    channel_mask: torch.Tensor
    geometry: Geometry
    regions: torch.Tensor | None = None
    instances: torch.Tensor | None = None
    label: np.ndarray | None = None
    classes: dict = field(default_factory=dict)
    boxes: np.ndarray | None = None  # (M, 6) ground-truth boxes in input voxel coordinates


def preprocess_images(channels: Sequence[np.ndarray | None], affine: np.ndarray, spacing: Sequence[float],
                      case_id: str = "?", normalization: str = "nonzero") -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    """Channel arrays on one grid (None = missing) -> (image (C, ...), channel_mask (C,), geometry);
    ``normalization`` as in :func:`normalize`."""
    present = [c for c in channels if c is not None]
    if not present:
        raise CaseFileError(case_id, "(no channel file)", "no image channel present")
    shape = present[0].shape
    geometry = make_geometry(affine, shape, spacing)
    stack = np.zeros((len(channels), *shape), dtype=np.float32)
    for i, c in enumerate(channels):
        if c is not None:
            stack[i] = c
    image = resample(geometry.to_canonical(stack), geometry.model_shape, "trilinear")
    mask = torch.tensor([c is not None for c in channels])
    return normalize(image, normalization) * mask[:, None, None, None], mask, geometry


def read_channels(files: Mapping[int, Path | None], case_id: str) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Read every channel file; all present channels must share shape and affine (else CaseFileError)."""
    arrays: list[np.ndarray | None] = []
    reference: tuple[Path, tuple, np.ndarray] | None = None
    for index in sorted(files):
        path = files[index]
        if path is None:
            arrays.append(None)
            continue
        data, affine = load_nifti(path, case_id)
        if not np.isfinite(data).all():
            raise CaseFileError(case_id, path, "image holds NaN or infinite values")
        reference = same_grid(case_id, path, data.shape, affine, reference)
        arrays.append(data.astype(np.float32, copy=False))
    if reference is None:
        raise CaseFileError(case_id, "(no channel file)", "no image channel present")
    return arrays, reference[2]


def regions_from_label(label: np.ndarray, regions: Mapping[str, Sequence[int]]) -> np.ndarray:
    """(X, Y, Z) label map -> (R, X, Y, Z) uint8 region masks in ``regions`` order."""
    return np.stack([np.isin(label, list(values)) for values in regions.values()]).astype(np.uint8)


def load_sample(case: Case, spec: DatasetSpec, spacing: Sequence[float], with_targets: bool = True,
                normalization: str = "nonzero") -> Sample:
    """Read and preprocess one case of a dataset (images, and targets when ``with_targets``)."""
    channels, affine = read_channels(case.image_files, case.case_id)
    image, mask, geometry = preprocess_images(channels, affine, spacing, case.case_id, normalization)
    sample = Sample(case.case_id, image, mask, geometry, classes=dict(case.classes))
    if not with_targets:
        return sample
    instances = None  # lesion instances on the input grid, from the label map
    if case.label_file is not None:
        label, label_affine = load_nifti(case.label_file, case.case_id)
        first = next(case.image_files[c] for c in sorted(case.image_files) if case.image_files[c] is not None)
        same_grid(case.case_id, case.label_file, label.shape, label_affine, (first, geometry.shape, affine))
        if not np.isfinite(label).all():  # (evaluate reads labels without `check` first)
            raise CaseFileError(case.case_id, case.label_file, "label holds NaN or infinite values")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            values = np.unique(label[rounded != label])[:5].tolist()
            raise CaseFileError(case.case_id, case.label_file, f"label holds non-integer values, e.g. {values}")
        label = rounded.astype(np.int16)
        unknown = sorted(set(np.unique(label).tolist()) - set(spec.labels.values()))
        if unknown:
            raise CaseFileError(case.case_id, case.label_file,
                                f"label values {unknown} are not declared in dataset.json {spec.labels}")
        sample.label = label
        regions = regions_from_label(label, spec.regions)
        sample.regions = (resample(geometry.to_canonical(regions), geometry.model_shape, "trilinear") > 0.5).to(
            torch.uint8)
        if spec.detection_region is not None:
            region = np.isin(label, list(spec.regions[spec.detection_region]))
            instances = instances_from_mask(region, affine, spec.min_box_volume_mm3)
            sample.instances = resample(geometry.to_canonical(instances[None]), geometry.model_shape,
                                        "nearest-exact")[0]
    if case.boxes is not None:
        sample.boxes = np.array([b.voxel for b in case.boxes], dtype=np.float32).reshape(-1, 6)
        # the file's boxes are the detection truth (evaluation scores against them): training moves the mask's
        # components with the patch when they are those boxes (as the importers write them), else the boxes
        if sample.instances is None or not same_boxes(boxes_from_instances(instances), sample.boxes):
            instances = instances_from_boxes(geometry.shape, sample.boxes)
            sample.instances = resample(geometry.to_canonical(instances[None]), geometry.model_shape,
                                        "nearest-exact")[0]
    elif instances is not None:  # no boxes file: the boxes of the same components (as boxes_from_mask gives them)
        sample.boxes = boxes_from_instances(instances)
    return sample


class PlainCompose(Compose):
    """MONAI's ``Compose``, run with MetaTensor tracking off: plain tensors in, plain tensors out.

    The training patches need no metadata (their geometry is the volume's, already resampled), and a MetaTensor
    costs twice over: the transforms ran up to 2x slower with it, and a batch stacked from MetaTensors routed the
    whole forward pass through ``MetaTensor.__torch_function__`` (a ``medmnist-cnn`` step 1.3-1.4x slower;
    ``benchmarks/train_step_speed.py``, docs/benchmarks.md).
    Tracking is a MONAI-wide switch, so it is restored after each call.
    """

    def __call__(self, input_, *args, **kwargs):
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            set_track_meta(tracking)


class PerChannel(RandomizableTransform, MapTransform):
    """With probability ``prob`` per patch, apply a random array transform to each channel of ``keys`` on its own.

    Each channel gets its own draw of the wrapped transform (which also keeps its own probability per channel): for
    MONAI intensity transforms that have no ``channel_wise`` switch (``RandAdjustContrast`` draws one gamma and takes
    one min/max over all channels), so each contrast of a case is perturbed independently, like nnU-Net's
    ``synchronize_channels=False`` with a per-patch and a per-channel probability.
    """

    def __init__(self, keys, transform: RandomizableTransform, prob: float = 1.0) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=prob)
        self.transform = transform

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)  # the wrapped transform's seed is drawn from this one's stream, as
        self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))  # Compose does
        return self

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.cat([torch.as_tensor(self.transform(channel[None])) for channel in d[key]])
        return d


class RecordBackground(MapTransform):
    """Store where each channel of ``keys`` is zero (outside the brain after ``nonzero`` z-scoring, or a missing
    channel), under ``KEY_background``, for :class:`RestoreBackground`. With ``empty_channels_only``, only channels
    that are zero throughout (a missing channel, zero-filled) are recorded."""

    def __init__(self, keys, empty_channels_only: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.empty_channels_only = empty_channels_only

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            zero = torch.as_tensor(d[key]) == 0
            if self.empty_channels_only:
                zero = zero.flatten(1).all(1).view(-1, *[1] * (zero.ndim - 1)).expand_as(zero)
            d[f"{key}_background"] = zero
        return d


class RestoreBackground(MapTransform):
    """Set the voxels :class:`RecordBackground` found zero back to zero, and drop the record: the intensity
    augmentation between them must not teach the model a background it never sees at inference (nnU-Net's
    ``MaskImageTransform``)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key]).masked_fill(d.pop(f"{key}_background"), 0.0)
        return d


def intensity_transforms(kind: str = "light") -> list:
    """The intensity augmentation of training patches (key ``image``, z-scored channels), in MONAI's transforms.

    ``light``: one random scale (x0.85-1.15) and one random shift (+-0.15) for all channels, each p = 0.5, and
    Gaussian noise (p = 0.15, std up to 0.05); a channel that is zero throughout the patch (a missing contrast,
    zero-filled) is set back to zero, as the model sees it at inference. ``strong``: nnU-Net-like, each channel
    drawn on its own, before ``light``'s three: brightness (x0.75-1.25) and contrast about the mean (x0.75-1.25,
    range kept), each p = 0.15 per patch with one factor per channel; low resolution (p = 0.25 per patch, then 0.5
    per channel: down to 0.5-1 of the size, nearest, and back up, trilinear); inverted gamma (p = 0.1) and gamma
    (p = 0.3), 0.7-1.5 drawn uniformly per channel, each channel's mean and std kept at that step; Gaussian blur
    (p = 0.2 per patch, then 0.5 per channel, sigma 0.5-1 voxel per axis); then a smooth multiplicative bias field
    (MONAI's, degree 3, coefficients in +-0.1, one field for all channels, p = 0.2: a typical voxel x0.9-1.1, a
    patch's extremes about x0.67 and x1.47), which nnU-Net does not have; on z-scored values it rescales about zero,
    where a scanner's field would also shift them. At the end the voxels that were zero (outside the brain, or a
    missing channel) are set back to zero, as nnU-Net does: zero is taken for background (the config refuses
    ``strong`` with ``data.normalization: none``). nnU-Net's gamma draws below and above 1 equally often.
    """
    if kind not in INTENSITY_AUGMENTATIONS:
        raise ValueError(f"intensity augmentation must be one of {INTENSITY_AUGMENTATIONS}, got {kind!r}")
    light = [
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandShiftIntensityd("image", offsets=0.15, prob=0.5),
        RandGaussianNoised("image", prob=0.15, std=0.05),
    ]
    if kind == "light":  # a missing channel stays exactly zero, as at inference
        return [RecordBackground("image", empty_channels_only=True), *light, RestoreBackground("image")]
    return [
        RecordBackground("image"),
        RandScaleIntensityd("image", factors=0.25, prob=0.15, channel_wise=True),
        RandScaleIntensityFixedMeand("image", factors=0.25, prob=0.15, preserve_range=True, channel_wise=True),
        PerChannel("image", RandSimulateLowResolution(prob=0.5, zoom_range=(0.5, 1.0)), prob=0.25),
        PerChannel("image", RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
                   prob=0.1),
        PerChannel("image", RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5), retain_stats=True), prob=0.3),
        PerChannel("image", RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.5),
                   prob=0.2),
        RandBiasFieldd("image", degree=3, coeff_range=(-0.1, 0.1), prob=0.2),
        *light,
        RestoreBackground("image"),
    ]


def training_transforms(patch_size: Sequence[int], foreground_ratio: float, zoom_prob: float,
                        rotation_planes: Sequence[Sequence[int]] | None = None,
                        intensity: str = "light") -> PlainCompose:
    """Patch sampling and augmentation over keys ``image``, ``regions``, ``instances``.

    ``zoom_prob`` is the chance of a random zoom (0.85-1.15) per patch; 0 switches scaling off, for data whose
    object size is the signal. ``rotation_planes``: the axis pairs of random 90-degree rotations (each applied with
    probability 0.5, k in 1..3); None: the x-y plane when the patch is square there (so it keeps its shape), else none.
    ``intensity``: the intensity augmentation, ``light`` or ``strong`` (:func:`intensity_transforms`).

    Expects ``foreground`` (1, X, Y, Z) for the positive/negative crop and a volume at least ``patch_size`` large
    (see :func:`pad_to`).
    """
    keys = ["image", "regions", "instances"]
    spatial = [
        RandCropByPosNegLabeld(keys, label_key="foreground", spatial_size=tuple(patch_size), pos=foreground_ratio,
                               neg=1.0 - foreground_ratio, num_samples=1, allow_smaller=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandZoomd(keys, prob=zoom_prob, min_zoom=0.85, max_zoom=1.15, mode=("trilinear", "nearest", "nearest"),
                  keep_size=True),
    ]
    if rotation_planes is None:
        rotation_planes = [(0, 1)] if patch_size[0] == patch_size[1] else []
    for plane in rotation_planes:
        if patch_size[plane[0]] != patch_size[plane[1]]:
            raise ValueError(f"a 90-degree rotation in plane {tuple(plane)} needs a patch square in it, "
                             f"got {patch_size}")
    spatial[4:4] = [RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=tuple(plane)) for plane in rotation_planes]
    return PlainCompose(spatial + intensity_transforms(intensity))


def pad_to(array: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad (C, X, Y, Z) symmetrically so each spatial size is at least ``size``."""
    pads: list[int] = []
    for have, want in reversed(list(zip(array.shape[1:], size))):
        extra = max(0, want - have)
        pads += [extra // 2, extra - extra // 2]
    return F.pad(array, pads) if any(pads) else array
