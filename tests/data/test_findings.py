"""BraTS findings (multilabel): values on the 10 real BraTS 2018 cases, and the task added to the dataset."""

import shutil

import numpy as np
import pytest

from medtriad.data.findings import FINDINGS, add_findings_task, brats_findings
from medtriad.data.layout import load_dataset
from medtriad.io import load_nifti


def test_findings_on_real_brats(brats2018):
    dataset, _ = brats2018
    findings = brats_findings(dataset)
    spec, cases = load_dataset(dataset)
    assert sorted(findings) == sorted(c.case_id for c in cases) and len(findings) == 10
    for case in cases:
        values = findings[case.case_id]
        assert len(values) == len(FINDINGS) and set(values) <= {0, 1}
        label, _ = load_nifti(case.label_file)
        assert values[0] == int((label == 1).any())  # necrosis
        assert values[1] == int((label == 4).any())  # enhancement
    assert sum(v[4] for v in findings.values()) == 5  # above the median of 10 distinct volumes
    # x = 0 is the image edge in BraTS headers, so the world plane finds no crossing; the image centre does
    assert all(v[3] == 0 for v in brats_findings(dataset, midline="world").values())
    assert 0 < sum(v[3] for v in findings.values()) < 10
    for case in cases:  # multifocal agrees with the importer's boxes (WT components >= 100 mm^3)
        assert findings[case.case_id][2] == int(len(case.boxes) > 1)


def test_add_findings_task(brats2018, tmp_path):
    source, _ = brats2018
    dataset = tmp_path / "BraTS2018"
    shutil.copytree(source, dataset)
    findings = add_findings_task(dataset)
    spec, cases = load_dataset(dataset)
    assert spec.tasks["findings"].kind == "multilabel" and spec.tasks["findings"].classes == FINDINGS
    assert "grade" in spec.tasks
    for case in cases:
        assert case.classes["findings"] == findings[case.case_id]
        assert case.classes["grade"] in (0, 1)
    add_findings_task(dataset)  # idempotent
    assert load_dataset(dataset)[1][0].classes["findings"] == findings[cases[0].case_id]
    assert np.mean([v[0] for v in findings.values()]) > 0


def test_findings_never_replace_another_task(brats2018, tmp_path):
    """``--task grade`` on BraTS 2018 would overwrite the grades read from the HGG/LGG folders, which cannot be
    recovered: refused, and nothing is written."""
    source, _ = brats2018
    dataset = tmp_path / "BraTS2018"
    shutil.copytree(source, dataset)
    before = {name: (dataset / name).read_bytes() for name in ("dataset.json", "classes.csv")}
    with pytest.raises(ValueError, match="task 'grade' exists as a binary task"):
        add_findings_task(dataset, task="grade")
    assert {name: (dataset / name).read_bytes() for name in before} == before
