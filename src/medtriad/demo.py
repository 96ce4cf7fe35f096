"""``medtriad demo``: the whole system on synthetic BraTS-like data, no download and no data of the user's own.

Generates the data (:mod:`medtriad.data.synth`), trains the default CPU recipe for the time given, evaluates on the
held-out fold, predicts one case to files, and writes one self-contained HTML report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from medtriad.config import Config
from medtriad.data.layout import load_dataset
from medtriad.data.synth import generate_dataset
from medtriad.data.transforms import load_sample, read_channels
from medtriad.evaluation.evaluate import evaluate_samples, write_results
from medtriad.evaluation.report import CaseView, write_report
from medtriad.evaluation.run import split_cases
from medtriad.inference.predictor import Predictor
from medtriad.inference.writers import write_prediction
from medtriad.training.trainer import train


def run_demo(out: str | Path = "medtriad-demo", minutes: float | None = None, quick: bool = False, seed: int = 0,
             progress: bool = True, report_cases: int = 3) -> Path:
    """Run the demo into ``out``; returns the report's path.

    Args:
        minutes: training budget (default: the recipe's, 7 minutes; ``--quick``: 1 minute).
        quick: a reduced mode (8 small cases, a small model) that runs in about a minute, for tests.
    """
    start = time.monotonic()
    out = Path(out)
    data, run = out / "data", out / "run"
    num_cases, size = (8, 48) if quick else (30, 96)
    if not (data / "dataset.json").is_file():
        generate_dataset(data, num_cases, size=size, seed=seed, progress=progress)
    config = Config.load("demo-quick" if quick else "demo-cpu")
    if minutes is not None:
        config.training.max_minutes = float(minutes)
    config.training.seed = seed
    shutil.rmtree(run, ignore_errors=True)  # a rerun trains afresh: the demo's run is its own, replaced each time
    train(data, config, run, fold=0, progress=progress)

    predictor = Predictor.from_pretrained(run)
    spec, cases = load_dataset(data)
    val_cases = split_cases(run, cases, "val")
    val_ids = {c.case_id for c in val_cases}
    samples = [load_sample(c, spec, predictor.spec.spacing, normalization=predictor.spec.normalization) for c in val_cases]
    rows, summary, predictions = evaluate_samples(predictor, samples, progress=progress, keep_predictions=True)
    write_results(run / "evaluation_val", rows, summary)
    write_prediction(out / "prediction", predictions[0], predictor.spec.heads)

    views = []
    for case, sample, prediction in list(zip(val_cases, samples, predictions))[:report_cases]:
        channels, _ = read_channels(case.image_files, case.case_id)
        views.append(CaseView(case.case_id, channels, predictor.spec.channel_names, sample.label, sample.boxes,
                              sample.classes, prediction))
    elapsed = (time.monotonic() - start) / 60
    notes = [f"Synthetic BraTS-like data ({num_cases} cases, MNI152 anatomy, seed {seed}); model "
             f"{predictor.spec.encoder} with heads {', '.join(predictor.spec.heads)}; trained "
             f"{config.training.max_minutes:g} min on {predictor.device}; demo wall time {elapsed:.1f} min.",
             f"Held-out cases: {', '.join(sorted(val_ids))}. Prediction files of {predictions[0].case_id} are in "
             f"{out / 'prediction'}."]
    return write_report(out / "report.html", "medtriad demo: detection, segmentation and classification",
                        summary, views, predictor.spec.regions, predictor.spec.tasks, run / "progress.png", notes)
