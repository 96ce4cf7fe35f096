"""One line per run and evaluation for the BraTS benchmark scripts: the run's training steps, the mean Dice of each
region over its held-out cases and the mean of those means (the figure the issue-2 rules compare).

Usage: python benchmarks/dice_summary.py LABEL=RUN [LABEL=RUN ...] [--evals NAME ...]
  NAME: evaluation folders inside RUN (default evaluation_val_last eval_mirrored), each holding summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN: a label for the printed line and a run folder")
    parser.add_argument("--evals", nargs="+", default=["evaluation_val_last", "eval_mirrored"])
    args = parser.parse_args()
    for item in args.runs:
        label, _, run = item.partition("=")
        steps = json.loads((Path(run) / "history.json").read_text())[-1]["step"]
        for name in args.evals:
            seg = json.loads((Path(run) / name / "summary.json").read_text())["segmentation"]
            dice = {k: v["mean"] for k, v in seg.items() if k.startswith("dice")}
            print(label, name, f"steps={steps}", " ".join(f"{k}={v:.3f}" for k, v in dice.items()),
                  f"mean={sum(dice.values()) / len(dice):.3f}")


if __name__ == "__main__":
    main()
