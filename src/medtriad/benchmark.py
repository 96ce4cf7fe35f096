"""Multi-task against single-task: what sharing one encoder saves (MTMed3D's comparison, issue 5).

The multi-task model and its three single-task variants (the same encoder and head settings, one head each) are
measured on the same input: parameters, FLOPs per forward pass (counted by PyTorch's own
``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2), latency (median of repeated inference-mode runs
after warm-up: encoder + heads, detection post-processing included), and peak memory (CPU: the peak-RSS growth of
one forward pass in a fresh child process per model; CUDA: ``torch.cuda.max_memory_allocated``). With a dataset,
each of the four is also trained for the same time budget on the same fold, and the validation summary gives Dice
per region, AP at IoU 0.10 and each classification task's AUC.

The table's last two rows answer the question: "single-task sum" is what the three separate models cost together
(run one after another on the same scan; for peak memory the largest of the three, since models run one after
another never hold their activations at once), and "multi / sum" the multi-task model's share of that.

Without a dataset the model specs follow the BraTS convention (4 contrasts, regions WT/TC/ET over labels 0/1/2/4,
binary task ``grade``), with detection anchors derived from a typical 40 x 40 x 30 mm tumour box.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from medtriad.config import Config
from medtriad.data.importers import BRATS_CHANNELS
from medtriad.data.layout import load_dataset
from medtriad.data.splits import fold_split
from medtriad.evaluation.evaluate import headline_metrics
from medtriad.io import atomic_write_text, write_json
from medtriad.models.heads.detection import DEFAULT_STRIDES, anchor_shapes_from_boxes
from medtriad.models.multitask import ModelSpec, MultiTaskModel, check_input_size
from medtriad.training.losses import loss_head

#: row name -> heads; "multi" first, then one single-task model per head
VARIANTS: dict[str, list[str]] = {
    "multi": ["segmentation", "detection", "classification"],
    "seg": ["segmentation"],
    "det": ["detection"],
    "cls": ["classification"],
}
SINGLE = ("seg", "det", "cls")
_SHORT = {"segmentation": "seg", "detection": "det", "classification": "cls"}

BRATS_LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}
BRATS_REGIONS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
BRATS_TASKS = {"grade": {"kind": "binary", "classes": ["LGG", "HGG"]}}
TYPICAL_BOX_MM = (40.0, 40.0, 30.0)


# ---------------------------------------------------------------------------------------------------- model specs
def brats_model_spec(config: Config, encoder: str | None = None,
                     box_mm: Sequence[float] = TYPICAL_BOX_MM) -> ModelSpec:
    """The multi-task spec a BraTS training run with ``config`` would build, without reading a dataset.

    Anchor shapes come from :func:`anchor_shapes_from_boxes` on one ``box_mm`` box at the config's spacing (the
    number of anchors, hence every count, is the same as with shapes derived from real boxes). ``encoder`` overrides
    the config's (:func:`config_with_encoder`).
    """
    config = config_with_encoder(config, encoder)
    box_vox = np.asarray(box_mm, dtype=float) / np.asarray(config.data.spacing, dtype=float)
    detection = dict(config.model.detection)
    detection.setdefault("anchor_shapes", anchor_shapes_from_boxes(
        box_vox[None], config.data.patch_size, strides=detection.get("strides", DEFAULT_STRIDES)))
    detection.setdefault("score_threshold", config.inference.score_threshold)
    detection.setdefault("nms_threshold", config.inference.nms_threshold)
    detection.setdefault("max_detections", config.inference.max_detections)
    return ModelSpec(
        encoder=config.model.encoder, in_channels=len(BRATS_CHANNELS), channel_names=list(BRATS_CHANNELS),
        heads=list(VARIANTS["multi"]), spacing=list(config.data.spacing),
        encoder_kwargs=dict(config.model.encoder_kwargs),
        regions=copy.deepcopy(BRATS_REGIONS), labels=dict(BRATS_LABELS), tasks=copy.deepcopy(BRATS_TASKS),
        segmentation=dict(config.model.segmentation),
        detection=detection, classification_hidden=config.model.classification_hidden,
        classification_dropout=config.model.classification_dropout,
        radial_coordinate=config.model.radial_coordinate)


def config_with_encoder(config: Config, encoder: str | None) -> Config:
    """A copy of ``config`` with another encoder; its ``encoder_kwargs`` and ``segmentation`` settings are dropped
    (they belong to the config's own encoder: decoder widths per level, a decoder that needs its channel layout)."""
    config = copy.deepcopy(config)
    if encoder and encoder != config.model.encoder:
        config.model.encoder, config.model.encoder_kwargs, config.model.segmentation = encoder, {}, {}
    return config


def variant_specs(spec: ModelSpec) -> dict[str, ModelSpec]:
    """``spec`` as the multi-task model plus one single-task spec per head (``heads=[head]``, all else equal)."""
    missing = set(VARIANTS["multi"]) - set(spec.heads)
    if missing:
        raise ValueError(f"the multi-task spec must hold all three heads; missing {sorted(missing)}")
    return {name: dataclasses.replace(spec, heads=list(heads)) for name, heads in VARIANTS.items()}


# ---------------------------------------------------------------------------------------------------- measurements
def count_parameters(model: nn.Module) -> int:
    """Number of parameters (the detection head's MONAI detector holds none, so nothing is double counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, *inputs: Any) -> int:
    """FLOPs of one ``model(*inputs)`` call as PyTorch's flop counter counts them.

    The counter covers matrix multiplications and convolutions (2 FLOPs per multiply-accumulate; biases,
    normalisation, activations and NMS are not counted). fvcore and many papers (MTMed3D among them) count one
    multiply-accumulate as one "FLOP": their figures compare with the GMACs column (half of these).
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latencies(models: dict[str, nn.Module], x: Tensor, warmup: int = 2,
                      repeats: int = 5) -> dict[str, dict[str, float]]:
    """Median, min and max wall time (ms) of ``model(x)`` in inference mode for each model, after ``warmup`` untimed
    runs each.

    The timed runs are interleaved (one run of every model per round, the order rotating between rounds), so that
    a change in the machine's load during the measurement (other processes, clock boosts, thermal limits) is
    shared by all models instead of falling on whichever model happened to run then.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                models[name](x)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                _sync(x.device)
                start = time.perf_counter()
                models[name](x)
                _sync(x.device)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "runs": repeats}
            for name, t in times.items()}


def measure_latency(model: nn.Module, x: Tensor, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """:func:`measure_latencies` of one model."""
    return measure_latencies({"model": model}, x, warmup, repeats)["model"]


def measure_cuda_memory(model: nn.Module, x: Tensor) -> float:
    """Peak CUDA memory (MiB) one inference forward pass allocates beyond the weights and the input."""
    torch.cuda.synchronize(x.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child() -> None:
    """Child process of :func:`measure_cpu_memory`: a JSON request on stdin, a JSON answer on stdout."""
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["threads"])
    torch.manual_seed(0)
    model = MultiTaskModel(ModelSpec(**request["spec"])).eval()
    x = torch.randn(1, model.spec.in_channels, *request["input_size"])
    with torch.inference_mode():
        # a pass on a minimal input first: loads the oneDNN kernels and thread pools, which would otherwise
        # count as the measured pass's memory (~100 MiB whatever the input)
        model(torch.zeros(1, model.spec.in_channels, *[2 * model.size_divisible] * 3))
        before = _status_mib("VmRSS")
        reset = _reset_peak_rss()
        model(x)
    peak = _status_mib("VmHWM")
    print(json.dumps({"forward_peak_mib": peak - before, "process_peak_mib": peak, "rss_before_mib": before,
                      "peak_reset": reset}))


def measure_cpu_memory(spec: ModelSpec, input_size: Sequence[int], threads: int | None = None) -> dict[str, float]:
    """Peak memory of one CPU inference pass, measured in a fresh Python process so that nothing the parent has
    allocated (other models, the allocator's cache) hides or inflates it.

    The child resets the kernel's peak-RSS mark just before the pass, and runs with glibc's mmap threshold pinned at
    128 KiB, so that every tensor larger than that is returned to the system when freed and the RSS follows the
    live tensors (with the default dynamic threshold freed activations stay in the heap and the peak depends on
    allocation order).

    Returns (MiB): ``forward_peak_mib`` the peak RSS during the pass minus the RSS just before it (model, input and a
    warm-up pass already done: the activations' footprint), ``process_peak_mib`` the peak RSS of the whole process
    (Python, torch, weights and activations), ``rss_before_mib``, and ``peak_reset``: whether the peak mark could be
    reset (if not, the peak is the process's lifetime peak and ``forward_peak_mib`` only an upper bound).
    """
    request = {"spec": dataclasses.asdict(spec), "input_size": list(input_size),
               "threads": threads or torch.get_num_threads()}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", "from medtriad.benchmark import _memory_child; _memory_child()"],
                          input=json.dumps(request), capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement child failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(spec: ModelSpec, input_size: Sequence[int], devices: Sequence[str] = ("cpu",), warmup: int = 2,
                  repeats: int = 5, memory: bool = True) -> dict[str, Any]:
    """:func:`measure_variants` of one model."""
    return measure_variants({"model": spec}, input_size, devices, warmup, repeats, memory)["model"]


def measure_variants(specs: dict[str, ModelSpec], input_size: Sequence[int], devices: Sequence[str] = ("cpu",),
                     warmup: int = 2, repeats: int = 5, memory: bool = True,
                     progress: bool = False) -> dict[str, dict[str, Any]]:
    """Per model: heads, parameters, FLOPs and MACs of one forward pass, latency per device (interleaved over the
    models, see :func:`measure_latencies`) and peak memory per device (MiB; CPU in a child process, see
    :func:`measure_cpu_memory`), all on one random input of shape (1, C, *input_size). The weights are freshly
    initialised (a trained detection head sends more boxes to NMS) and CPU models keep PyTorch's default memory
    layout (``predict`` runs them channels-last): the architectures' costs, not a trained model's under ``predict``."""
    torch.manual_seed(0)
    models = {name: MultiTaskModel(spec).eval() for name, spec in specs.items()}
    for model in models.values():
        check_input_size(model, input_size)
    x = torch.randn(1, next(iter(specs.values())).in_channels, *input_size)
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        flops = count_flops(model, x)
        results[name] = {"heads": list(model.spec.heads), "params": count_parameters(model), "flops": flops,
                         "macs": flops // 2, "latency_ms": {}, "memory_mib": {}}
    for device_name in devices:
        device = torch.device(device_name)
        if progress:
            print(f"benchmark: timing {', '.join(models)} on {device}", file=sys.stderr, flush=True)
        for model in models.values():
            model.to(device)
        xd = x.to(device)
        for name, stats in measure_latencies(models, xd, warmup, repeats).items():
            results[name]["latency_ms"][device.type] = stats
        if memory and device.type == "cuda":
            for name, model in models.items():
                results[name]["memory_mib"]["cuda"] = measure_cuda_memory(model, xd)
        for model in models.values():
            model.to("cpu")
        del xd
    if memory and any(torch.device(d).type == "cpu" for d in devices):
        for name, spec in specs.items():
            if progress:
                print(f"benchmark: CPU memory of {name} (child process)", file=sys.stderr, flush=True)
            cpu = measure_cpu_memory(spec, input_size)
            results[name]["memory_mib"]["cpu"] = cpu["forward_peak_mib"]
            results[name]["cpu_memory_detail"] = cpu
    return results


# ---------------------------------------------------------------------------------------------------- training
def variant_config(config: Config, heads: Sequence[str], tasks: Sequence[str] = ()) -> Config:
    """``config`` for a model with only ``heads``: fixed loss weights of the other heads' tasks are dropped
    (``class:TASK`` weights go with classification), and a single-task model trains its head as the recipe's
    single-task variants do: its weights scaled so that the largest is 1 (``detection 0.1`` -> 1; several
    ``class:TASK`` weights keep their ratios, those of ``tasks``, the dataset's classification tasks, that the recipe
    does not name counting as the 1 they weigh) and no ``encoder_gradient`` (the one head trains the encoder)."""
    cfg = copy.deepcopy(config)
    cfg.model.heads = tuple(heads)
    weights = {k: v for k, v in (cfg.training.loss_weights or {}).items() if loss_head(k) in heads}
    if len(heads) == 1:
        if cfg.training.balancing == "fixed" and cfg.training.loss_weights:
            names = [f"class:{t}" for t in tasks] if heads[0] == "classification" else [heads[0]]
            weights = {**{n: 1.0 for n in names}, **weights}  # the weight an unnamed task has
        top = max(weights.values(), default=0)
        weights = {k: v / top for k, v in weights.items()} if top > 0 else weights
        cfg.training.encoder_gradient = {}
    else:
        cfg.training.encoder_gradient = {h: v for h, v in cfg.training.encoder_gradient.items() if h in heads}
    cfg.training.loss_weights = weights
    return cfg


def check_trainable(dataset: str | Path, config: Config, input_size: Sequence[int], fold: int = 0) -> None:
    """Before any training: the dataset has what every head needs (a class table for classification, boxes or a
    detection region for detection) and the measured input suits the encoder, so that nothing fails after hours of
    training."""
    spec, cases = load_dataset(dataset)
    by_id, val_ids, _, _ = fold_split(Path(dataset), cases, spec, fold, config.training.num_folds,
                                      config.training.seed)
    # as the trainer decides: boxes among the fold's training cases (validation cases' boxes train nothing)
    lacking = spec.untrainable_heads(any(by_id[i].boxes for i in set(by_id) - val_ids))
    if lacking:
        raise ValueError(f"{dataset}: the benchmark trains all three heads; the dataset cannot train "
                         f"{'; '.join(f'{h} ({why})' for h, why in lacking.items())}")
    check_input_size(MultiTaskModel(brats_model_spec(config)), input_size, "--input-size")


def train_variants(dataset: str | Path, config: Config, out: str | Path, minutes: float, fold: int = 0,
                   device: str | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train the multi-task model and each single-task model for ``minutes`` on the same fold.

    Returns per variant: the run folder, epochs done, training wall time, and the final epoch's validation metrics
    (:func:`medtriad.evaluation.evaluate.headline_metrics`; every run validates after its last epoch, so all four
    are scored at the budget's end).
    """
    from medtriad.training.trainer import refuse_trained_run, train

    for name in VARIANTS:  # before any training: not after an hour spent on the variants before it
        refuse_trained_run(Path(out) / "runs" / name)
    results: dict[str, dict[str, Any]] = {}
    tasks = list(load_dataset(dataset)[0].tasks)
    for i, (name, heads) in enumerate(VARIANTS.items()):
        if progress:
            print(f"benchmark: training {name} ({i + 1}/{len(VARIANTS)}, {minutes:g} min)", file=sys.stderr,
                  flush=True)
        cfg = variant_config(config, heads, tasks)
        cfg.training.max_minutes = minutes
        run = Path(out) / "runs" / name
        start = time.monotonic()
        result = train(dataset, cfg, run, fold=fold, device=device, progress=progress)
        spec = ModelSpec.load(run / "model.json")
        if sorted(spec.heads) != sorted(heads):
            raise ValueError(f"{name}: the dataset does not support heads {heads} (the trainer built {spec.heads})")
        results[name] = {"run": str(run), "epochs": result.epochs_done, "train_s": time.monotonic() - start,
                         "best_score": result.best_score, "metrics": headline_metrics(result.summary)}
    return results


# ---------------------------------------------------------------------------------------------------- the report
def _ratios(models: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(single-task sums, multi / sum) for params, FLOPs, MACs, latency and memory per device. Memory is the
    activations' peak of one forward pass: three models run one after another need the largest of theirs, not the
    sum (their weights add up, in the params row), so its "sum" is the largest of the three."""
    singles = [models[n] for n in SINGLE]
    total: dict[str, Any] = {k: sum(m[k] for m in singles) for k in ("params", "flops", "macs")}
    total["latency_ms"] = {d: {"median": sum(m["latency_ms"][d]["median"] for m in singles)}
                           for d in models["multi"]["latency_ms"]}
    total["memory_mib"] = {d: max(m["memory_mib"][d] for m in singles) for d in models["multi"]["memory_mib"]}
    multi = models["multi"]
    ratio: dict[str, Any] = {k: multi[k] / total[k] if total[k] else math.nan for k in ("params", "flops", "macs")}
    ratio["latency"] = {d: multi["latency_ms"][d]["median"] / total["latency_ms"][d]["median"]
                        for d in total["latency_ms"]}
    ratio["memory"] = {d: multi["memory_mib"][d] / total["memory_mib"][d] if total["memory_mib"][d] else math.nan
                       for d in total["memory_mib"]}
    return total, ratio


def run_benchmark(config: Config, out: str | Path, input_size: Sequence[int] | None = None,
                  encoder: str | None = None, config_name: str = "", dataset: str | Path | None = None,
                  minutes: float = 0.0, fold: int = 0, device: str | None = None, warmup: int = 2,
                  repeats: int = 5, memory: bool = True, progress: bool = True) -> dict[str, Any]:
    """Measure (and with ``dataset``, train) the four models; write ``benchmark.json`` and ``benchmark.md`` to
    ``out`` and return the JSON content.

    Args:
        input_size: the measured input (default: the config's patch size); multiples of the encoder's divisor.
        encoder: overrides ``config.model.encoder`` (see :func:`config_with_encoder`).
        dataset / minutes / fold: train each model for ``minutes`` on this dataset's fold and add its validation
            metrics; the measured specs are then the trained runs' ``model.json`` (the dataset's regions and tasks).
        device: where training runs and the second latency device (default: CUDA when present); CPU is always timed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config_with_encoder(config, encoder)
    input_size = tuple(int(s) for s in (input_size or config.data.patch_size))
    training: dict[str, dict[str, Any]] = {}
    if dataset is not None:
        if minutes <= 0:
            raise ValueError(f"--train needs a positive --minutes budget, got {minutes}")
        check_trainable(dataset, config, input_size, fold)
        training = train_variants(dataset, config, out, minutes, fold, device, progress)
        specs = {name: ModelSpec.load(Path(t["run"]) / "model.json") for name, t in training.items()}
    else:
        specs = variant_specs(brats_model_spec(config))
    devices = ["cpu"]
    accel = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(accel).type == "cuda":
        devices.append(accel)
    models = measure_variants(specs, input_size, devices, warmup, repeats, memory, progress)
    for name, result in training.items():
        models[name]["training"] = result
    total, ratio = _ratios(models)
    report = {
        "config": config_name, "encoder": config.model.encoder, "encoder_kwargs": specs["multi"].encoder_kwargs,
        "input_size": list(input_size), "in_channels": specs["multi"].in_channels,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "load_average_1min": os.getloadavg()[0],
                        "processor": platform.processor() or platform.machine(),
                        "cuda": torch.cuda.get_device_name(torch.device(devices[1])) if len(devices) > 1 else None},
        "latency_runs": {"warmup": warmup, "repeats": repeats},
        "training": {"dataset": str(dataset), "minutes": minutes, "fold": fold} if dataset is not None else None,
        "models": models, "single_task_sum": total, "ratio_multi_over_sum": ratio,
    }
    write_json(out / "benchmark.json", report)
    atomic_write_text(out / "benchmark.md", format_markdown(report))
    return report


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per model, then the single-task sum and the multi / sum ratio."""
    models, total, ratio = report["models"], report["single_task_sum"], report["ratio_multi_over_sum"]
    devices = list(models["multi"]["latency_ms"])
    memories = list(models["multi"]["memory_mib"])
    metric_names: list[str] = []
    for m in models.values():
        metric_names += [k for k in m.get("training", {}).get("metrics", {}) if k not in metric_names]
    header = ["model", "heads", "params (M)", "GFLOPs", "GMACs"]
    header += [f"{d.upper()} latency (ms)" for d in devices]
    header += [f"{d.upper()} peak mem (MiB)" for d in memories]
    if metric_names:
        header += ["epochs"] + metric_names
    rows = []
    for name, m in models.items():
        row = [name, "+".join(_SHORT[h] for h in m["heads"]), _num(m["params"] / 1e6, 3), _num(m["flops"] / 1e9),
               _num(m["macs"] / 1e9)]
        row += [_num(m["latency_ms"][d]["median"], 1) for d in devices]
        row += [_num(m["memory_mib"][d], 0) for d in memories]
        if metric_names:
            t = m.get("training", {})
            row += [str(t.get("epochs", "–"))] + [_num(t.get("metrics", {}).get(k), 3) for k in metric_names]
        rows.append(row)
    row = ["single-task sum", "seg+det+cls", _num(total["params"] / 1e6, 3), _num(total["flops"] / 1e9),
           _num(total["macs"] / 1e9)]
    row += [_num(total["latency_ms"][d]["median"], 1) for d in devices]
    row += [_num(total["memory_mib"][d], 0) for d in memories]
    rows.append(row + ([""] * (1 + len(metric_names)) if metric_names else []))
    row = ["multi / sum", "", _num(ratio["params"], 3), _num(ratio["flops"], 3), _num(ratio["macs"], 3)]
    row += [_num(ratio["latency"][d], 3) for d in devices]
    row += [_num(ratio["memory"][d], 3) for d in memories]
    rows.append(row + ([""] * (1 + len(metric_names)) if metric_names else []))
    size = "x".join(map(str, report["input_size"]))
    env = report["environment"]
    runs = report["latency_runs"]
    machine = f"torch {env['torch']}, {env['cpu_threads']} CPU thread(s)" + (f", {env['cuda']}" if env["cuda"] else "")
    lines = [f"# Multi-task vs single-task: {report['config'] or 'config'} ({report['encoder']} encoder)", "",
             f"Input 1 x {report['in_channels']} x {size}; {machine}. Latency: median of {runs['repeats']} "
             f"inference-mode runs (interleaved over the models) after {runs['warmup']} warm-up runs, detection "
             "post-processing included. FLOPs: torch.utils.flop_counter (convolutions and matmuls, 2 per MAC). "
             "CPU peak mem: peak-RSS growth of one forward pass in a fresh process (activations); for the "
             "single-task models run one after another it is the largest of the three, not a sum.", ""]
    if report.get("training"):
        t = report["training"]
        lines += [f"Training: each model {t['minutes']} min on {t['dataset']} (fold {t['fold']}); metrics from the "
                  "validation after the last epoch.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- across folds
#: how far below a single-task model the multi-task model may score and still count as "comparable" (issue 5)
TOLERANCE = {"dice_": 0.02, "AP@": 0.02, "AUC_": 0.03}


def _tolerance(metric: str) -> float:
    return next((tol for prefix, tol in TOLERANCE.items() if metric.startswith(prefix)), math.nan)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"values": list(values), "mean": math.nan, "min": math.nan, "max": math.nan}
    return {"values": list(values), "mean": statistics.fmean(finite), "min": min(finite), "max": max(finite)}


def compare_folds(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool trained benchmark reports (one per fold or seed) into mean and spread per model and metric, and the
    multi-task minus single-task difference per metric, fold by fold.

    A metric counts as "within tolerance" when the mean difference is no lower than minus its tolerance
    (:data:`TOLERANCE`: 0.02 Dice, 0.02 AP, 0.03 AUC); the per-fold range shows how much that mean can be trusted.
    """
    if not reports:
        raise ValueError("compare_folds needs at least one trained benchmark report")
    for i, report in enumerate(reports):
        if not report.get("training"):
            raise ValueError(f"report {i} has no training results (run `medtriad benchmark --train`)")
    folds = [r["training"]["fold"] for r in reports]
    models: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        per_fold = [r["models"][name]["training"]["metrics"] for r in reports]
        models[name] = {
            "epochs": [r["models"][name]["training"]["epochs"] for r in reports],
            "metrics": {k: _spread([float(m.get(k, math.nan)) for m in per_fold]) for k in per_fold[0]},
        }
    deltas: dict[str, dict[str, Any]] = {}
    for name in SINGLE:
        for metric, single in models[name]["metrics"].items():
            multi = models["multi"]["metrics"].get(metric)
            if multi is None:
                continue
            d = _spread([a - b for a, b in zip(multi["values"], single["values"])])
            tol = _tolerance(metric)
            d["tolerance"] = tol
            d["within"] = bool(math.isfinite(d["mean"]) and math.isfinite(tol) and d["mean"] >= -tol)
            deltas[f"{name}:{metric}"] = d
    return {"folds": folds, "minutes": reports[0]["training"]["minutes"], "dataset": reports[0]["training"]["dataset"],
            "config": reports[0].get("config", ""), "models": models, "multi_minus_single": deltas}


def format_folds_markdown(pooled: dict[str, Any]) -> str:
    """:func:`compare_folds` as Markdown: one table of mean [min, max] per model, one of multi minus single."""
    folds = ", ".join(map(str, pooled["folds"]))
    metrics: list[str] = []
    for m in pooled["models"].values():
        metrics += [k for k in m["metrics"] if k not in metrics]

    def cell(s: dict[str, Any] | None, digits: int = 3) -> str:
        if s is None or not math.isfinite(s["mean"]):
            return "–"
        if len(s["values"]) == 1:
            return _num(s["mean"], digits)
        return f"{_num(s['mean'], digits)} [{_num(s['min'], digits)}, {_num(s['max'], digits)}]"

    lines = [f"# Multi-task vs single-task quality: {pooled['config'] or 'config'}, folds {folds}", "",
             f"Each model trained {pooled['minutes']} min per fold on {pooled['dataset']}; validation after the last "
             "epoch. Cells: mean over folds [min, max].", "",
             "| model | epochs | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for name, m in pooled["models"].items():
        lines.append(f"| {name} | {'/'.join(map(str, m['epochs']))} | "
                     + " | ".join(cell(m["metrics"].get(k)) for k in metrics) + " |")
    lines += ["", "| multi minus | metric | mean [min, max] | per fold | tolerance | within |", "|---|---|---:|---|---:|---|"]
    for key, d in pooled["multi_minus_single"].items():
        name, metric = key.split(":", 1)
        per_fold = ", ".join(_num(v, 3) for v in d["values"])
        lines.append(f"| {name} | {metric} | {cell(d)} | {per_fold} | {_num(d['tolerance'], 2)} | "
                     f"{'yes' if d['within'] else 'no'} |")
    return "\n".join(lines) + "\n"
