"""``medtriad evaluate``: score a run's best checkpoint (or an ensemble of runs) on its validation fold, a split of the
dataset, or every case."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medtriad.data.layout import Case, load_dataset, read_splits
from medtriad.data.transforms import load_sample
from medtriad.evaluation.evaluate import evaluate_samples, write_results
from medtriad.inference.ensemble import EnsemblePredictor, run_folders


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
    val_sets = []
    for folder in runs:
        split_file = folder / "split.json"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found: --split val needs the run's split (or use --split all)")
        val_sets.append(set(json.loads(split_file.read_text())["val"]))
    for folder, val in zip(runs[1:], val_sets[1:]):
        if val != val_sets[0]:
            raise ValueError(f"{folder} was validated on other cases than {runs[0]} (different folds or splits): "
                             f"an ensemble of them has no common validation set; use --split test or --split all "
                             f"with held-out cases")
    wanted = val_sets[0]
    missing = wanted - {c.case_id for c in cases}
    if missing:
        raise ValueError(f"validation cases {sorted(missing)} of {runs[0] / 'split.json'} are not in this dataset")
    return [c for c in cases if c.case_id in wanted]


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
    cases = split_cases(runs, cases, split, Path(dataset))
    samples = (load_sample(c, spec, predictor.spec.spacing, normalization=predictor.spec.normalization)
               for c in tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not progress))
    rows, summary, _ = evaluate_samples(predictor, samples)
    out = Path(output) if output else runs[0] / (f"evaluation_{split}" + ("_last" if checkpoint == "last" else ""))
    write_results(out, rows, summary)
    return out, summary
