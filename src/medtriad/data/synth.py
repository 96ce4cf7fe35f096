"""Synthetic BraTS-like cases: real brain anatomy, gliomas with the BraTS label structure, four MRI contrasts.

Behind ``medtriad synth`` and ``medtriad demo``: a dataset in the project layout that every stage of the pipeline
(import, training, inference, evaluation) can run on without downloading anything. The anatomy is the MNI152
2009a grey/white-matter probability maps and brain mask that nilearn ships inside its package; each case deforms
them smoothly, grows 1-3 tumours (necrosis and enhancing rim inside oedema, oedema spreading along white matter)
and renders FLAIR/T1/T1ce/T2 from tissue fractions with a bias field and Rician noise, skull-stripped like BraTS.
The grade (LGG/HGG) is visible in the tumour's appearance, except in a share of deliberately ambiguous cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from nilearn import datasets
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from medtriad.data.boxes import boxes_from_mask
from medtriad.data.layout import ClassificationTask, DatasetSpec, write_boxes_json, write_classes_csv
from medtriad.io import save_nifti

CHANNELS = ("FLAIR", "T1", "T1ce", "T2")
GRADES = ("LGG", "HGG")
# Relative intensity per compartment, channels in CHANNELS order. T1: WM > GM > CSF and tumour hypointense;
# T1ce: T1 with the enhancing rim brightest; T2: fluid (CSF, necrosis, oedema) bright; FLAIR: CSF suppressed,
# oedema and non-enhancing tumour bright.
CONTRASTS = {
    "csf": (0.15, 0.25, 0.27, 1.00),
    "gm": (0.55, 0.55, 0.58, 0.60),
    "wm": (0.45, 0.80, 0.82, 0.40),
    "oedema": (0.90, 0.50, 0.52, 0.85),
    "solid": (0.80, 0.42, 0.45, 0.80),  # non-enhancing tumour core (BraTS label 1), typical of LGG
    "necrosis": (0.50, 0.25, 0.30, 0.95),  # also BraTS label 1, found inside an enhancing rim in HGG
    "enhancing": (0.75, 0.55, 1.60, 0.70),
}
TUMOUR_COMPARTMENTS = ("oedema", "solid", "necrosis", "enhancing")  # compartment codes 1..4 in synth_case
COMPARTMENT_LABEL = np.array([0, 2, 1, 1, 4], dtype=np.uint8)  # compartment code -> BraTS label
HGG_SHARE = 0.65
AMBIGUOUS_SHARE = 0.12  # cases rendered with the other grade's appearance: classification stays non-trivial
NOISE_SIGMA = 0.025  # per quadrature channel, on the CONTRASTS scale (SNR ~30 in white matter on T1)


@dataclass(frozen=True)
class BrainTemplate:
    """MNI152 anatomy resampled to a ``size``^3 isotropic cube that holds the whole brain.

    Attributes:
        gm, wm, csf: tissue probability maps, (S, S, S) float32 in [0, 1], zero outside the brain.
        mask: brain mask, (S, S, S) float32 in {0, 1} (float so a deformation interpolates it smoothly).
        depth: distance from each brain voxel to the brain's edge in voxels, (S, S, S); where tumours may sit.
        affine: (4, 4) voxel -> MNI world (mm, RAS) of the cube; isotropic spacing ``spacing``.
        spacing: voxel size in mm, chosen so the brain plus a margin fits the cube.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    affine: np.ndarray
    spacing: float

    @property
    def size(self) -> int:
        return self.mask.shape[0]


@lru_cache(maxsize=4)
def load_template(size: int = 96) -> BrainTemplate:
    """Resample nilearn's bundled 1 mm MNI152 maps (no download) to a ``size``^3 cube centred on the brain.

    CSF is what the brain mask holds beyond grey and white matter (ventricles, sulci). The cube's side is the
    brain's longest extent plus 8 %, so a random deformation rarely pushes brain out of the field of view.
    Maps are low-pass filtered before downsampling so thin cortex does not alias. Arrays are read-only: the
    template is cached and shared between cases.
    """
    if size < 16:
        raise ValueError(f"size={size}: the synthetic brain needs at least 16 voxels per side")
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = mask_img.get_fdata(dtype=np.float32) > 0.5
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    index = np.argwhere(mask)
    lo, hi = index.min(0), index.max(0)
    spacing = float((hi - lo + 1).max()) * 1.08 / size  # in template voxels (1 mm)
    origin = (lo + hi) / 2.0 - (size - 1) / 2.0 * spacing  # template index of cube voxel (0, 0, 0)
    sigma = max(spacing - 1.0, 0.0) * 0.5
    maps = []
    for volume in (gm, wm, csf, mask.astype(np.float32)):
        smooth = ndi.gaussian_filter(volume, sigma) if sigma > 0 else volume
        maps.append(ndi.affine_transform(smooth, np.full(3, spacing), offset=origin, output_shape=(size,) * 3, order=1))
    gm, wm, csf, soft_mask = maps
    brain = soft_mask > 0.5
    total = np.maximum(gm + wm + csf, 1e-6)
    gm, wm, csf = (np.where(brain, m / total, 0.0).astype(np.float32) for m in (gm, wm, csf))
    cube = np.diag([spacing, spacing, spacing, 1.0])
    cube[:3, 3] = origin
    affine = mask_img.affine @ cube
    arrays = dict(gm=gm, wm=wm, csf=csf, mask=brain.astype(np.float32), depth=ndi.distance_transform_edt(brain))
    for array in arrays.values():
        array.flags.writeable = False
    return BrainTemplate(**arrays, affine=affine, spacing=float(spacing * abs(mask_img.affine[0, 0])))


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std random field, (size, size, size) float32, with about ``cells`` bumps per side.

    A sum of Gaussian bumps on a (cells + 3)^3 lattice (one knot beyond each edge so borders vary as much as the
    centre), evaluated separably: a few BLAS products instead of a full-resolution spline zoom.
    """
    width = (size - 1) / cells
    knots = np.linspace(-width, size - 1 + width, cells + 3)
    weights = np.exp(-0.5 * ((np.arange(size)[:, None] - knots) / width) ** 2).astype(np.float32)
    coarse = rng.standard_normal((cells + 3,) * 3, dtype=np.float32)
    field = np.einsum("ai,bj,ck,ijk->abc", weights, weights, weights, coarse, optimize=True)
    return (field - field.mean()) / field.std()


def _deformation(rng: np.random.Generator, template: BrainTemplate) -> tuple[np.ndarray, np.ndarray]:
    """Where each output voxel samples the template: (3, S, S, S) coordinates, and the linear part (3, 3).

    A random scaling (+-8 %) and rotation (+-8 degrees) about the cube centre plus a low-frequency
    displacement of about 4 mm: coords(x) = matrix @ (x - centre) + centre + displacement(x).
    """
    size = template.size
    centre = (size - 1) / 2.0
    scale = np.diag(rng.uniform(0.92, 1.08, 3))
    rotation = Rotation.from_rotvec(rng.uniform(-1, 1, 3) * np.deg2rad(8) / np.sqrt(3)).as_matrix()
    matrix = (rotation @ scale).astype(np.float32)
    coords = np.einsum("ij,j...->i...", matrix, np.indices((size,) * 3, dtype=np.float32) - centre) + centre
    for axis in range(3):
        coords[axis] += 4.0 / template.spacing * _smooth_field(rng, size, 3)
    return coords, matrix


def _place(coords: np.ndarray, matrix: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Output voxels (T, 3) that sample template voxels ``sources`` (T, 3), to first order in the displacement."""
    centre = (coords.shape[1] - 1) / 2.0
    index = tuple(np.clip(np.round(sources).astype(int), 0, coords.shape[1] - 1).T)
    displacement = coords[(slice(None), *index)].T - (sources - centre) @ matrix.T - centre
    return np.linalg.solve(matrix, (sources - centre - displacement).T).T + centre


def _mass_effect(rng: np.random.Generator, coords: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> None:
    """Push tissue away from each tumour centre (T, 3), reaching ~1.5 ``radii``; edits ``coords`` in place."""
    grid = np.indices(coords.shape[1:], dtype=np.float32)
    for c, r in zip(centres, radii):
        offset = grid - c.reshape(3, 1, 1, 1).astype(np.float32)
        coords -= rng.uniform(0.2, 0.4) * offset * np.exp(-(offset**2).sum(0) / (2 * (1.5 * r) ** 2))


def _pick_centres(rng: np.random.Generator, template: BrainTemplate, radii: np.ndarray) -> np.ndarray:
    """Tumour centres (T, 3) in template voxels: deep white matter, far enough from the brain edge and each other."""
    centres: list[np.ndarray] = []
    for r in radii:
        candidates = np.argwhere((template.wm > 0.5) & (template.depth > r + 2))
        if len(candidates) == 0:
            candidates = np.argwhere(template.depth >= template.depth.max() * 0.8)
        for _ in range(20):
            c = candidates[rng.integers(len(candidates))].astype(np.float64)
            if all(np.linalg.norm(c - p) > r + q for p, q in zip(centres, radii)):
                break
        centres.append(c)
    return np.array(centres)


def _kth_smallest(values: np.ndarray, k: float) -> float:
    """The ``k``-th smallest finite value of ``values``; -inf for k < 1, the largest finite value past their count."""
    finite = values[np.isfinite(values)]
    k = int(min(k, finite.size))
    return float(np.partition(finite, k - 1)[k - 1]) if k >= 1 else -np.inf


def _grow_tumour(
    rng: np.random.Generator,
    centre: np.ndarray,
    core_voxels: float,
    whole_voxels: float,
    ring: bool,
    enhancing_share: float,
    tissue: dict[str, np.ndarray],
    noise: list[np.ndarray],
    spacing: float,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """One tumour as compartment codes 0 none, 1 oedema, 2 solid, 3 necrosis, 4 enhancing (int8), on a crop.

    Core: the ``core_voxels`` brain voxels innermost in an ellipsoid with a noise-perturbed surface (largest
    component kept). ``ring``: an irregular enhancing rim 2-6 mm thick around necrosis, as in HGG; otherwise
    solid non-enhancing tumour with an ``enhancing_share`` of it enhancing in patches. Oedema: the
    ``whole_voxels - core`` brain voxels nearest the core, where distance is stretched in grey matter and CSF
    so oedema follows white matter. Work happens in a box of three core radii around ``centre`` (beyond where
    oedema reaches), returned with the codes for that box.
    """
    radius = (3 * core_voxels / (4 * np.pi)) ** (1 / 3)
    axes = radius * np.exp(rng.normal(0, 0.15, 3))
    axes *= radius / np.prod(axes) ** (1 / 3)
    half = int(np.ceil(3 * axes.max())) + 4
    box = tuple(slice(max(int(round(c)) - half, 0), int(round(c)) + half + 1) for c in centre)
    brain, wm, csf = (tissue[name][box] for name in ("mask", "wm", "csf"))
    brain = brain > 0.5
    shape_noise, oedema_noise, rim_noise = (field[box] for field in noise)
    corner = np.array([s.start for s in box], dtype=np.float32)
    rotation = Rotation.random(random_state=rng).as_matrix().astype(np.float32)
    offset = np.indices(brain.shape, dtype=np.float32) + (corner - centre.astype(np.float32)).reshape(3, 1, 1, 1)
    local = np.einsum("ji,j...->i...", rotation, offset) / axes.reshape(3, 1, 1, 1).astype(np.float32)
    bumpy = np.where(brain, np.sqrt((local**2).sum(0)) + 0.5 * shape_noise, np.inf)
    core = bumpy <= _kth_smallest(bumpy, core_voxels)
    components, count = ndi.label(core)
    if count > 1:
        core = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    codes = np.zeros(brain.shape, dtype=np.int8)
    if ring:
        inside = ndi.distance_transform_edt(core)
        thickness = rng.uniform(2.0, 6.0) / spacing * np.clip(1 + 0.6 * rim_noise, 0.3, None)
        codes[core] = 3
        codes[core & (inside <= np.maximum(thickness, 1.0))] = 4
    else:
        codes[core] = 2
        if enhancing_share > 0 and core.any():
            codes[core & (rim_noise >= np.quantile(rim_noise[core], 1 - enhancing_share))] = 4
    distance = ndi.distance_transform_edt(~core) / (0.3 + wm) * np.exp(0.3 * oedema_noise)
    candidates = brain & ~core & (csf < 0.5)
    distance[~candidates] = np.inf
    codes[distance <= _kth_smallest(distance, whole_voxels - core.sum())] = 1
    return box, codes


def synth_case(rng: np.random.Generator, template: BrainTemplate) -> tuple[np.ndarray, np.ndarray, int]:
    """One synthetic glioma case on ``template``'s grid.

    Returns:
        image: (4, S, S, S) float32, channels FLAIR, T1, T1ce, T2; 0 outside the brain.
        label: (S, S, S) uint8 with BraTS labels 0 background, 1 necrosis / non-enhancing core, 2 oedema,
            4 enhancing tumour; tumour lies inside the brain.
        grade: 0 LGG, 1 HGG (index into ``GRADES``).
    """
    size, spacing = template.size, template.spacing
    grade = int(rng.random() < HGG_SHARE)
    looks_hgg = bool(grade) != bool(rng.random() < AMBIGUOUS_SHARE)
    if looks_hgg:
        enhancing_share = 0.0
    else:  # LGG: mostly no enhancement; an HGG rendered LGG-like keeps clear patches of it
        enhancing_share = rng.uniform(0.1, 0.3) if grade else (rng.uniform(0.03, 0.1) if rng.random() < 0.3 else 0.0)

    brain_voxels = template.mask.sum()
    n_tumours = int(rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05]))
    whole = brain_voxels * np.exp(rng.uniform(np.log(0.01), np.log(0.10))) * rng.dirichlet(np.full(n_tumours, 3.0))
    core = whole * rng.uniform(0.2, 0.5, n_tumours)
    radii = (3 * core / (4 * np.pi)) ** (1 / 3)

    coords, matrix = _deformation(rng, template)
    centres = _place(coords, matrix, _pick_centres(rng, template, radii))
    _mass_effect(rng, coords, centres, radii)
    tissue = {
        name: ndi.map_coordinates(getattr(template, name), coords, order=1, mode="constant")
        for name in ("gm", "wm", "mask")
    }
    # gm + wm + csf = mask in the template and interpolation is linear, so CSF needs no resampling of its own.
    tissue["csf"] = np.clip(tissue["mask"] - tissue["gm"] - tissue["wm"], 0.0, 1.0)
    brain = tissue["mask"] > 0.5

    noise = [_smooth_field(rng, size, max(size // 6, 4)) for _ in range(3)]
    codes = np.zeros((size,) * 3, dtype=np.int8)
    for c, w, k in zip(centres, whole, core):
        box, grown = _grow_tumour(rng, c, k, w, looks_hgg, enhancing_share, tissue, noise, spacing)
        codes[box] = np.maximum(codes[box], grown)  # where tumours meet, core beats oedema
    label = COMPARTMENT_LABEL[codes]

    texture = 1.0 + 0.08 * _smooth_field(rng, size, max(size // 6, 4))
    image = np.empty((4, *codes.shape), dtype=np.float32)
    total = np.maximum(tissue["gm"] + tissue["wm"] + tissue["csf"], 1e-6)
    for ch in range(4):
        jitter = {name: value[ch] * rng.uniform(0.92, 1.08) for name, value in CONTRASTS.items()}
        healthy = sum(jitter[name] * tissue[name] for name in ("csf", "gm", "wm")) / total
        tumour = np.array([0.0] + [jitter[name] for name in TUMOUR_COMPARTMENTS], dtype=np.float32)[codes] * texture
        clean = ndi.gaussian_filter(np.where(codes > 0, tumour, healthy), 0.5)  # scanner point-spread function
        clean *= np.exp(0.12 * _smooth_field(rng, size, 2))  # coil bias field
        real = clean + NOISE_SIGMA * rng.standard_normal(clean.shape, dtype=np.float32)
        imaginary = NOISE_SIGMA * rng.standard_normal(clean.shape, dtype=np.float32)  # magnitude image: Rician
        image[ch] = np.where(brain, np.hypot(real, imaginary), 0.0) * rng.uniform(400, 1200)
    return image, label, grade


def synth_spec(root: Path, num_cases: int) -> DatasetSpec:
    """The BraTS 2018 dataset.json for a synthetic dataset of ``num_cases`` cases at ``root``."""
    return DatasetSpec(
        root=root,
        name="BraTS2018Synthetic",
        channel_names=dict(enumerate(CHANNELS)),
        labels={"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4},
        regions={"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
        tasks={"grade": ClassificationTask("grade", "binary", GRADES)},
        detection_region="WT",
        min_box_volume_mm3=100.0,
        num_training=num_cases,
    )


def generate_dataset(out: Path, num_cases: int, size: int = 96, seed: int = 0, progress: bool = True) -> Path:
    """Write ``num_cases`` synthetic cases as a medtriad dataset at ``out`` and return ``out``.

    Files: dataset.json, imagesTr/SYNTH_XXX_000{0..3}.nii.gz (float32), labelsTr/SYNTH_XXX.nii.gz (uint8),
    classes.csv (grade) and boxes.json (one box per WT component of at least the spec's minimum volume).
    Case i draws from ``numpy.random.default_rng([seed, i])``: the same seed gives identical arrays, and a
    case does not depend on how many others are generated.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases={num_cases}: need at least one case")
    out = Path(out)
    spec = synth_spec(out, num_cases)
    spec.images_dir.mkdir(parents=True, exist_ok=True)
    spec.labels_dir.mkdir(parents=True, exist_ok=True)
    template = load_template(size)
    wt = list(spec.regions[spec.detection_region])
    grades, boxes = {}, {}
    for i in tqdm(range(num_cases), desc="synth", disable=not progress):
        case_id = f"SYNTH_{i:03d}"
        image, label, grade = synth_case(np.random.default_rng([seed, i]), template)
        for channel, volume in enumerate(image):
            save_nifti(spec.image_file(case_id, channel), volume, template.affine)
        save_nifti(spec.label_file(case_id), label, template.affine)
        grades[case_id] = {"grade": grade}
        boxes[case_id] = boxes_from_mask(np.isin(label, wt), template.affine, spec.min_box_volume_mm3)
    write_classes_csv(out / "classes.csv", spec, grades)
    write_boxes_json(out / "boxes.json", boxes)
    spec.save()
    return out
