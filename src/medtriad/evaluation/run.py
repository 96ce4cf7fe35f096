"""``medtriad evaluate``: score a run's best checkpoint on its validation fold (or on every case of a dataset)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medtriad.data.layout import Case, load_dataset, read_splits
from medtriad.data.transforms import load_sample
from medtriad.evaluation.evaluate import evaluate_samples, write_results
from medtriad.inference.predictor import Predictor


def split_cases(run: Path, cases: list[Case], split: str, dataset: Path | None = None) -> list[Case]:
    """The cases of ``split``: ``"val"`` = the validation cases in the run's ``split.json``, ``"all"`` = all, any
    other name (``"test"``) = that split of the dataset's own ``splits.json``."""
    if split == "all":
        return cases
    if split != "val":
        splits = read_splits(dataset, [c.case_id for c in cases]) if dataset is not None else None
        if splits is None or split not in splits:
            raise ValueError(f"split {split!r}: use 'val', 'all' or a split of the dataset's splits.json "
                             f"({sorted(splits) if splits else 'none here'})")
        wanted = set(splits[split])
        return [c for c in cases if c.case_id in wanted]
    split_file = run / "split.json"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file} not found: --split val needs the run's split (or use --split all)")
    wanted = set(json.loads(split_file.read_text())["val"])
    missing = wanted - {c.case_id for c in cases}
    if missing:
        raise ValueError(f"validation cases {sorted(missing)} of {split_file} are not in this dataset")
    return [c for c in cases if c.case_id in wanted]


def evaluate_run(run: Path, dataset: Path, split: str = "val", device: str | None = None,
                 output: str | Path | None = None, checkpoint: str = "best",
                 progress: bool = True, inference: dict | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``per_case.csv`` and ``summary.json`` to ``output`` (default ``RUN/evaluation_<split>``).

    ``split="val"`` takes the validation cases recorded in the run's ``split.json``; ``"all"`` every case of
    ``dataset`` (for an external test set); another name, that split of the dataset's ``splits.json`` (``"test"``).
    ``inference`` overrides the run's inference settings by key (``{"mirror_axes": []}``).
    """
    predictor = Predictor.from_pretrained(run, device=device, checkpoint=checkpoint, inference=inference)
    spec, cases = load_dataset(dataset)
    cases = split_cases(run, cases, split, Path(dataset))
    samples = (load_sample(c, spec, predictor.spec.spacing, normalization=predictor.spec.normalization)
               for c in tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not progress))
    rows, summary, _ = evaluate_samples(predictor, samples)
    out = Path(output) if output else run / f"evaluation_{split}"
    write_results(out, rows, summary)
    return out, summary
