"""Training augmentation: which transforms may change an object's size."""

import torch

from medtriad.data.transforms import training_transforms


def _draws(zoom_prob: float, n: int = 24) -> list[int]:
    """Foreground voxel counts of a 9x7x5 box in a 24^3 volume after ``n`` augmented draws of the whole volume."""
    regions = torch.zeros((1, 24, 24, 24), dtype=torch.float32)
    regions[0, 6:15, 8:15, 10:15] = 1
    data = {"image": regions.clone(), "regions": regions, "instances": regions.to(torch.int32),
            "foreground": regions}
    transforms = training_transforms((24, 24, 24), foreground_ratio=1.0, zoom_prob=zoom_prob)
    counts = []
    for seed in range(n):
        transforms.set_random_state(seed=seed)
        counts.append(int(torch.as_tensor(transforms(dict(data))[0]["regions"]).sum()))
    return counts


def test_zoom_off_keeps_object_size_exactly():
    """Without zoom the spatial augmentation only flips and rotates by 90 degrees: the size never changes; with
    zoom on every draw it does in most draws (``data.zoom_prob``)."""
    assert _draws(zoom_prob=0.0) == [9 * 7 * 5] * 24
    zoomed = _draws(zoom_prob=1.0)
    assert sum(c != 9 * 7 * 5 for c in zoomed) >= 12, zoomed
