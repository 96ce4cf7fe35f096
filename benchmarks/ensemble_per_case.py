"""Score an ensemble from the per-case CSVs of its members' evaluations, without predicting again.

`medtriad evaluate RUN1 RUN2 ... DATASET` averages the members' class probabilities case by case; when each member
has already been evaluated on the same split with the same inference settings, averaging the `p_TASK_CLASS`
columns of their `per_case.csv` gives the same probabilities (to the CSV's 6 significant digits; checked on the eleventh
session's two- and four-run vessel ensembles: identical AUC, largest difference 8e-7) in seconds instead of minutes.
Binary and multi-class tasks (one `target_TASK` column each).

Usage: python benchmarks/ensemble_per_case.py RUN1/evaluation_val/per_case.csv RUN2/... [-o OUT.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from medtriad.evaluation.metrics import classification_metrics
from medtriad.io import write_json


def _read(path: str) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def ensemble_metrics(paths: list[str]) -> dict[str, dict[str, float]]:
    """Task -> classification metrics of the members' averaged probabilities."""
    members = [_read(p) for p in paths]
    cases = sorted(members[0])
    for path, member in zip(paths, members):
        if sorted(member) != cases:
            raise ValueError(f"{path}: not the same cases as {paths[0]}")
    columns = list(next(iter(members[0].values())))
    results = {}
    for task in [c.removeprefix("target_") for c in columns if c.startswith("target_")]:
        prob_columns = [c for c in columns if c.startswith(f"p_{task}_")]
        targets = [int(members[0][c][f"target_{task}"]) for c in cases]
        for path, member in zip(paths, members):
            if [int(member[c][f"target_{task}"]) for c in cases] != targets:
                raise ValueError(f"{path}: targets of {task!r} differ from {paths[0]}")
        probs = np.mean([[[float(m[c][p]) for p in prob_columns] for c in cases] for m in members], axis=0)
        names = [p.removeprefix(f"p_{task}_") for p in prob_columns]
        if len(names) == 2:
            results[task] = classification_metrics("binary", probs[:, 1], targets, names)
        else:
            results[task] = classification_metrics("multiclass", probs, targets, names)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("per_case", nargs="+", help="per_case.csv of each member, same split")
    parser.add_argument("-o", "--output", help="also write the metrics to this JSON file")
    args = parser.parse_args()
    results = ensemble_metrics(args.per_case)
    print(json.dumps(results, indent=2))
    if args.output:
        write_json(Path(args.output), results)


if __name__ == "__main__":
    main()
