"""Pool `medtriad benchmark --train` reports of several folds (or seeds): mean and spread per model and metric, and
the multi-task minus single-task differences against issue 5's tolerances (0.02 Dice, 0.02 AP, 0.03 AUC).

Usage: python benchmarks/compare_folds.py OUT/fold*/benchmark.json -o OUT/folds.md   (also writes folds.json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medtriad.benchmark import compare_folds, format_folds_markdown
from medtriad.io import atomic_write_text, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="benchmark.json files of trained runs")
    parser.add_argument("-o", "--output", required=True, help="Markdown file (a .json twin is written beside it)")
    args = parser.parse_args()
    pooled = compare_folds([json.loads(Path(p).read_text()) for p in args.reports])
    out = Path(args.output)
    atomic_write_text(out, format_folds_markdown(pooled))
    write_json(out.with_suffix(".json"), pooled)


if __name__ == "__main__":
    main()
