"""Detection boxes from masks and instance maps, and voxel <-> world box coordinates.

Voxel boxes are MONAI StandardMode "xyzxyz" in array-index space with half-open edges: an object
occupying indices i0..i1 along x has x0 = i0, x1 = i1 + 1. Voxel centres sit at integer
coordinates, so a voxel-edge coordinate c is the point c - 0.5 in the affine's voxel space; a
world box is the axis-aligned bounding box of the 8 corners mapped through the affine. For an
affine whose 3x3 part is a scaled permutation (any flip/axis order, no oblique rotation) the
voxel -> world -> voxel round trip is exact.

Objects are 26-connected components: touching at a corner joins two voxels, as a reader of the
scan would see one lesion.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from medtriad.data.layout import Box

__all__ = [
    "voxel_box_to_world",
    "world_box_to_voxel",
    "voxel_box_to_grid",
    "boxes_from_mask",
    "boxes_from_instances",
    "instances_from_mask",
    "instances_from_boxes",
]

_CORNERS = np.array(list(itertools.product((0, 3), (1, 4), (2, 5))))  # (8, 3): indices into (x0,y0,z0,x1,y1,z1)


def _transform_box(box: np.ndarray, matrix: np.ndarray, shift: float, unshift: float) -> np.ndarray:
    """Map the 8 corners of (..., 6) boxes through ``matrix`` (4, 4) and return their bounding boxes."""
    box = np.asarray(box, dtype=np.float64)
    if box.shape[-1] != 6:
        raise ValueError(f"boxes must have 6 values (x0, y0, z0, x1, y1, z1) in the last axis, got shape {box.shape}")
    corners = box[..., _CORNERS] + shift  # (..., 8, 3)
    mapped = corners @ matrix[:3, :3].T + matrix[:3, 3] + unshift
    return np.concatenate([mapped.min(axis=-2), mapped.max(axis=-2)], axis=-1)


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    return affine


def voxel_box_to_world(box_voxel: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel box(es) (6,) or (N, 6) -> world box(es) in mm, same shape (see module docstring)."""
    return _transform_box(box_voxel, _check_affine(affine), shift=-0.5, unshift=0.0)


def world_box_to_voxel(box_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World box(es) (6,) or (N, 6) in mm -> voxel-edge box(es) through the inverse affine."""
    return _transform_box(box_world, np.linalg.inv(_check_affine(affine)), shift=0.0, unshift=0.5)


def voxel_box_to_grid(box_voxel: np.ndarray, index_map: np.ndarray) -> np.ndarray:
    """Voxel box(es) (6,) or (N, 6) on one grid -> voxel box(es) on another, where ``index_map`` (4, 4) maps the
    first grid's voxel indices to the second's (``inv(affine_2) @ affine_1``). Exact when its 3x3 part is a scaled
    permutation, as between a scan and its reoriented, resampled copy, even when the scan itself is oblique (where
    going through world boxes would enlarge the box twice)."""
    return _transform_box(box_voxel, _check_affine(index_map), shift=-0.5, unshift=0.5)


def _check_volume(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 3:
        raise ValueError(f"{what} must be 3D (X, Y, Z), got shape {array.shape}")
    return array


def _components(mask: np.ndarray, affine: np.ndarray, min_volume_mm3: float) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of ``mask`` at least ``min_volume_mm3`` big.

    Returns the instance map (X, Y, Z) int32 with ids 1..N (scipy's scan order, small ones removed)
    and the voxel count of each kept component (N,).
    """
    mask = _check_volume(np.asarray(mask), "mask").astype(bool, copy=False)
    voxel_volume = abs(np.linalg.det(_check_affine(affine)[:3, :3]))
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    volumes = sizes * voxel_volume
    keep = (volumes >= min_volume_mm3) | np.isclose(volumes, min_volume_mm3)  # det() is inexact: 2*2*2 -> 7.99..
    new_ids = np.zeros(count + 1, dtype=np.int32)
    new_ids[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labelled], sizes[keep]


def instances_from_mask(mask: np.ndarray, affine: np.ndarray, min_volume_mm3: float) -> np.ndarray:
    """Instance map (X, Y, Z) int32 of a binary mask: component ids 1..N in the order of
    :func:`boxes_from_mask`, components below ``min_volume_mm3`` zeroed.

    Transform this map with the image (nearest interpolation) and call :func:`boxes_from_instances`
    so boxes follow the spatial augmentation exactly.
    """
    return _components(mask, affine, min_volume_mm3)[0]


def boxes_from_instances(instances: np.ndarray | torch.Tensor, min_voxels: int = 1) -> np.ndarray:
    """One voxel box per positive instance id present, in increasing id order.

    ``instances``: (X, Y, Z) integer ids (0 = background), numpy or torch, or channel-first
    (1, X, Y, Z) as MONAI transforms give it. Ids with fewer than ``min_voxels`` voxels (e.g. cut
    by a crop) are dropped. Returns (N, 6) float32 half-open voxel boxes.
    """
    if isinstance(instances, torch.Tensor):
        instances = instances.detach().cpu().numpy()
    instances = np.asarray(instances)
    if instances.ndim == 4 and instances.shape[0] == 1:
        instances = instances[0]
    instances = _check_volume(instances, "instances")
    if instances.dtype.kind not in "iub":
        if not np.array_equal(instances, np.round(instances)):
            raise ValueError(f"instances must hold integer ids, got dtype {instances.dtype} with fractional values")
        instances = instances.astype(np.int64)
    instances = np.where(instances > 0, instances, 0).astype(np.int64, copy=False)
    counts = np.bincount(instances.ravel())
    boxes = [
        [s.start for s in slices] + [s.stop for s in slices]
        for index, slices in enumerate(ndimage.find_objects(instances), start=1)
        if slices is not None and counts[index] >= min_voxels
    ]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 6)


def boxes_from_mask(mask: np.ndarray, affine: np.ndarray, min_volume_mm3: float, label: int = 0) -> list[Box]:
    """One :class:`Box` per 26-connected component of ``mask`` (X, Y, Z) whose volume
    (voxels x voxel volume of ``affine`` (4, 4)) is at least ``min_volume_mm3``.
    """
    instances, sizes = _components(mask, affine, min_volume_mm3)
    voxel = boxes_from_instances(instances)
    world = voxel_box_to_world(voxel, affine)
    return [
        Box(tuple(v.tolist()), tuple(w.tolist()), label, int(size))
        for v, w, size in zip(voxel, world, sizes, strict=True)
    ]


def centre_index_ranges(boxes_voxel: np.ndarray, shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For (N, 6) half-open xyzxyz voxel boxes, the (N, 3) ``starts`` and ``stops`` of the voxel indices whose
    centres (i + 0.5) lie inside: lo <= i + 0.5 < hi, i.e. ``range(ceil(lo - 0.5), ceil(hi - 0.5))`` per axis;
    clipped to ``shape`` when given. A box holds no voxel centre where ``stops <= starts`` on some axis."""
    boxes = np.asarray(boxes_voxel, dtype=np.float64).reshape(-1, 6)
    starts, stops = np.ceil(boxes[:, :3] - 0.5), np.ceil(boxes[:, 3:] - 0.5)
    if shape is not None:
        starts, stops = np.clip(starts, 0, shape), np.clip(stops, 0, shape)
    return starts.astype(int), stops.astype(int)


def same_boxes(a: np.ndarray, b: np.ndarray, tolerance: float = 1.0) -> bool:
    """Whether two sets of voxel boxes (N, 6) are the same boxes in any order, every edge within ``tolerance``
    voxels (a boxes file's rounding)."""
    a, b = (np.asarray(x, dtype=np.float64).reshape(-1, 6) for x in (a, b))
    if len(a) != len(b):
        return False
    unmatched = list(range(len(b)))
    for box in a:
        match = next((j for j in unmatched if np.all(np.abs(box - b[j]) <= tolerance)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def instances_from_boxes(shape: tuple[int, int, int], boxes_voxel: np.ndarray) -> np.ndarray:
    """Paint voxel boxes (N, 6) into an instance map of ``shape``: box i gets id i + 1.

    For datasets with boxes but no masks, so the same transforms move them. Fractional edges are
    widened to whole voxels and clipped to the volume; overlapping boxes are painted largest first,
    so a small box inside a big one keeps its id.
    """
    boxes = np.asarray(boxes_voxel, dtype=np.float64).reshape(-1, 6)
    if len(shape) != 3:
        raise ValueError(f"shape must be (X, Y, Z), got {shape}")
    instances = np.zeros(shape, dtype=np.int32)
    starts = np.clip(np.floor(boxes[:, :3]), 0, shape).astype(int)
    stops = np.clip(np.ceil(boxes[:, 3:]), 0, shape).astype(int)
    for index in np.argsort(-np.prod(stops - starts, axis=1), kind="stable"):
        (x0, y0, z0), (x1, y1, z1) = starts[index], stops[index]
        instances[x0:x1, y0:y1, z0:z1] = index + 1
    return instances
