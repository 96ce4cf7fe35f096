"""Training augmentation: which transforms may change an object's size."""

import pytest
import torch

from medtriad.data.transforms import training_transforms


def _augmented(zoom_prob: float, n: int = 24, rotation_planes=None) -> list[torch.Tensor]:
    """``n`` augmented draws (the whole volume) of a 9x7x5 box in a 24^3 volume: the region masks."""
    regions = torch.zeros((1, 24, 24, 24), dtype=torch.float32)
    regions[0, 6:15, 8:15, 10:15] = 1
    data = {"image": regions.clone(), "regions": regions, "instances": regions.to(torch.int32),
            "foreground": regions}
    transforms = training_transforms((24, 24, 24), foreground_ratio=1.0, zoom_prob=zoom_prob,
                                     rotation_planes=rotation_planes)
    out = []
    for seed in range(n):
        transforms.set_random_state(seed=seed)
        out.append(torch.as_tensor(transforms(dict(data))[0]["regions"]))
    return out


def _draws(zoom_prob: float, n: int = 24) -> list[int]:
    """Foreground voxel counts of the box after ``n`` draws."""
    return [int(r.sum()) for r in _augmented(zoom_prob, n)]


def _extents(regions: torch.Tensor) -> tuple[int, ...]:
    """The box's extent along each axis."""
    return tuple(int(regions[0].any(dim=tuple(d for d in range(3) if d != axis)).sum()) for axis in range(3))


def test_zoom_off_keeps_object_size_exactly():
    """Without zoom the spatial augmentation only flips and rotates by 90 degrees: the size never changes; with
    zoom on every draw it does in most draws (``data.zoom_prob``)."""
    assert _draws(zoom_prob=0.0) == [9 * 7 * 5] * 24
    zoomed = _draws(zoom_prob=1.0)
    assert sum(c != 9 * 7 * 5 for c in zoomed) >= 12, zoomed


def test_rotation_planes_set_which_orientations_a_patch_takes():
    """By default 90-degree rotations turn the x-y plane only, so the box's z extent stays 5; with all three planes
    (``data.rotation_planes``) each of its three extents reaches the z axis, and the box never changes size."""
    default = {_extents(r) for r in _augmented(0.0, 32)}
    assert {e[2] for e in default} == {5}
    assert {e[0] for e in default} == {9, 7}
    every = _augmented(0.0, 48, rotation_planes=[(0, 1), (0, 2), (1, 2)])
    assert {_extents(r)[2] for r in every} == {9, 7, 5}
    assert {int(r.sum()) for r in every} == {9 * 7 * 5}
    with pytest.raises(ValueError, match="square"):
        training_transforms((24, 24, 16), 1.0, 0.0, rotation_planes=[(0, 2)])


def test_patches_are_plain_tensors_and_metadata_tracking_is_restored():
    """Training patches come out as plain tensors (a MetaTensor batch routes every layer of the forward pass through
    MONAI's ``__torch_function__``), with the same draws as MONAI's own Compose, and MONAI's global tracking switch
    is left as it was."""
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import Compose

    regions = torch.zeros((1, 24, 24, 24), dtype=torch.float32)
    regions[0, 6:15, 8:15, 10:15] = 1
    data = {"image": regions + 0.5, "regions": regions, "instances": regions.to(torch.int32), "foreground": regions}

    def build():
        return training_transforms((16, 16, 16), 1.0, 0.0, rotation_planes=[(0, 1), (0, 2), (1, 2)])

    plain, tracked = build(), Compose(build().transforms)  # separate transform objects: separate random streams
    assert get_track_meta()
    for seed in range(6):
        plain.set_random_state(seed=seed)
        tracked.set_random_state(seed=seed)
        out, reference = plain(dict(data))[0], tracked(dict(data))[0]
        assert get_track_meta()
        for key in ("image", "regions"):
            assert type(out[key]) is torch.Tensor
            assert isinstance(reference[key], MetaTensor)
            torch.testing.assert_close(out[key], reference[key].as_tensor())


def test_strong_intensity_augmentation_perturbs_each_channel_on_its_own():
    """``data.intensity_augmentation: strong`` draws brightness, contrast and gamma for each channel on its own (the
    light profile scales all channels together: every channel's ratio to its input is the same); the masks are
    untouched, a zero-filled (missing) channel stays zero under the added transforms (the light profile's shift and
    noise move it), and a seed gives the same patch again."""
    from medtriad.data.transforms import intensity_transforms
    from monai.transforms import Compose

    torch.manual_seed(0)
    base = torch.randn(1, 16, 16, 16)
    image = torch.cat([base, base, base, torch.zeros_like(base)])  # three identical channels and a missing one
    regions = (base > 1).to(torch.uint8)

    def draws(kind: str) -> list[dict]:
        chain = Compose([t for t in intensity_transforms(kind) if not any(
            name in type(t).__name__ for name in ("Noise", "Shift"))])
        out = []
        for seed in range(40):
            chain.set_random_state(seed=seed)
            out.append(chain({"image": image.clone(), "regions": regions.clone()}))
        return out

    strong, light = draws("strong"), draws("light")
    differ = lambda d: not torch.allclose(d["image"][0], d["image"][1], atol=1e-5)  # noqa: E731
    assert sum(differ(d) for d in strong) >= 10
    assert not any(differ(d) for d in light)
    for d in strong:
        assert torch.equal(d["regions"], regions)
        assert float(d["image"][3].abs().max()) == 0.0
    again = draws("strong")
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(strong, again))
    with pytest.raises(ValueError, match="light"):
        intensity_transforms("heavy")
