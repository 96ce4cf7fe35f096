import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from medtriad.data.boxes import (
    boxes_from_instances,
    boxes_from_mask,
    centre_index_ranges,
    instances_from_boxes,
    instances_from_mask,
    voxel_box_to_world,
    world_box_to_voxel,
)

# Axis order permuted (x <- k, y <- i, z <- j), two axes flipped, anisotropic spacing.
PERMUTED = np.array([[0.0, 0, -2.0, 100], [1.5, 0, 0, -20], [0, -3.0, 0, 7], [0, 0, 0, 1]])


def test_world_box_of_one_voxel_by_hand():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    # voxel (0,0,0) has its centre at (10,20,30) and extends half a voxel each way
    np.testing.assert_allclose(voxel_box_to_world([0, 0, 0, 1, 1, 1], affine), [9, 18.5, 28, 11, 21.5, 32])


@pytest.mark.parametrize("affine", [np.eye(4), np.diag([-1.0, -1, 1, 1]), PERMUTED])
def test_round_trip_with_flipped_and_permuted_affine(affine):
    rng = np.random.default_rng(0)
    low = rng.integers(0, 50, size=(20, 3))
    boxes = np.concatenate([low, low + rng.integers(1, 30, size=(20, 3))], axis=1).astype(float)
    world = voxel_box_to_world(boxes, affine)
    assert (world[:, 3:] > world[:, :3]).all()
    np.testing.assert_allclose(world_box_to_voxel(world, affine), boxes, atol=1e-9)
    np.testing.assert_allclose(voxel_box_to_world(boxes[0], affine), world[0])


def test_world_box_encloses_voxel_centres_by_half_a_voxel():
    mask = np.zeros((12, 10, 8), bool)
    mask[2:5, 3:9, 1:3] = True
    (box,) = boxes_from_mask(mask, PERMUTED, 0.0)
    centres = nib.affines.apply_affine(PERMUTED, np.argwhere(mask))
    half = np.abs(PERMUTED[:3, :3]).sum(axis=1) / 2  # half a voxel along each world axis
    np.testing.assert_allclose(box.world[:3], centres.min(axis=0) - half)
    np.testing.assert_allclose(box.world[3:], centres.max(axis=0) + half)
    assert box.voxel == (2, 3, 1, 5, 9, 3) and box.volume_voxels == 36


def test_components_are_26_connected():
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner contact: one component
    mask[6:8, 6:8, 6:8] = True
    mask[6, 1, 8] = True
    boxes = boxes_from_mask(mask, np.eye(4), 0.0, label=3)
    assert [b.voxel for b in boxes] == [(1, 1, 1, 3, 3, 3), (6, 1, 8, 7, 2, 9), (6, 6, 6, 8, 8, 8)]
    assert [b.volume_voxels for b in boxes] == [2, 1, 8]
    assert {b.label for b in boxes} == {3}
    assert boxes_from_mask(np.zeros((4, 4, 4), bool), np.eye(4), 0.0) == []


def test_min_volume_uses_voxel_spacing():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 per voxel
    mask = np.zeros((20, 20, 20), bool)
    mask[0:12, 0, 0] = True  # 96 mm^3
    mask[0:13, 5, 5] = True  # 104 mm^3
    boxes = boxes_from_mask(mask, affine, 100.0)
    assert [b.voxel for b in boxes] == [(0, 5, 5, 13, 6, 6)]
    assert len(boxes_from_mask(mask, np.eye(4), 100.0)) == 0
    assert len(boxes_from_mask(mask, affine, 96.0)) == 2


def random_mask(seed: int, shape=(40, 36, 30)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for _ in range(12):
        low = rng.integers(0, np.array(shape) - 4)
        size = rng.integers(1, 7, size=3)
        mask[tuple(slice(l, l + s) for l, s in zip(low, size))] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boxes_from_instances_equals_boxes_from_mask(seed):
    mask = random_mask(seed)
    boxes = boxes_from_mask(mask, PERMUTED, 30.0)
    instances = instances_from_mask(mask, PERMUTED, 30.0)
    assert instances.dtype == np.int32 and instances.max() == len(boxes) > 1
    assert set(np.unique(instances[mask])) <= set(range(len(boxes) + 1)) and not instances[~mask].any()
    expected = np.array([b.voxel for b in boxes], dtype=np.float32)
    np.testing.assert_array_equal(boxes_from_instances(instances), expected)
    np.testing.assert_array_equal(boxes_from_instances(torch.from_numpy(instances)[None]), expected)
    for index, box in enumerate(boxes, start=1):
        assert (instances == index).sum() == box.volume_voxels


def test_boxes_from_instances_skips_absent_and_small_ids():
    instances = np.zeros((8, 8, 8), np.int64)
    instances[0:2, 0:2, 0:2] = 2  # id 1 absent (e.g. cropped away)
    instances[5, 5, 5] = 4
    np.testing.assert_array_equal(boxes_from_instances(instances), [[0, 0, 0, 2, 2, 2], [5, 5, 5, 6, 6, 6]])
    np.testing.assert_array_equal(boxes_from_instances(instances, min_voxels=2), [[0, 0, 0, 2, 2, 2]])
    assert boxes_from_instances(np.zeros((4, 4, 4), np.int32)).shape == (0, 6)
    with pytest.raises(ValueError, match="shape"):
        boxes_from_instances(np.zeros((4, 4)))


def test_instances_from_boxes_round_trip_and_nesting():
    boxes = np.array([[0, 0, 0, 3, 4, 5], [5, 1, 2, 9, 3, 4], [1, 1, 1, 2, 2, 2]], dtype=np.float32)
    instances = instances_from_boxes((10, 6, 6), boxes[:2])
    np.testing.assert_array_equal(boxes_from_instances(instances), boxes[:2])
    nested = instances_from_boxes((10, 6, 6), boxes)  # box 3 lies inside box 1
    np.testing.assert_array_equal(boxes_from_instances(nested)[2], boxes[2])
    clipped = instances_from_boxes((4, 4, 4), [[2.5, -1, 0, 7, 2, 1]])
    np.testing.assert_array_equal(boxes_from_instances(clipped), [[2, 0, 0, 4, 2, 1]])


def test_centre_index_ranges_hold_exactly_the_voxel_centres_inside_half_open_boxes():
    boxes = np.array([[0.0, 0.0, 0.0, 3.0, 4.0, 5.0],     # whole voxels: indices 0..2, 0..3, 0..4
                      [0.5, 1.2, 2.6, 2.5, 1.8, 3.5],     # centres on edges: x in at lo, z out at hi
                      [-4.0, 5.0, 0.0, 0.4, 9.0, 1.0]], dtype=np.float32)
    starts, stops = centre_index_ranges(boxes)
    np.testing.assert_array_equal(starts, [[0, 0, 0], [0, 1, 3], [-4, 5, 0]])
    np.testing.assert_array_equal(stops, [[3, 4, 5], [2, 2, 3], [0, 9, 1]])
    for box, lo, hi in zip(boxes, starts, stops):  # brute force over the voxel centres
        for axis in range(3):
            inside = [i for i in range(-10, 20) if box[axis] <= i + 0.5 < box[axis + 3]]
            assert inside == list(range(lo[axis], hi[axis]))
    starts, stops = centre_index_ranges(boxes, (2, 6, 6))  # clipped to a (2, 6, 6) volume
    np.testing.assert_array_equal(starts, [[0, 0, 0], [0, 1, 3], [0, 5, 0]])
    np.testing.assert_array_equal(stops, [[2, 4, 5], [2, 2, 3], [0, 6, 1]])
    assert [bool((b > a).all()) for a, b in zip(starts, stops)] == [True, False, False]  # no centre: z / x empty


def test_all_corners_transform_like_points():
    box = np.array([1.0, 2, 3, 4, 6, 9])
    corners = np.array(list(itertools.product([0.5, 3.5], [1.5, 5.5], [2.5, 8.5])))
    world = nib.affines.apply_affine(PERMUTED, corners)
    np.testing.assert_allclose(voxel_box_to_world(box, PERMUTED), np.r_[world.min(0), world.max(0)])
