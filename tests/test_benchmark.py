"""``medtriad benchmark``: counting against hand counts, the four variants, the report's rows, a short training run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from medtriad.benchmark import (
    VARIANTS,
    _ratios,
    brats_model_spec,
    check_trainable,
    compare_folds,
    config_with_encoder,
    count_flops,
    count_parameters,
    format_folds_markdown,
    format_markdown,
    measure_cpu_memory,
    measure_model,
    run_benchmark,
    variant_config,
    variant_specs,
)
from medtriad.cli import main
from medtriad.config import Config
from medtriad.data.layout import load_dataset, read_boxes_json, write_boxes_json
from medtriad.data.splits import fold_split
from medtriad.models.encoders import create_encoder
from medtriad.models.heads.segmentation import SegmentationHead
from medtriad.models.multitask import MultiTaskModel

ROWS = ("| multi |", "| seg |", "| det |", "| cls |", "| single-task sum |", "| multi / sum |")


def test_flops_and_params_match_hand_counts():
    conv = nn.Conv3d(2, 4, kernel_size=3, padding=1)
    # every one of the 4 x 8^3 outputs takes 2 x 27 multiply-accumulates; 2 FLOPs each (biases are not counted)
    assert count_flops(conv, torch.randn(1, 2, 8, 8, 8)) == 2 * (4 * 8**3) * (2 * 27)
    assert count_parameters(conv) == 4 * 2 * 27 + 4
    linear = nn.Linear(10, 5)
    assert count_flops(linear, torch.randn(3, 10)) == 2 * 3 * 10 * 5
    assert count_parameters(linear) == 10 * 5 + 5
    # several layers, down and up as an encoder-decoder goes: a 3^3 conv at 8^3, a stride-2 conv to 4^3, a norm (not
    # counted), a stride-2 transposed conv back to 8^3 (each of its 3 x 4^3 inputs spreads over 2^3 outputs)
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 3, 2, stride=2), nn.InstanceNorm3d(3),
                        nn.ConvTranspose3d(3, 1, 2, stride=2))
    macs = (2 * 8**3) * (1 * 27) + (3 * 4**3) * (2 * 8) + (3 * 4**3) * (1 * 8)
    assert count_flops(net, torch.randn(1, 1, 8, 8, 8)) == 2 * macs
    assert count_flops(net, torch.randn(2, 1, 8, 8, 8)) == 2 * 2 * macs  # a batch of two: twice the work
    assert count_parameters(net) == (2 * 27 + 2) + (3 * 2 * 8 + 3) + (1 * 3 * 8 + 1)
    encoder = create_encoder("resenc", 2, channels=(4, 8, 16), blocks=(1, 1, 1))
    assert count_parameters(encoder) == sum(p.numel() for p in encoder.parameters())
    assert count_parameters(encoder) == sum(v.numel() for k, v in encoder.state_dict().items()
                                            if "running" not in k and "num_batches" not in k)


def test_variants_share_everything_but_the_heads():
    specs = variant_specs(brats_model_spec(Config.load("tiny")))
    assert {name: s.heads for name, s in specs.items()} == VARIANTS
    multi = specs["multi"]
    assert multi.regions == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]} and list(multi.tasks) == ["grade"]
    assert len(multi.detection["anchor_shapes"]) == 3 and multi.in_channels == 4
    for spec in specs.values():
        assert (spec.encoder, spec.encoder_kwargs, spec.detection) == (multi.encoder, multi.encoder_kwargs,
                                                                       multi.detection)
    # the encoder runs once in the multi-task model: its FLOPs are the three single-task models' minus two encoders
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32, 32)
    models = {name: MultiTaskModel(s).eval() for name, s in specs.items()}
    flops = {name: count_flops(m, x) for name, m in models.items()}
    encoder = count_flops(models["multi"].encoder, x)
    assert flops["multi"] == flops["seg"] + flops["det"] + flops["cls"] - 2 * encoder
    params = {name: count_parameters(m) for name, m in models.items()}
    assert params["multi"] == params["seg"] + params["det"] + params["cls"] - 2 * count_parameters(
        models["multi"].encoder)


def test_report_holds_every_row(tmp_path):
    report = run_benchmark(Config.load("tiny"), tmp_path, config_name="tiny", warmup=0, repeats=1, memory=False,
                           progress=False)
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["input_size"] == [32, 32, 32] and set(saved["models"]) == set(VARIANTS)
    for m in saved["models"].values():
        assert m["params"] > 0 and m["flops"] == 2 * m["macs"] and m["latency_ms"]["cpu"]["median"] > 0
    ratio, total = saved["ratio_multi_over_sum"], saved["single_task_sum"]
    assert total["params"] == sum(saved["models"][n]["params"] for n in ("seg", "det", "cls"))
    assert 0 < ratio["params"] < 1 and 0 < ratio["flops"] < 1 and ratio["latency"]["cpu"] > 0
    table = (tmp_path / "benchmark.md").read_text()
    assert table == format_markdown(report)
    assert all(row in table for row in ROWS) and "GFLOPs" in table and "CPU latency" in table


def test_swin_encoder_override_and_input_size_check():
    config = Config.load("tiny", {"model.encoder_kwargs": {"embed_dim": 12}})
    config.model.encoder = "swin"  # keep the small embed_dim: --encoder would drop the config's kwargs
    spec = brats_model_spec(config)
    result = measure_model(spec, (64, 32, 32), warmup=0, repeats=1, memory=False)
    assert result["params"] > 0 and result["flops"] > 0
    with pytest.raises(ValueError, match="multiples"):
        measure_model(spec, (64, 32, 40), warmup=0, repeats=1, memory=False)
    with pytest.raises(ValueError, match="deepest map"):
        measure_model(spec, (32, 32, 32), warmup=0, repeats=1, memory=False)
    assert brats_model_spec(Config.load("tiny"), encoder="swin").encoder_kwargs == {}


def test_another_encoder_drops_the_configs_encoder_and_decoder_settings():
    """--encoder: brats-cpu's four decoder widths do not fit swin's six levels, nor resenc's settings segresnet."""
    swin = config_with_encoder(Config.load("brats-cpu"), "swin")
    assert swin.model.encoder == "swin" and swin.model.encoder_kwargs == {} and swin.model.segmentation == {}
    assert Config.load("brats-cpu").model.segmentation  # the loaded recipe is not changed
    spec = brats_model_spec(config_with_encoder(Config.load("brats-segresnet"), "resenc"))
    assert spec.encoder == "resenc" and "decoder" not in spec.segmentation
    model = MultiTaskModel(spec)
    assert isinstance(model.heads["segmentation"], SegmentationHead)
    assert config_with_encoder(Config.load("brats-cpu"), "resenc") == Config.load("brats-cpu")


def test_cpu_memory_in_a_child_process():
    spec = variant_specs(brats_model_spec(Config.load("tiny")))["cls"]
    memory = measure_cpu_memory(spec, (64, 32, 32), threads=1)
    assert memory["peak_reset"] and memory["forward_peak_mib"] > 0
    assert memory["process_peak_mib"] > memory["rss_before_mib"]


def test_cli_with_short_training(synth_dataset, tmp_path, capsys):
    out = tmp_path / "bench"
    command = ["benchmark", "-c", "tiny", "-o", str(out), "--train", str(synth_dataset), "--minutes", "0.02",
               "--set", "training.epochs=1", "--warmup", "0", "--repeats", "1", "--no-memory", "--device", "cpu", "-q"]
    assert main(command) == 0
    report = json.loads((out / "benchmark.json").read_text())
    metrics = {name: m["training"]["metrics"] for name, m in report["models"].items()}
    assert set(metrics["multi"]) == {"dice_WT", "dice_TC", "dice_ET", "AP@0.10", "AUC_grade"}
    assert set(metrics["seg"]) == {"dice_WT", "dice_TC", "dice_ET"}
    assert set(metrics["det"]) == {"AP@0.10"} and set(metrics["cls"]) == {"AUC_grade"}
    for name in VARIANTS:
        assert (out / "runs" / name / "model.json").is_file()
    table = (out / "benchmark.md").read_text()
    assert all(row in table for row in ROWS) and "dice_WT" in table and "AUC_grade" in table
    pooled = compare_folds([report])  # a real report pools (one fold: the spread is the value itself)
    assert pooled["folds"] == [0] and set(pooled["multi_minus_single"]) == {
        "seg:dice_WT", "seg:dice_TC", "seg:dice_ET", "det:AP@0.10", "cls:AUC_grade"}
    assert main(["benchmark", "-c", "tiny", "-o", str(out), "--minutes", "1"]) == 2  # --minutes without --train
    capsys.readouterr()
    before = (out / "benchmark.json").read_bytes()
    assert main(command) != 0  # the same folder again: refused before any variant trains, the report kept
    assert "runs/multi already holds a trained run" in capsys.readouterr().err
    assert (out / "benchmark.json").read_bytes() == before


def _trained_report(fold: int, metrics: dict[str, dict[str, float]]) -> dict:
    return {"config": "x", "training": {"dataset": "d", "minutes": 5, "fold": fold},
            "models": {name: {"training": {"epochs": 3, "metrics": m}} for name, m in metrics.items()}}


def test_compare_folds_pools_means_spreads_and_differences():
    fold0 = {"multi": {"dice_WT": 0.80, "AP@0.10": 0.50, "AUC_grade": 1.0}, "seg": {"dice_WT": 0.85},
             "det": {"AP@0.10": 0.40}, "cls": {"AUC_grade": 0.0}}
    fold1 = {"multi": {"dice_WT": 0.90, "AP@0.10": 0.70, "AUC_grade": float("nan")}, "seg": {"dice_WT": 0.86},
             "det": {"AP@0.10": 0.80}, "cls": {"AUC_grade": 0.5}}
    pooled = compare_folds([_trained_report(0, fold0), _trained_report(1, fold1)])
    wt = pooled["models"]["multi"]["metrics"]["dice_WT"]
    assert wt["mean"] == pytest.approx(0.85) and (wt["min"], wt["max"]) == (0.80, 0.90)
    d = pooled["multi_minus_single"]
    assert d["seg:dice_WT"]["values"] == pytest.approx([-0.05, 0.04])
    assert d["seg:dice_WT"]["mean"] == pytest.approx(-0.005) and d["seg:dice_WT"]["within"]  # -0.005 >= -0.02
    assert d["det:AP@0.10"]["mean"] == pytest.approx(0.0) and d["det:AP@0.10"]["within"]
    # a fold where AUC is undefined (NaN) is left out of the mean, not counted as zero
    assert d["cls:AUC_grade"]["mean"] == pytest.approx(1.0) and d["cls:AUC_grade"]["tolerance"] == 0.03
    fold1["seg"]["dice_WT"] = 0.95  # now multi trails seg by 0.05 on average: outside 0.02
    pooled = compare_folds([_trained_report(0, fold0), _trained_report(1, fold1)])
    assert not pooled["multi_minus_single"]["seg:dice_WT"]["within"]
    table = format_folds_markdown(pooled)
    assert "| multi | 3/3 |" in table and "| seg | dice_WT | -0.050 [-0.050, -0.050] |" in table
    with pytest.raises(ValueError, match="no training results"):
        compare_folds([{"training": None, "models": {}}])


def test_single_task_configs_train_their_one_head_at_full_weight():
    """Each single-task variant keeps only its own tasks' weights, scaled so the largest is 1 (as the recipe's
    single-task runs in docs/benchmarks.md were trained: detection 0.1 -> 1), and no stop-gradient (its one head
    trains the encoder); the multi-task model keeps the recipe's weights and stop-gradients."""
    config = Config.load("brats-cpu", {"training.encoder_gradient": {"detection": 0.0, "classification": 0.0}})
    variants = {name: variant_config(config, heads).training for name, heads in VARIANTS.items()}
    assert variants["multi"].loss_weights == config.training.loss_weights
    assert variants["multi"].encoder_gradient == {"detection": 0.0, "classification": 0.0}
    assert variants["seg"].loss_weights == {"segmentation": 1.0} and variants["det"].loss_weights == {"detection": 1.0}
    assert variants["cls"].loss_weights == {"class:grade": 1.0}
    assert all(variants[n].encoder_gradient == {} for n in ("seg", "det", "cls"))
    two = Config.load("tiny", {"training.loss_weights": {"class:a": 0.02, "class:b": 0.01, "detection": 0.1}})
    assert variant_config(two, ["classification"]).training.loss_weights == {"class:a": 1.0, "class:b": 0.5}
    # a task of the dataset the recipe does not name weighs 1 in the multi-task model: its ratio to the others stays
    assert variant_config(two, ["classification"], ["a", "b", "c"]).training.loss_weights == {
        "class:a": 0.02, "class:b": 0.01, "class:c": 1.0}
    pair = variant_config(config, ["segmentation", "detection"]).training
    assert pair.encoder_gradient == {"detection": 0.0} and pair.loss_weights == {"segmentation": 1.0, "detection": 0.1}
    assert variant_config(config, ["detection"]).model.heads == ("detection",)
    assert config.model.heads == ("segmentation", "detection", "classification")  # the original is untouched


def test_training_is_refused_before_it_starts_when_a_head_or_the_input_size_cannot_work(synth_dataset, tmp_path):
    data = tmp_path / "no-classes"
    shutil.copytree(synth_dataset, data)
    meta = json.loads((data / "dataset.json").read_text())
    del meta["medtriad"]["classification"]
    (data / "dataset.json").write_text(json.dumps(meta))
    (data / "classes.csv").unlink()
    with pytest.raises(ValueError, match="cannot train classification"):
        run_benchmark(Config.load("tiny"), tmp_path / "a", dataset=data, minutes=1, memory=False, progress=False)
    with pytest.raises(ValueError, match="--input-size"):
        run_benchmark(Config.load("tiny"), tmp_path / "b", input_size=(30, 32, 32), dataset=synth_dataset, minutes=1,
                      memory=False, progress=False)
    assert not (tmp_path / "a" / "runs").exists() and not (tmp_path / "b" / "runs").exists()


def test_detection_is_trainable_only_with_boxes_among_the_folds_training_cases(synth_dataset, tmp_path):
    """As the trainer decides: without a detection region, boxes of the validation cases alone train nothing, so the
    benchmark refuses before any training (it had trained the multi-task model for the whole budget first)."""
    data = tmp_path / "val-boxes"
    shutil.copytree(synth_dataset, data)
    meta = json.loads((data / "dataset.json").read_text())
    del meta["medtriad"]["detection"]
    (data / "dataset.json").write_text(json.dumps(meta))
    config = Config.load("tiny")
    spec, cases = load_dataset(data)
    by_id, val_ids, _, _ = fold_split(data, cases, spec, 1, config.training.num_folds, config.training.seed)
    boxes = read_boxes_json(data / "boxes.json")
    assert val_ids and set(by_id) - val_ids and set(boxes) == set(by_id)
    write_boxes_json(data / "boxes.json", {i: b for i, b in boxes.items() if i in val_ids})
    with pytest.raises(ValueError, match=r"cannot train detection \(no boxes"):
        check_trainable(data, config, config.data.patch_size, fold=1)
    write_boxes_json(data / "boxes.json", {i: b for i, b in boxes.items() if i not in val_ids})
    check_trainable(data, config, config.data.patch_size, fold=1)  # training cases with boxes: trainable
    with pytest.raises(ValueError, match="fold must be in"):  # a fold the split does not have, before training
        check_trainable(data, config, config.data.patch_size, fold=99)


def test_single_task_memory_is_the_largest_activation_peak_not_a_sum():
    def model(params, memory):
        return {"params": params, "flops": 2 * params, "macs": params, "latency_ms": {"cpu": {"median": 1.0}},
                "memory_mib": {"cpu": memory}}

    total, ratio = _ratios({"multi": model(12, 100), "seg": model(10, 100), "det": model(8, 60), "cls": model(6, 40)})
    assert total["params"] == 24 and ratio["params"] == pytest.approx(0.5)
    assert total["memory_mib"] == {"cpu": 100} and ratio["memory"] == {"cpu": pytest.approx(1.0)}
