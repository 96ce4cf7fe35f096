"""Issue 4 benchmark: predict one full BraTS case (4 x 240 x 240 x 155) on CPU, all three tasks.

Reports, per model, the median wall time of ``Predictor.predict`` + writing the output files (reading the four
NIfTI files, preprocessing, inference, mapping back, writing mask/boxes/probabilities), the peak RSS of the process,
and the wall time of the whole ``medtriad predict`` command (interpreter start and imports included). The multi-task
model is compared with its three single-task variants run one after another on the same case (each reads and writes
its own files, as three separate models would).

    python benchmarks/predict_cpu.py [--run RUN_DIR] [--threads 2] [-o OUT]

Without ``--run`` the models are the brats-cpu recipe's architecture with random weights (the cost of a forward pass
does not depend on the weights); with ``--run`` the multi-task model is that trained run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT.parent / "shared" / "data" / "brats2018-sample" / "MICCAI_BraTS_2018_Data_Training" / "HGG" / "Brats18_2013_11_1"


def case_files(case: Path) -> list[Path]:
    return [case / f"{case.name}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")]


def make_model_dir(spec, folder: Path) -> Path:
    """A predictable model folder (model.json, config.yaml, checkpoints/best) with random weights."""
    import torch

    from medtriad.checkpoint import save_checkpoint
    from medtriad.config import Config
    from medtriad.models.multitask import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel(spec)
    folder.mkdir(parents=True, exist_ok=True)
    spec.save(folder / "model.json")
    Config.load("brats-cpu").save(folder / "config.yaml")
    (folder / "checkpoints").mkdir(exist_ok=True)
    save_checkpoint(folder / "checkpoints" / "best", model.state_dict(), {"note": "random weights for timing"})
    return folder


def child(model: str, files: list[str], out: str, repeats: int) -> None:
    """Runs in a fresh process: time predict + write, report JSON on stdout."""
    from medtriad.inference.predictor import Predictor
    from medtriad.inference.writers import write_prediction

    predictor = Predictor.from_pretrained(model, device="cpu")
    times = []
    for _ in range(repeats + 1):  # the first run warms up (allocator, oneDNN kernels) and is not counted
        start = time.perf_counter()
        pred = predictor.predict(files, case_id="case")
        write_prediction(out, pred, predictor.spec.heads)
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"median_s": statistics.median(times[1:]), "first_s": times[0], "times_s": times[1:],
                      "peak_rss_mib": peak_mib, "boxes": int(len(pred.scores))}))


def measure(model: Path, files: list[Path], repeats: int, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run([sys.executable, __file__, "--child", str(model), out, str(repeats),
                                 *map(str, files)], capture_output=True, text=True, env=env, check=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        start = time.perf_counter()
        subprocess.run(["medtriad", "predict", "-m", str(model), "-i", *map(str, files), "-o", out, "-q",
                        "--overwrite", "--device", "cpu"], check=True, env=env, capture_output=True)
        measured["cli_s"] = time.perf_counter() - start
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="trained multi-task run (default: random weights)")
    parser.add_argument("--case", type=Path, default=CASE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from medtriad.benchmark import brats_model_spec, variant_specs
    from medtriad.config import Config

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    files = case_files(args.case)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = variant_specs(brats_model_spec(Config.load("brats-cpu")))
        for name, spec in specs.items():
            folder = args.run if (name == "multi" and args.run) else make_model_dir(spec, Path(tmp) / name)
            results[name] = measure(folder, files, args.repeats, env)
            print(f"{name:>6}: predict+write {results[name]['median_s']:.2f} s (median of {args.repeats}), "
                  f"peak RSS {results[name]['peak_rss_mib']:.0f} MiB, CLI end to end {results[name]['cli_s']:.2f} s",
                  flush=True)
    singles = [k for k in results if k != "multi"]
    ratio = results["multi"]["median_s"] / sum(results[k]["median_s"] for k in singles)
    cli_ratio = results["multi"]["cli_s"] / sum(results[k]["cli_s"] for k in singles)
    print(f"multi-task / three single-task models one after another: {ratio:.2f} (predict+write), "
          f"{cli_ratio:.2f} (CLI end to end)")
    report = {"case": str(args.case), "threads": args.threads, "trained_run": str(args.run) if args.run else None,
              "models": results, "latency_ratio": ratio, "cli_latency_ratio": cli_ratio}
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[5:], sys.argv[3], int(sys.argv[4]))
    else:
        main()
