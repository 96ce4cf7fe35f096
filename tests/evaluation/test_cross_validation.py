"""`medtriad evaluate RUN_FOLD0 RUN_FOLD1 ... DATASET --cross-validation`: each fold scores only its own held-out
cases, the metrics are computed once over all of them (out-of-fold), and runs that are not one cross-validation are
refused with the runs named."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from medtriad.cli import main
from medtriad.config import Config
from medtriad.data.layout import load_dataset
from medtriad.training.trainer import train


@pytest.fixture(scope="module")
def fold_runs(synth_dataset, tmp_path_factory):
    """A tiny run trained on fold 0 of the synthetic dataset, and a copy of it given fold 1's split and perturbed
    weights: two runs that hold out disjoint cases and predict differently (so that scoring a case with the wrong
    run shows)."""
    root = tmp_path_factory.mktemp("cv")
    config = Config.load("tiny", {"training.epochs": 1, "training.iterations_per_epoch": 2,
                                  "training.warmup_iterations": 1})
    train(synth_dataset, config, root / "fold0", fold=0, progress=False)
    shutil.copytree(root / "fold0", root / "fold1")
    for name in ("last", "best"):
        weights_file = root / "fold1" / "checkpoints" / name / "model.safetensors"
        generator = torch.Generator().manual_seed(0)
        weights = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                   for k, v in load_file(str(weights_file)).items()}
        save_file(weights, str(weights_file))
    split = json.loads((root / "fold0" / "split.json").read_text())
    grades = {c.case_id: c.classes["grade"] for c in load_dataset(synth_dataset)[1]}
    cases = sorted(grades)
    rest = [c for c in cases if c not in split["val"]]
    other = [next(c for c in rest if grades[c] == 0), next(c for c in rest if grades[c] == 1)]  # both grades held out
    (root / "fold1" / "split.json").write_text(json.dumps({**split, "fold": 1, "val": other,
                                                           "train": [c for c in cases if c not in other]}))
    return [root / "fold0", root / "fold1"], split["val"], other


def _rows(folder):
    with open(folder / "per_case.csv") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_each_fold_scores_its_own_cases_and_metrics_pool_them(synth_dataset, fold_runs, tmp_path):
    runs, val0, val1 = fold_runs
    out = tmp_path / "cv"
    assert main(["evaluate", *map(str, runs), str(synth_dataset), "--cross-validation", "--checkpoint", "last",
                 "-o", str(out), "-q"]) == 0
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())
    assert sorted(rows) == sorted(val0 + val1) and summary["num_cases"] == 4
    assert {c: int(rows[c]["fold"]) for c in rows} == {**{c: 0 for c in val0}, **{c: 1 for c in val1}}
    cv = summary["cross_validation"]
    assert cv["folds"] == [0, 1] and cv["cases_per_fold"] == [2, 2] and len(cv["cases_not_held_out"]) == 4

    # every row is what that fold's run alone gives the case
    for run, val in zip(runs, (val0, val1)):
        assert main(["evaluate", str(run), str(synth_dataset), "--split", "val", "--checkpoint", "last",
                     "-o", str(tmp_path / run.name), "-q"]) == 0
        alone = _rows(tmp_path / run.name)
        for case in val:
            for key in ("dice_WT", "p_grade_HGG", "det_tp"):
                assert float(rows[case][key]) == pytest.approx(float(alone[case][key]), abs=1e-6), (case, key)
    # the other run gives fold 0's cases other probabilities, so the rows above show which run scored each case
    assert main(["evaluate", str(runs[1]), str(synth_dataset), "--split", "all", "--checkpoint", "last",
                 "-o", str(tmp_path / "fold1_all"), "-q"]) == 0
    other = _rows(tmp_path / "fold1_all")
    for case in val0:
        assert abs(float(other[case]["p_grade_HGG"]) - float(rows[case]["p_grade_HGG"])) > 1e-4, case

    # the AUC ranks the pooled cases (not a mean of per-fold AUCs), as scikit-learn computes it
    targets = np.array([int(rows[c]["target_grade"]) for c in rows])
    probs = np.array([float(rows[c]["p_grade_HGG"]) for c in rows])
    auc = summary["classification"]["grade"]["auc"]
    assert sorted(set(targets)) == [0, 1]
    assert auc == pytest.approx(roc_auc_score(targets, probs), abs=1e-6)
    dice = [float(rows[c]["dice_WT"]) for c in rows]
    assert summary["segmentation"]["dice_WT"]["mean"] == pytest.approx(np.mean(dice), abs=1e-5)
    assert summary["detection"]["num_cases"] == 4


def test_runs_that_are_not_one_cross_validation_are_refused(synth_dataset, fold_runs, tmp_path, capsys):
    runs, _, _ = fold_runs
    dataset = str(synth_dataset)
    same = tmp_path / "same_fold"
    shutil.copytree(runs[0], same)
    assert main(["evaluate", str(runs[0]), str(same), dataset, "--cross-validation", "-o", str(tmp_path / "o"),
                 "-q"]) == 2
    assert "both hold out" in capsys.readouterr().err
    assert main(["evaluate", str(runs[0]), dataset, "--cross-validation", "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "at least two folds" in capsys.readouterr().err
    assert main(["evaluate", *map(str, runs), dataset, "--cross-validation", "-q"]) == 2
    assert "needs an output folder" in capsys.readouterr().err
    assert main(["evaluate", *map(str, runs), dataset, "--cross-validation", "--split", "all", "-o",
                 str(tmp_path / "o"), "-q"]) == 2
    assert "does not apply" in capsys.readouterr().err
    other = tmp_path / "other_task"
    shutil.copytree(runs[1], other)
    spec = json.loads((other / "model.json").read_text())
    spec["regions"] = {"WT": spec["regions"]["WT"]}
    (other / "model.json").write_text(json.dumps(spec))
    assert main(["evaluate", str(runs[0]), str(other), dataset, "--cross-validation", "-o", str(tmp_path / "o"),
                 "-q"]) == 2
    assert "the folds of a cross-validation must share" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written by a refused call


def test_a_dataset_whose_labels_classes_or_channels_differ_from_the_model_is_refused(synth_dataset, fold_runs,
                                                                                       tmp_path, capsys):
    """The ground truth is read in the dataset's label values and class order and scored in the model's: a dataset
    where enhancing tumour is another value (BraTS 2018's 4 against 2021's 3), or whose grade classes come in
    another order, would be scored wrongly without a word. Both are refused (single run and cross-validation); a
    different number of channels too; channel names that differ only warn."""
    from medtriad.data.layout import DatasetSpec
    from medtriad.evaluation.run import check_dataset_fits
    from medtriad.models.multitask import ModelSpec

    runs, _, _ = fold_runs
    model = ModelSpec.load(runs[0] / "model.json")
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data, ignore=shutil.ignore_patterns("imagesTr", "labelsTr"))
    original = json.loads((data / "dataset.json").read_text())
    check_dataset_fits(model, DatasetSpec.load(data), runs[0])  # the model's own dataset fits

    def edited(change):
        content = json.loads(json.dumps(original))
        change(content)
        (data / "dataset.json").write_text(json.dumps(content))
        return DatasetSpec.load(data)

    enhancing = max(original["labels"], key=original["labels"].get)
    moved = edited(lambda d: (d["labels"].update({enhancing: 3}), d.pop("medtriad", None)))
    with pytest.raises(ValueError, match="label values differ"):
        check_dataset_fits(model, moved, runs[0])
    swapped = edited(lambda d: d["medtriad"]["classification"]["grade"].update(classes=["HGG", "LGG"]))
    with pytest.raises(ValueError, match="task 'grade' is binary \\['HGG', 'LGG'\\] in the dataset"):
        check_dataset_fits(model, swapped, runs[0])
    fewer = edited(lambda d: d["channel_names"].pop(str(len(d["channel_names"]) - 1)))
    with pytest.raises(ValueError, match="reads 4 channel"):
        check_dataset_fits(model, fewer, runs[0])
    renamed = edited(lambda d: d["channel_names"].update({"0": "T2-FLAIR"}))
    with pytest.warns(UserWarning, match="not named as the model's"):
        check_dataset_fits(model, renamed, runs[0])

    shutil.copytree(synth_dataset / "imagesTr", data / "imagesTr")  # the CLI, before any case is predicted
    shutil.copytree(synth_dataset / "labelsTr", data / "labelsTr")
    edited(lambda d: d["medtriad"]["classification"]["grade"].update(classes=["HGG", "LGG"]))
    assert main(["evaluate", str(runs[0]), str(data), "--split", "all", "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "task 'grade'" in capsys.readouterr().err
    assert main(["evaluate", *map(str, runs), str(data), "--cross-validation", "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "task 'grade'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
