"""``medtriad``: one entry point; each subcommand is a thin wrapper over the modules that do the work.

    medtriad import brats SRC OUT        BraTS 2018 / 2021+ release -> dataset layout
    medtriad import medmnist NPZ OUT     MedMNIST 3D .npz -> dataset layout with its official splits
    medtriad findings DATASET            add the multi-label BraTS findings task (from the label maps)
    medtriad check DATASET               integrity check, every problem named with case and file
    medtriad train DATASET -c CONFIG -o RUN [--fold K] [--resume]
    medtriad evaluate RUN [RUN...] DATASET [--split val|all|test] [--checkpoint best|last] [-o OUT]   several: ensemble
    medtriad evaluate RUN_FOLD0 RUN_FOLD1 ... DATASET --cross-validation -o OUT    out-of-fold metrics over all folds
    medtriad predict -m RUN [RUN...] -i INPUT... -o OUT [--num-parts N --part-id K] [--overwrite]
    medtriad synth OUT --cases N         synthetic BraTS-like dataset on real anatomy
    medtriad demo [--out DIR] [--minutes M] [--quick]
    medtriad benchmark -c CONFIG -o OUT [--input-size X Y Z] [--encoder E] [--train DATASET --minutes M [--fold K]]
                       [--set SECTION.KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from medtriad.io import CaseFileError


def _cmd_import(args: argparse.Namespace) -> int:
    from medtriad.data.importers import import_brats

    out = import_brats(Path(args.src), Path(args.out), min_box_volume_mm3=args.min_box_volume,
                       progress=not args.quiet)
    print(f"dataset written to {out}")
    return 0


def _cmd_import_medmnist(args: argparse.Namespace) -> int:
    from medtriad.data.medmnist import import_medmnist

    out = import_medmnist(Path(args.npz), Path(args.out), task=args.task, channel_name=args.channel_name,
                          progress=not args.quiet)
    print(f"dataset written to {out} (official splits in {out / 'splits.json'})")
    return 0


def _cmd_findings(args: argparse.Namespace) -> int:
    from medtriad.data.findings import FINDINGS, add_findings_task

    findings = add_findings_task(Path(args.dataset), task=args.task, min_component_mm3=args.min_component)
    counts = [sum(v[i] for v in findings.values()) for i in range(len(FINDINGS))]
    print(f"task {args.task!r} added for {len(findings)} case(s); positives: "
          + ", ".join(f"{name} {n}" for name, n in zip(FINDINGS, counts)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from medtriad.data.check import check_dataset, format_problems

    problems = check_dataset(Path(args.dataset), progress=not args.quiet)
    if problems:
        print(format_problems(problems), file=sys.stderr)
        return 1
    print(f"{args.dataset}: no problems found")
    return 0


def _inference_overrides(pairs: list[str]) -> dict:
    """``--set inference.KEY=VALUE`` pairs of evaluate / predict -> {KEY: VALUE}."""
    from medtriad.config import parse_overrides

    out = {}
    for key, value in parse_overrides(pairs).items():
        section, _, name = key.partition(".")
        if section != "inference":
            raise ValueError(f"--set here changes inference settings only (inference.KEY=VALUE), got {key!r}")
        out[name] = value
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from medtriad.config import Config, parse_overrides
    from medtriad.training.trainer import TrainingDivergedError, resumed_config, train

    run = Path(args.output)
    if args.resume:  # the run's own config; -c / --set are accepted only where they change nothing (the trainer checks)
        config = (Config.load(args.config, parse_overrides(args.set)) if args.config
                  else resumed_config(run, parse_overrides(args.set)))
    else:
        config = Config.load(args.config or "brats-cpu", parse_overrides(args.set))
    try:
        result = train(args.dataset, config, run, fold=args.fold, resume=args.resume, device=args.device,
                       progress=not args.quiet)
    except TrainingDivergedError as error:
        print(error_message("train", error), file=sys.stderr)
        return 3
    print(f"run folder: {result.run_dir} (epochs {result.epochs_done}, best validation score {result.best_score:.4f})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medtriad.evaluation.run import evaluate_run

    if (Path(args.dataset) / "model.json").is_file():
        raise ValueError(f"{args.dataset} is a run folder: the last folder before the options must be the dataset "
                         f"(medtriad evaluate RUN [RUN ...] DATASET [options])")
    runs = [Path(r) for r in args.run]
    if args.cross_validation:
        from medtriad.evaluation.run import evaluate_cross_validation

        if args.split != "val":
            raise ValueError(f"--cross-validation scores each run on its own validation cases; --split {args.split} "
                             f"does not apply (score an ensemble of the runs on it instead: no --cross-validation)")
        if args.output is None:
            raise ValueError("--cross-validation needs an output folder (-o): nothing is written into a fold's run folder")
        out, summary = evaluate_cross_validation(runs, Path(args.dataset), args.output, device=args.device,
                                                 checkpoint=args.checkpoint, progress=not args.quiet,
                                                 inference=_inference_overrides(args.set))
    else:
        out, summary = evaluate_run(runs, Path(args.dataset), split=args.split, device=args.device,
                                    output=args.output, checkpoint=args.checkpoint, progress=not args.quiet,
                                    inference=_inference_overrides(args.set))
    print(json.dumps({k: v for k, v in summary.items()}, indent=1, default=str)[:4000])
    print(f"per-case metrics and summary written to {out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from medtriad.data.synth import generate_dataset

    out = generate_dataset(Path(args.out), args.cases, size=args.size, seed=args.seed, progress=not args.quiet)
    print(f"synthetic dataset written to {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medtriad.inference.run import predict_folder

    failures = predict_folder(args.model, [Path(p) for p in args.input], Path(args.output), device=args.device,
                              num_parts=args.num_parts, part_id=args.part_id, overwrite=args.overwrite,
                              progress=not args.quiet, heatmaps=args.heatmaps,
                              inference=_inference_overrides(args.set))
    if failures:
        print(f"{len(failures)} case(s) failed:", file=sys.stderr)
        for case_id, reason in failures:
            print(f"  {case_id}: {reason}", file=sys.stderr)
        return 1
    print(f"predictions written to {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medtriad.demo import run_demo

    report = run_demo(Path(args.out), minutes=args.minutes, quick=args.quick, progress=not args.quiet)
    print(f"report: {report.resolve()}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from medtriad.benchmark import run_benchmark
    from medtriad.config import Config, parse_overrides

    if args.train is None and args.minutes is not None:
        raise ValueError("--minutes is the training budget of --train DATASET; pass both or neither")
    config = Config.load(args.config, parse_overrides(args.set))
    run_benchmark(config, Path(args.output), input_size=args.input_size, encoder=args.encoder,
                  config_name=str(args.config), dataset=args.train, minutes=args.minutes or 0.0, fold=args.fold,
                  device=args.device, warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory,
                  progress=not args.quiet)
    print((Path(args.output) / "benchmark.md").read_text())
    print(f"benchmark written to {Path(args.output) / 'benchmark.md'} and benchmark.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtriad", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="convert a public release into the dataset layout")
    fmt = p.add_subparsers(dest="format", required=True)
    b = fmt.add_parser("brats", help="BraTS 2018 (HGG/LGG, labels 0/1/2/4) or 2021+ (labels 0/1/2/3)")
    b.add_argument("src")
    b.add_argument("out")
    b.add_argument("--min-box-volume", type=float, default=100.0, help="smallest lesion (mm^3) that gets a box")
    b.set_defaults(func=_cmd_import)
    m = fmt.add_parser("medmnist", help="a MedMNIST 3D .npz (e.g. adrenalmnist3d.npz) with its train/val/test split")
    m.add_argument("npz")
    m.add_argument("out")
    m.add_argument("--task", default="label", help="name of the classification task")
    m.add_argument("--channel-name", default="CT", help="the channel's name in dataset.json")
    m.set_defaults(func=_cmd_import_medmnist)

    p = sub.add_parser("findings", help="add the multi-label findings task (necrosis, enhancement, multifocal, "
                       "midline crossing, large oedema) derived from a BraTS dataset's label maps")
    p.add_argument("dataset")
    p.add_argument("--task", default="findings")
    p.add_argument("--min-component", type=float, default=100.0, help="smallest component (mm^3) for multifocal")
    p.set_defaults(func=_cmd_findings)

    p = sub.add_parser("check", help="verify every case of a dataset")
    p.add_argument("dataset")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("train", help="train a multi-task model")
    p.add_argument("dataset")
    p.add_argument("-c", "--config", default=None, help="YAML file or packaged recipe name (default brats-cpu)")
    p.add_argument("-o", "--output", required=True, help="run folder")
    p.add_argument("--fold", type=int, default=None, help="fold of the stratified k-fold split (default 0; with "
                   "--resume, the run's own)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint, "
                   "on its own fold and config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a trained run (or an ensemble of runs) on a dataset")
    p.add_argument("run", nargs="+", help="run folder; several: their predictions are averaged (an ensemble)")
    p.add_argument("dataset")
    p.add_argument("--split", default="val", help="val: the run's validation cases; all: every case; test (or any "
                   "name in the dataset's splits.json): that official split")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="best: the epoch with the best validation score (optimistic when scored on those same "
                   "validation cases: evaluate warns); last: the final weights")
    p.add_argument("-o", "--output", default=None, help="folder for per_case.csv and summary.json (default "
                   "RUN/evaluation_<split>[_last])")
    p.add_argument("--cross-validation", action="store_true", help="the runs are folds of one cross-validation: "
                   "each predicts only its own validation cases and the metrics are computed over all of them "
                   "together (out-of-fold AUC and AP over every held-out case); needs -o")
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="inference.KEY=VALUE",
                   help="override an inference setting of the run, e.g. inference.mirror_axes=[]")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="run a trained model on new scans")
    p.add_argument("-m", "--model", required=True, nargs="+", help="run folder or checkpoint folder; several: "
                   "their predictions are averaged (an ensemble)")
    p.add_argument("-i", "--input", required=True, nargs="+",
                   help="dataset folder (imagesTs/, else imagesTr/), images folder (CASE_0000.nii.gz ...), folder "
                   "of BraTS case folders, or the channel files of one case")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--num-parts", type=int, default=1, help="shard the cases over N processes or machines")
    p.add_argument("--part-id", type=int, default=0, help="which shard this process runs (0-based)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    p.add_argument("--heatmaps", action="store_true", help="slice2d plugin models: also write each task's attention "
                   "heatmap (CASE_heatmap_TASK.nii.gz, input geometry)")
    p.add_argument("--set", action="append", default=[], metavar="inference.KEY=VALUE",
                   help="override an inference setting of the model, e.g. inference.mirror_axes=[0,1,2]")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> predict -> HTML report")
    p.add_argument("--out", default="medtriad-demo",
                   help="output folder (a rerun reuses its data/ and replaces its run/)")
    p.add_argument("--minutes", type=float, default=None, help="training budget (default 7; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="a reduced, minute-long mode")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("benchmark", help="multi-task model against its three single-task models")
    p.add_argument("-c", "--config", default="brats-cpu", help="YAML file or packaged recipe name")
    p.add_argument("-o", "--output", required=True, help="folder for benchmark.md and benchmark.json")
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="measured input (default: the config's patch size)")
    p.add_argument("--encoder", default=None, help="override the config's encoder (swin, resenc, segresnet)")
    p.add_argument("--train", default=None, metavar="DATASET", help="also train each model on this dataset")
    p.add_argument("--minutes", type=float, default=None, help="training budget per model (with --train)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--device", default=None, help="training and second latency device (default: CUDA when present)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("synth", help="generate a synthetic BraTS-like dataset")
    p.add_argument("out")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    for leaf in (b, m, *(sub.choices[name] for name in sub.choices if name != "import")):
        leaf.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def warning_format(command: str, default):
    """``warnings.formatwarning`` for the command line: medtriad's own warnings as one line, ``medtriad COMMAND:
    warning: ...`` like its errors (not a file path, line number and source line); other libraries' as ``default``."""
    package = Path(__file__).resolve().parent

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if package in Path(filename).resolve().parents:
            return f"medtriad {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


def error_message(command: str, error: BaseException) -> str:
    """``medtriad COMMAND: error: ...``; the later lines of a message of several (every bad row of a classes.csv, the
    problems of a dataset that failed ``check``) indented beneath it, so that each reads as part of the one error."""
    first, *rest = str(error).splitlines() or [""]
    return "\n".join([f"medtriad {command}: error: {first}", *(f"  {line}" for line in rest)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default = warnings.formatwarning
    warnings.formatwarning = warning_format(args.command, default)
    try:
        return args.func(args)
    except (CaseFileError, ValueError, OSError) as error:  # OSError: a missing file, a folder without write access
        print(error_message(args.command, error), file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default


if __name__ == "__main__":
    sys.exit(main())
