"""`medtriad demo --quick`: the newcomer's command runs end to end and the report holds every section."""

import re

import nibabel as nib
import torch

from medtriad.checkpoint import load_state, save_checkpoint
from medtriad.cli import main


def test_demo_quick_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    stale = out / "run" / "checkpoints" / "last"  # an earlier demo's run: a rerun trains afresh in its place
    save_checkpoint(stale, {"w": torch.zeros(1)}, {"epoch": 99})
    assert main(["demo", "--out", str(out), "--quick", "-q"]) == 0
    assert load_state(stale)["epoch"] < 99
    report = out / "report.html"
    assert str(report.resolve()) in capsys.readouterr().out
    page = report.read_text()
    for section in ('id="metrics"', "<h3>Segmentation</h3>", "<h3>Detection</h3>", "Classification: grade",
                    'id="training"', 'id="cases"', "dice_WT", "AP_IoU_0.10", "auc"):
        assert section in page, section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 3  # training curves + at least two case views, all embedded
    # self-contained: nothing to fetch (embedded base64 images may spell "http" by chance, so look at the markup)
    markup = re.sub(r'data:image/png;base64,[A-Za-z0-9+/=]+', "", page)
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', markup), "the report links to an outside resource"
    assert "://" not in markup
    seg = next((out / "prediction").glob("*_seg.nii.gz"))
    case = seg.name.removesuffix("_seg.nii.gz")
    source = nib.load(out / "data" / "imagesTr" / f"{case}_0000.nii.gz")
    assert nib.load(seg).shape == source.shape
    assert (out / "prediction" / f"{case}_boxes.json").is_file() and (out / "prediction" / f"{case}_class.json").is_file()
