"""``medtriad evaluate``: score a run's best checkpoint (or an ensemble of runs) on its validation fold, a split of the
dataset, or every case; or score the folds of a cross-validation together, each on its own held-out cases."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medtriad.data.layout import Case, DatasetSpec, load_dataset, read_splits
from medtriad.data.transforms import load_sample
from medtriad.evaluation.evaluate import evaluate_samples, score_case, summarize_scores, write_results
from medtriad.inference.ensemble import EnsemblePredictor, check_specs_agree, run_folders
from medtriad.inference.predictor import Predictor
from medtriad.models.multitask import ModelSpec

# what the folds of one cross-validation must share for their held-out cases to be scored as one set (their grids,
# channels and encoders may differ: each fold reads its cases as it was trained to)
CROSS_VALIDATION_FIELDS = ("heads", "regions", "labels", "tasks")


def check_dataset_fits(model: ModelSpec, dataset: DatasetSpec, run: str | Path) -> None:
    """Refuse to score ``model`` on a dataset whose targets mean something else: the ground truth is read in the
    dataset's label values and class order and scored in the model's, so a label value or a class order that differs
    (BraTS 2018's enhancing tumour 4 against 2021's 3) would give wrong metrics without any error. A different number
    of channels is refused too; channel names that differ (in order) only warn, since datasets name contrasts their
    own way, but the contrasts must come in the model's order."""
    where = f"{run} (model) against {dataset.root / 'dataset.json'}"
    if dataset.num_channels != model.in_channels:
        raise ValueError(f"{where}: the model reads {model.in_channels} channel(s) {model.channel_names}, the dataset "
                         f"has {dataset.num_channels}")
    names = [dataset.channel_names[i] for i in sorted(dataset.channel_names)]
    if [n.lower() for n in names] != [n.lower() for n in model.channel_names]:
        warnings.warn(f"{where}: channels {names} are not named as the model's {model.channel_names}; they are read "
                      f"in that order", stacklevel=3)
    if "segmentation" in model.heads and model.labels:
        differ = sorted(n for n in set(model.labels) & set(dataset.labels) if model.labels[n] != dataset.labels[n])
        if differ or sorted(model.labels.values()) != sorted(dataset.labels.values()):
            raise ValueError(f"{where}: label values differ (model {model.labels}, dataset {dataset.labels}); the "
                             f"model's regions {model.regions} would be read from the wrong labels")
    for name, task in model.tasks.items():
        theirs = dataset.tasks.get(name)
        if theirs is not None and (theirs.kind != task["kind"] or list(theirs.classes) != list(task["classes"])):
            raise ValueError(f"{where}: classification task {name!r} is {theirs.kind} {list(theirs.classes)} in the "
                             f"dataset but {task['kind']} {task['classes']} in the model (same classes, same order "
                             f"needed)")


def split_cases(run: str | Path | Sequence[str | Path], cases: list[Case], split: str,
                dataset: Path | None = None) -> list[Case]:
    """The cases of ``split``: ``"val"`` = the validation cases in the run's ``split.json`` (for several runs, an
    ensemble, the validation cases they all share: they must be the same, or the ensemble would be scored on cases
    some member trained on), ``"all"`` = all, any other name (``"test"``) = that split of the dataset's own
    ``splits.json``."""
    if split == "all":
        return cases
    if split != "val":
        splits = read_splits(dataset, [c.case_id for c in cases]) if dataset is not None else None
        if splits is None or split not in splits:
            raise ValueError(f"split {split!r}: use 'val', 'all' or a split of the dataset's splits.json "
                             f"({sorted(splits) if splits else 'none here'})")
        wanted = set(splits[split])
        return [c for c in cases if c.case_id in wanted]
    runs = run_folders(run)
    val_sets = [set(read_run_split(folder, "--split val needs the run's split (or use --split all)")["val"])
                for folder in runs]
    for folder, val in zip(runs[1:], val_sets[1:]):
        if val != val_sets[0]:
            raise ValueError(f"{folder} was validated on other cases than {runs[0]} (different folds or splits): "
                             f"an ensemble of them has no common validation set; use --split test or --split all "
                             f"with held-out cases")
    return _validation_cases(cases, val_sets[0], runs[0])


def read_run_split(folder: Path, needed_for: str) -> dict[str, Any]:
    """A run's ``split.json``; a missing one is a FileNotFoundError saying what it was ``needed_for``."""
    split_file = folder / "split.json"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file} not found: {needed_for}")
    return json.loads(split_file.read_text())


def _validation_cases(cases: list[Case], wanted: set[str], run: Path) -> list[Case]:
    """The cases of ``cases`` named in ``wanted`` (``run``'s validation cases), all of which must be there."""
    missing = wanted - {c.case_id for c in cases}
    if missing:
        raise ValueError(f"validation cases {sorted(missing)} of {run / 'split.json'} are not in this dataset")
    return [c for c in cases if c.case_id in wanted]


def validated_epochs(run: Path) -> int:
    """How many epochs of ``run`` were scored on its validation cases (from its ``history.json``; 0 without one)."""
    history = run / "history.json"
    return sum(1 for r in json.loads(history.read_text()) if r.get("validation")) if history.is_file() else 0


def chosen_on_these_cases(runs: Sequence[Path], checkpoint: str) -> bool:
    """Whether scoring ``checkpoint`` of ``runs`` on their validation cases is optimistic: the best checkpoint was
    picked among several validated epochs by its score on those very cases. Warns, naming the way out."""
    counts = {r: validated_epochs(r) for r in runs}
    picked = [r for r, n in counts.items() if n >= 2]
    if checkpoint != "best" or not picked:
        return False
    warnings.warn(f"{picked[0]}: the best checkpoint was picked among {counts[picked[0]]} validated epochs by its "
                  f"score on these same validation cases, so these metrics are optimistic; --checkpoint last scores "
                  f"the final weights", stacklevel=2)
    return True


def evaluate_run(run: str | Path | Sequence[str | Path], dataset: Path, split: str = "val", device: str | None = None,
                 output: str | Path | None = None, checkpoint: str = "best",
                 progress: bool = True, inference: dict | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``per_case.csv`` and ``summary.json`` to ``output`` (default ``RUN/evaluation_<split>``, with ``_last``
    appended for ``checkpoint="last"``; required for several runs).

    ``run`` is one run folder, or several: their predictions are averaged (:mod:`medtriad.inference.ensemble`).

    ``split="val"`` takes the validation cases recorded in the run's ``split.json``; ``"all"`` every case of
    ``dataset`` (for an external test set); another name, that split of the dataset's ``splits.json`` (``"test"``).
    ``inference`` overrides the run's inference settings by key (``{"mirror_axes": []}``).
    """
    runs = run_folders(run)
    if len(runs) > 1 and output is None:
        raise ValueError(f"{len(runs)} runs are evaluated as one ensemble: name its output folder "
                         f"(-o on the command line), nothing is written into a member's run folder")
    predictor = EnsemblePredictor.from_pretrained_runs(runs, device=device, checkpoint=checkpoint,
                                                       inference=inference)
    spec, cases = load_dataset(dataset)
    check_dataset_fits(predictor.spec, spec, runs[0])
    cases = split_cases(runs, cases, split, Path(dataset))
    chosen = chosen_on_these_cases(runs, checkpoint) if split == "val" else None  # warned before the long part
    samples = (load_sample(c, spec, predictor.spec.spacing, normalization=predictor.spec.normalization)
               for c in tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not progress))
    rows, summary, _ = evaluate_samples(predictor, samples)
    summary["checkpoint"] = checkpoint
    if chosen is not None:
        summary["checkpoint_chosen_on_these_cases"] = chosen
    out = Path(output) if output else runs[0] / (f"evaluation_{split}" + ("_last" if checkpoint == "last" else ""))
    write_results(out, rows, summary)
    return out, summary


def cross_validation_folds(runs: Sequence[str | Path], cases: list[Case]) -> list[tuple[Any, list[Case]]]:
    """Per run, its fold (from its ``split.json``, else its position) and its own validation cases, checked to be a
    cross-validation: at least two runs, no case held out by two of them (it would be counted twice), every case in
    the dataset."""
    runs = run_folders(runs)
    if len(runs) < 2:
        raise ValueError(f"a cross-validation needs the runs of at least two folds, got {len(runs)}")
    owner: dict[str, Path] = {}
    folds = []
    for position, folder in enumerate(runs):
        split = read_run_split(folder, "a cross-validation scores each run on the validation cases its split.json names")
        val = set(split["val"])
        fold_cases = _validation_cases(cases, val, folder)
        twice = sorted(c for c in val if c in owner)
        if twice:
            raise ValueError(f"{folder} and {owner[twice[0]]} both hold out {twice}: the runs of a cross-validation "
                             f"must validate on disjoint cases (different folds of one split)")
        owner.update((c, folder) for c in val)
        folds.append((split.get("fold", position), fold_cases))
    return folds


def evaluate_cross_validation(runs: Sequence[str | Path], dataset: Path, output: str | Path, device: str | None = None,
                              checkpoint: str = "best", progress: bool = True,
                              inference: dict | None = None) -> tuple[Path, dict[str, Any]]:
    """nnU-Net's cross-validation summary: each run (one fold) predicts only the cases it held out, and the metrics
    are computed once over all of them (out-of-fold), so that the AUC ranks every case against every other and
    detection AP pools every box, instead of averaging per-fold figures over two cases each.

    Writes ``per_case.csv`` (a ``fold`` column: the run's fold from its ``split.json``, else its position) and
    ``summary.json`` (plus ``cross_validation``: the runs, their folds and case counts, and the dataset cases no
    run held out) to ``output``.
    """
    runs = run_folders(runs)
    spec, cases = load_dataset(dataset)
    folds = cross_validation_folds(runs, cases)
    chosen = chosen_on_these_cases(runs, checkpoint)
    missing = [str(r / "model.json") for r in runs if not (r / "model.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found: a cross-validation takes run folders")
    specs = [ModelSpec.load(r / "model.json") for r in runs]
    check_specs_agree(specs, [str(r) for r in runs], CROSS_VALIDATION_FIELDS, "the folds of a cross-validation")
    for folder, model in zip(runs, specs):
        check_dataset_fits(model, spec, folder)
    scores = []
    bar = tqdm(total=sum(len(c) for _, c in folds), desc="cross-validation", unit="case", disable=not progress)
    for folder, (fold, fold_cases) in zip(runs, folds):
        predictor = Predictor.from_pretrained(folder, device=device, checkpoint=checkpoint, inference=inference)
        for case in fold_cases:
            sample = load_sample(case, spec, predictor.spec.spacing, normalization=predictor.spec.normalization)
            score, _ = score_case(predictor, sample)
            score.row = {"case": score.row["case"], "fold": fold, **{k: v for k, v in score.row.items() if k != "case"}}
            scores.append(score)
            bar.update()
    bar.close()
    rows, summary = summarize_scores(scores, specs[0])
    held_out = {c.case_id for _, fold_cases in folds for c in fold_cases}
    summary["cross_validation"] = {
        "runs": [str(r) for r in runs], "folds": [f for f, _ in folds], "cases_per_fold": [len(c) for _, c in folds],
        "checkpoint": checkpoint, "checkpoint_chosen_on_these_cases": chosen,
        "cases_not_held_out": sorted(c.case_id for c in cases if c.case_id not in held_out)}
    out = Path(output)
    write_results(out, rows, summary)
    return out, summary
