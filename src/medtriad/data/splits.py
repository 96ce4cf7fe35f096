"""How a dataset's cases divide into training and validation for a run: the dataset's own ``splits.json`` (official
splits, e.g. MedMNIST: train on "train", select on "val") where it has one, else a k-fold split stratified by class.
The trainer (``medtriad train --fold K``) and ``medtriad benchmark`` (which checks, before training, what the fold can
train) both take their split from :func:`fold_split`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from medtriad.data.layout import Case, DatasetSpec, read_splits

__all__ = ["stratified_folds", "fold_split"]


def stratified_folds(cases: list[Case], spec: DatasetSpec, num_folds: int, seed: int) -> list[list[str]]:
    """Split case ids into ``num_folds`` folds, stratified by the first classification task's class (if any)."""
    if num_folds < 2 or num_folds > len(cases):
        raise ValueError(f"num_folds must be between 2 and the number of cases ({len(cases)}), got {num_folds}")
    task = next(iter(spec.tasks), None)
    strata: dict[Any, list[str]] = {}
    for case in cases:
        key = case.classes.get(task) if task else None
        strata.setdefault(str(key), []).append(case.case_id)
    rng = random.Random(seed)
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    position = 0
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        for case_id in ids:
            folds[position % num_folds].append(case_id)
            position += 1
    return [sorted(f) for f in folds]


def fold_split(dataset: Path, cases: list[Case], spec: DatasetSpec, fold: int, num_folds: int,
               seed: int) -> tuple[dict[str, Case], set[str], list[list[str]], dict | None]:
    """The cases a run on ``fold`` uses, by id, and which of them validate: splits.json's train and val where the
    dataset has one (``fold`` must then be 0), else fold ``fold`` of :func:`stratified_folds`. Returns (cases by
    id, validation ids, the folds ([] with splits.json), splits.json's content or None)."""
    by_id = {c.case_id: c for c in cases}
    predefined = read_splits(dataset, list(by_id))
    if predefined is not None:  # official splits: train on "train", select on "val", never touch the rest
        if fold:
            raise ValueError(f"{dataset / 'splits.json'} defines the split; --fold {fold} does not apply")
        return ({i: by_id[i] for i in predefined["train"] + predefined["val"]}, set(predefined["val"]), [],
                predefined)
    folds = stratified_folds(cases, spec, num_folds, seed)
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold must be in 0..{len(folds) - 1}, got {fold}")
    return by_id, set(folds[fold]), folds, None
