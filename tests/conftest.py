"""Session fixtures: the shared real data (../shared/data beside the repository) and a synthetic dataset."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BRATS2018 = DATA / "brats2018-sample" / "MICCAI_BraTS_2018_Data_Training"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def brats2018(tmp_path_factory):
    """The ten real BraTS 2018 cases imported once into the dataset layout: (dataset folder, source snapshot)."""
    if not BRATS2018.is_dir():
        pytest.skip(f"real BraTS 2018 sample not found at {BRATS2018}")
    from medtriad.data.importers import import_brats

    before = snapshot(BRATS2018)
    out = import_brats(BRATS2018, tmp_path_factory.mktemp("brats2018") / "BraTS2018", progress=False)
    return out, before


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """Eight small synthetic BraTS-like cases (40^3, about 5 mm voxels)."""
    from medtriad.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", 8, size=40, seed=3, progress=False)
