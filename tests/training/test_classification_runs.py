"""Classification through `medtriad train` / `evaluate` on real MedMNIST cases: official splits, the 3D CNN path and
the AnyMC3D slice-plugin path (encoder slice2d), plugins saved alone and served together on one backbone."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medtriad.cli import main
from medtriad.config import Config
from medtriad.data.layout import load_dataset, read_splits
from medtriad.data.medmnist import import_medmnist
from medtriad.data.transforms import normalize
from medtriad.evaluation.run import evaluate_run
from medtriad.inference.predictor import Predictor
from medtriad.models.anymc3d import read_plugin_metadata
from medtriad.training.trainer import train

MEDMNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist3d"

TINY_VIT = {"hidden_size": 24, "num_layers": 2, "num_heads": 2, "mlp_dim": 48, "patch_size": 7, "image_size": 28,
            "layerscale": True, "model_type": "dinov2"}


def _subset(name: str, out: Path, task: str, sizes=(("train", 24), ("val", 10), ("test", 8))) -> Path:
    """The first cases of each official split of a real MedMNIST file, both classes in every split."""
    npz = MEDMNIST / f"{name}.npz"
    if not npz.is_file():
        pytest.skip(f"real MedMNIST data not found at {npz}")
    arrays = {}
    with np.load(npz) as raw:
        for split, n in sizes:
            labels = raw[f"{split}_labels"].reshape(-1)
            pick = np.concatenate([np.flatnonzero(labels == 0)[: n // 2], np.flatnonzero(labels == 1)[: n - n // 2]])
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = raw[f"{split}_images"][pick], raw[f"{split}_labels"][pick]
    small = out.parent / f"{name}_small.npz"
    np.savez(small, **arrays)
    return import_medmnist(small, out, task=task)


@pytest.fixture(scope="module")
def adrenal(tmp_path_factory):
    return _subset("adrenalmnist3d", tmp_path_factory.mktemp("mm") / "adrenal", task="adrenal")


def _cnn_config(**training):
    return Config.from_dict({
        "data": {"spacing": [1, 1, 1], "patch_size": [32, 32, 32], "normalization": "all"},
        "model": {"encoder": "resenc", "encoder_kwargs": {"channels": [4, 8, 8, 16, 16]}, "heads": ["classification"],
                  "classification_hidden": 8},
        "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 4, "warmup_iterations": 1, **training}})


def _plugin_config(**plugin):
    return Config.from_dict({
        "data": {"spacing": [1, 1, 1], "patch_size": [28, 28, 28], "normalization": "all"},
        "model": {"encoder": "slice2d", "heads": ["classification"],
                  "encoder_kwargs": {"vit": TINY_VIT, "slice_size": 28, "max_slices": 8},
                  "plugin": {"rank": 2, "alpha": 4, "query_dim": 8, **plugin}},
        "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "warmup_iterations": 1}})


def test_read_splits_validates(tmp_path):
    assert read_splits(tmp_path) is None
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": ["b"]}))
    with pytest.raises(ValueError, match="'b' is in both"):
        read_splits(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    with pytest.raises(ValueError, match="'val'"):
        read_splits(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["c"]}))
    with pytest.raises(ValueError, match="no images"):
        read_splits(tmp_path, ["a", "b"])
    assert read_splits(tmp_path, ["a", "c"]) == {"train": ["a"], "val": ["c"]}


def test_normalization_modes_keep_shape_masks():
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, 2:5, 2:5, 2:5] = 255.0
    assert normalize(mask, "nonzero").abs().max() == 0  # a foreground z-score erases a constant-valued shape
    z = normalize(mask, "all")
    assert z[0, 3, 3, 3] > 1 and z[0, 0, 0, 0] < 0 and abs(float(z.mean())) < 1e-5
    assert torch.equal(normalize(mask, "none"), mask)
    with pytest.raises(ValueError, match="normalization"):
        normalize(mask, "minmax")


def test_cnn_classifier_trains_on_official_split_and_scores_test_once(adrenal, tmp_path):
    run = tmp_path / "cnn"
    train(adrenal, _cnn_config(), run, progress=False)
    split = json.loads((run / "split.json").read_text())
    official = json.loads((adrenal / "splits.json").read_text())
    assert split["source"] == "splits.json"
    assert split["train"] == official["train"] and split["val"] == official["val"]
    assert not set(official["test"]) & set(split["train"] + split["val"])
    assert json.loads((run / "model.json").read_text())["normalization"] == "all"
    assert main(["evaluate", str(run), str(adrenal), "--split", "test", "-q"]) == 0
    summary = json.loads((run / "evaluation_test" / "summary.json").read_text())
    assert summary["num_cases"] == len(official["test"]) == 8
    assert 0.0 <= summary["classification"]["adrenal"]["auc"] <= 1.0
    rows = (run / "evaluation_test" / "per_case.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == official["test"]
    assert main(["evaluate", str(run), str(adrenal), "--split", "holdout", "-q"]) == 2
    with pytest.raises(ValueError, match="--fold 1 does not apply"):
        train(adrenal, _cnn_config(), tmp_path / "fold1", fold=1, progress=False)


def test_runs_of_two_seeds_evaluate_and_predict_as_one_ensemble(adrenal, tmp_path, capsys):
    runs = [tmp_path / f"seed{seed}" for seed in (0, 1)]
    for seed, run in zip((0, 1), runs):
        train(adrenal, _cnn_config(seed=seed), run, progress=False)
    alone = []
    for run in runs:
        assert main(["evaluate", str(run), str(adrenal), "--split", "test", "-q"]) == 0
        rows = (run / "evaluation_test" / "per_case.csv").read_text().splitlines()
        alone.append({r.split(",")[0]: float(r.split(",")[2]) for r in rows[1:]})  # case -> P(adrenal_mass)
    assert alone[0] != alone[1]  # two seeds, two models
    out = tmp_path / "ensemble_test"
    assert main(["evaluate", *map(str, runs), str(adrenal), "--split", "test", "-o", str(out), "-q"]) == 0
    rows = (out / "per_case.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["case", "p_adrenal_normal", "p_adrenal_adrenal_mass"]
    for row in rows[1:]:
        case, p = row.split(",")[0], float(row.split(",")[2])
        assert p == pytest.approx((alone[0][case] + alone[1][case]) / 2, abs=2e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 8 and 0.0 <= summary["classification"]["adrenal"]["auc"] <= 1.0
    # several runs need a named output folder: nothing is written into a member's run folder
    assert main(["evaluate", *map(str, runs), str(adrenal), "--split", "val", "-q"]) == 2
    assert not (runs[0] / "evaluation_val").exists()
    capsys.readouterr()
    assert main(["evaluate", *map(str, runs), "-q"]) == 2  # the dataset forgotten: the last run is not read as one
    assert "is a run folder" in capsys.readouterr().err
    # predict -m with both runs writes the ensemble's probabilities
    case = next(c for c in load_dataset(adrenal)[1] if c.case_id == rows[1].split(",")[0])
    assert main(["predict", "-m", *map(str, runs), "-i", str(case.image_files[0]), "-o", str(tmp_path / "pred"),
                 "-q"]) == 0
    predicted = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert float(predicted[1].split(",")[-1]) == pytest.approx((alone[0][case.case_id] + alone[1][case.case_id]) / 2,
                                                               abs=1e-4)


def test_slice2d_config_errors_are_clear(adrenal, tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ranks'\] in model.plugin;"):
        train(adrenal, _plugin_config(ranks=4), tmp_path / "typo", progress=False)
    config = _plugin_config()
    config.model.plugin_tasks = {"adrenal": {"expert": 2}}
    with pytest.raises(ValueError, match=r"\['expert'\] in model.plugin_tasks.adrenal"):
        train(adrenal, config, tmp_path / "typo2", progress=False)
    config.model.heads = ("classification", "segmentation")
    with pytest.raises(ValueError, match="classification plugins only"):
        train(adrenal, config, tmp_path / "heads", progress=False)


def test_slice2d_plugins_train_evaluate_and_share_one_backbone(adrenal, tmp_path):
    first = tmp_path / "adrenal_run"
    train(adrenal, _plugin_config(), first, progress=False)
    # a random backbone is kept once in the run; checkpoints hold the plugin only
    assert (first / "backbone" / "model.safetensors").is_file()
    spec = json.loads((first / "model.json").read_text())
    assert spec["encoder"] == "slice2d" and spec["encoder_kwargs"]["weights"] == "backbone"
    from safetensors import safe_open
    with safe_open(str(first / "checkpoints" / "best" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("encoder.") for k in keys)
    plugin_file = first / "plugins" / "adrenal.safetensors"
    meta = read_plugin_metadata(plugin_file)
    assert meta["extra"]["task"]["classes"] == ["normal", "adrenal_mass"] and meta["extra"]["normalization"] == "all"
    assert plugin_file.stat().st_size < 2_000_000
    out, summary = evaluate_run(first, adrenal, split="test", progress=False)
    assert summary["num_cases"] == 8 and 0.0 <= summary["classification"]["adrenal"]["auc"] <= 1.0

    # a second task (another dataset) trained on the same backbone file, with MoLRE experts instead of LoRA
    vessel = _subset("vesselmnist3d", tmp_path / "vessel", task="vessel")
    second = tmp_path / "vessel_run"
    config = _plugin_config(adapter="molre", experts=2)
    config.model.encoder_kwargs["weights"] = str(first / "backbone")
    train(vessel, config, second, progress=False)
    assert not (second / "backbone").exists()
    assert read_plugin_metadata(second / "plugins" / "vessel.safetensors")["config"]["adapter"] == "molre"

    # both plugins loaded at once on one backbone reproduce each run's own predictions
    both = Predictor.from_plugins(first / "backbone", [plugin_file, second / "plugins" / "vessel.safetensors"],
                                  device="cpu")
    assert set(both.spec.tasks) == {"adrenal", "vessel"}
    for run, dataset, task in ((first, adrenal, "adrenal"), (second, vessel, "vessel")):
        _, cases = load_dataset(dataset)
        case = next(c for c in cases if c.case_id.startswith("test_"))
        alone = Predictor.from_pretrained(run, device="cpu").predict([case.image_files[0]], case_id=case.case_id)
        shared = both.predict([case.image_files[0]], case_id=case.case_id)
        assert set(shared.probabilities) == {"adrenal", "vessel"}
        np.testing.assert_allclose(list(shared.probabilities[task].values()),
                                   list(alone.probabilities[task].values()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same task"):
        Predictor.from_plugins(first / "backbone", [plugin_file, plugin_file])

    # heatmaps come from the same backbone pass as the logits and equal the model's own heatmap
    both.heatmaps = True
    image = torch.randn(1, 28, 28, 28)
    grid = both.predict_grid(image)
    for task in ("adrenal", "vessel"):
        torch.testing.assert_close(grid.heatmaps[task], both.model.heatmap(image[None], task)[0])


def test_resuming_a_slice2d_run_keeps_its_backbone(adrenal, tmp_path):
    """The checkpoints of a slice2d run hold its plugins only: --resume must read RUN/backbone back (not write a fresh
    random one over it, which would pair the trained plugins with another backbone)."""
    from safetensors.torch import load_file, save_file

    from medtriad.models.encoders.slice2d import load_vit
    from medtriad.training.trainer import Trainer

    run, config = tmp_path / "run", _plugin_config()
    config.training.epochs = 1
    train(adrenal, config, run, progress=False)
    stored = run / "backbone" / "model.safetensors"
    save_file({k: v + 0.5 for k, v in load_file(str(stored)).items()}, str(stored))  # no fresh init gives these
    before = stored.read_bytes()
    config = Config.load(run / "config.yaml")
    config.training.epochs = 2
    config.save(run / "config.yaml")
    trainer = Trainer(adrenal, config, run, progress=False)
    trainer.fit(resume=True)
    assert stored.read_bytes() == before
    kept = load_vit(run / "backbone").state_dict()
    for key, value in trainer.model.encoder.vit.state_dict().items():
        assert torch.equal(value, kept[key]), key
    assert json.loads((run / "history.json").read_text())[-1]["epoch"] == 1


def test_brats_grade_and_findings_plugins_from_one_config(brats2018, tmp_path):
    """Two tasks (binary grade, multi-label findings with MoLRE) trained as two plugins on one backbone from one
    config, with auxiliary pixel supervision; per-label AUC; heatmaps written in the input geometry."""
    dataset = tmp_path / "brats"
    shutil.copytree(brats2018[0], dataset)
    assert main(["findings", str(dataset), "-q"]) == 0
    config = Config.from_dict({
        "data": {"spacing": [4, 4, 4], "patch_size": [28, 28, 28]},
        "model": {"encoder": "slice2d", "heads": ["classification"],
                  "encoder_kwargs": {"vit": TINY_VIT, "slice_size": 28, "max_slices": 6, "channel_map": [0, 2, 3]},
                  "plugin": {"rank": 2, "alpha": 4, "query_dim": 8, "aux": True},
                  "plugin_tasks": {"findings": {"adapter": "molre", "experts": 2, "views": ["axial", "coronal"]}}},
        "training": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "warmup_iterations": 1}})
    run = tmp_path / "run"
    train(dataset, config, run, progress=False)
    plugins = json.loads((run / "model.json").read_text())["plugins"]
    assert set(plugins) == {"grade", "findings"}
    assert plugins["findings"]["adapter"] == "molre" and plugins["findings"]["views"] == ["axial", "coronal"]
    assert plugins["grade"]["adapter"] == "lora" and plugins["grade"]["aux_channels"] == 3  # WT, TC, ET
    losses = json.loads((run / "history.json").read_text())[0]["losses"]
    assert {"class:grade", "class:findings", "aux:grade", "aux:findings"} <= set(losses)
    assert all(np.isfinite(v) for v in losses.values())
    _, summary = evaluate_run(run, dataset, progress=False)
    findings = summary["classification"]["findings"]
    assert "auc" in findings and {f"auc_{n}" for n in ("necrosis", "enhancement")} <= set(findings)
    # the exported plugins leave the training-only auxiliary decoder out
    assert read_plugin_metadata(run / "plugins" / "grade.safetensors")["config"]["aux_channels"] == 0

    _, cases = load_dataset(dataset)
    case = cases[0]
    out = tmp_path / "pred"
    given = ["predict", "-m", str(run), "-i", *[str(case.image_files[i]) for i in range(4)], "-o", str(out), "-q"]
    assert main(given) == 0
    assert not list(out.glob("*heatmap*"))
    assert main([*given, "--heatmaps"]) == 0  # a rerun asking for heatmaps predicts the case again, no --overwrite
    import nibabel as nib
    image = nib.load(case.image_files[0])
    for task in ("grade", "findings"):
        heatmap = nib.load(out / f"{case.case_id}_heatmap_{task}.nii.gz")
        assert heatmap.shape == image.shape
        np.testing.assert_allclose(heatmap.affine, image.affine, atol=1e-5)
        data = heatmap.get_fdata()
        assert 0.5 < data.max() <= 1.0 + 1e-6 and data.min() >= -1e-6  # scaled to max 1 on the model grid


def test_cases_without_masks_batch_with_labelled_ones_and_leave_the_aux_loss_out(synth_dataset, tmp_path):
    """Label maps are optional per case for a classification model: a case without one stands in with empty
    regions of the labelled cases' width, so a batch mixing the two stacks (it failed with a shape error). The
    plugins' auxiliary pixel loss is taken over the cases with masks; a batch without any leaves it out (a loss of 0
    would pull an uncertainty-weighted aux weight up) while its decoder still gets a (zero) gradient."""
    from medtriad.training.trainer import Trainer

    data = tmp_path / "partial"
    shutil.copytree(synth_dataset, data)
    for label in sorted((data / "labelsTr").glob("*.nii.gz"))[::2]:
        label.unlink()
    config = Config.from_dict({
        "data": {"spacing": [5, 5, 5], "patch_size": [28, 28, 28]},
        "model": {"encoder": "slice2d", "heads": ["classification"],
                  "encoder_kwargs": {"vit": TINY_VIT, "slice_size": 28, "max_slices": 4, "channel_map": [0, 2, 3]},
                  "plugin": {"rank": 2, "alpha": 4, "query_dim": 8, "aux": True}},
        "training": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 4, "warmup_iterations": 1,
                     "balancing": "uncertainty"}})
    trainer = Trainer(data, config, tmp_path / "run", progress=False)
    trainer.prepare()
    batches = [trainer.draw_batch(step) for step in range(6)]
    mixed = [b for b in batches if any(b["has_mask"]) and not all(b["has_mask"])]
    assert mixed, "no batch mixed cases with and without masks"
    assert all(b["regions"].shape[:2] == (4, 3) for b in batches)  # WT, TC, ET for every case
    losses, _ = trainer.step_losses(mixed[0])
    assert "aux:grade" in losses and torch.isfinite(losses["aux:grade"])
    batch = {**mixed[0], "has_mask": [False] * 4}
    losses, tail = trainer.step_losses(batch)
    assert "aux:grade" not in losses
    trainer.model.zero_grad()
    (trainer.balancer(losses) + tail).backward()
    aux = [p for n, p in trainer.model.named_parameters() if "aux" in n and p.requires_grad]
    assert aux and all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in aux)
