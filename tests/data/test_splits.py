"""The split a run trains and validates on (medtriad.data.splits)."""

import json
import shutil

import numpy as np
import pytest

from medtriad.data.layout import load_dataset
from medtriad.data.splits import fold_split, stratified_folds


def test_stratified_folds_balance_classes(synth_dataset):
    spec, cases = load_dataset(synth_dataset)
    folds = stratified_folds(cases, spec, 4, seed=0)
    assert sorted(sum(folds, [])) == sorted(c.case_id for c in cases)
    grades = {c.case_id: c.classes["grade"] for c in cases}
    counts = [sum(grades[i] for i in fold) for fold in folds]
    assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="num_folds"):
        stratified_folds(cases, spec, 1, seed=0)
    assert np.array_equal(np.array(stratified_folds(cases, spec, 4, seed=0), dtype=object),
                          np.array(folds, dtype=object))


def test_fold_split_takes_the_fold_or_the_datasets_own_splits(synth_dataset, tmp_path):
    spec, cases = load_dataset(synth_dataset)
    folds = stratified_folds(cases, spec, 4, seed=0)
    by_id, val_ids, found_folds, predefined = fold_split(synth_dataset, cases, spec, 2, 4, seed=0)
    assert set(by_id) == {c.case_id for c in cases} and val_ids == set(folds[2])
    assert found_folds == folds and predefined is None
    with pytest.raises(ValueError, match="fold must be in 0..3, got 4"):
        fold_split(synth_dataset, cases, spec, 4, 4, seed=0)

    data = tmp_path / "official"  # a dataset with its own splits: train on "train", validate on "val", never "test"
    shutil.copytree(synth_dataset, data)
    ids = sorted(by_id)
    official = {"train": ids[:5], "val": ids[5:7], "test": ids[7:]}
    (data / "splits.json").write_text(json.dumps(official))
    spec, cases = load_dataset(data)
    by_id, val_ids, found_folds, predefined = fold_split(data, cases, spec, 0, 4, seed=0)
    assert set(by_id) == set(ids[:7]) and val_ids == set(ids[5:7])
    assert found_folds == [] and predefined == official
    with pytest.raises(ValueError, match="--fold 1 does not apply"):
        fold_split(data, cases, spec, 1, 4, seed=0)
