"""The training loop end to end: real BraTS cases (import -> check -> train -> evaluate), resume, refusals."""

import importlib.util
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from medtriad.checkpoint import load_state, load_weights, save_checkpoint
from medtriad.cli import main
from medtriad.config import Config
from medtriad.data.layout import load_dataset
from medtriad.data.synth import generate_dataset
from medtriad.models.memory_format import InstanceNormAsGroupNorm
from medtriad.models.multitask import ModelSpec, build_model, load_model_weights
from medtriad.training.trainer import DatasetInvalidError, Trainer, train

TINY = {"training.epochs": 2, "training.iterations_per_epoch": 2, "training.warmup_iterations": 1}


def test_end_to_end_on_real_brats(brats2018, tmp_path):
    """import -> check -> train (tiny, CPU) -> evaluate on the ten shared cases; metric files hold sane values."""
    dataset, _ = brats2018
    assert main(["check", str(dataset), "-q"]) == 0
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-c", "tiny", "-o", str(run), "-q"]) == 0
    for name in ("config.yaml", "model.json", "split.json", "history.json", "progress.png", "train.log"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 2 and not set(split["val"]) & set(split["train"])
    spec, cases = load_dataset(dataset)
    grades = {c.case_id: c.classes["grade"] for c in cases}
    assert sorted(grades[c] for c in split["val"]) == [0, 1]  # stratified: the two LGG cases land in two folds

    assert main(["evaluate", str(run), str(dataset), "--split", "val", "-q"]) == 0
    summary = json.loads((run / "evaluation_val" / "summary.json").read_text())
    rows = (run / "evaluation_val" / "per_case.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("case,")
    assert summary["num_cases"] == 2
    for region in ("WT", "TC", "ET"):
        dice = summary["segmentation"][f"dice_{region}"]["mean"]
        hd95 = summary["segmentation"][f"hd95_{region}"]["mean"]
        assert 0.0 <= dice <= 1.0 and 0.0 <= hd95 <= 380.0
    det = summary["detection"]
    assert det["num_gt_boxes"] >= 2 and 0.0 <= det["AP_IoU_0.10"] <= 1.0
    auc = summary["classification"]["grade"]["auc"]
    assert auc in (0.0, 1.0)  # one LGG and one HGG case: the ranking is either right or wrong


@pytest.mark.parametrize("recipe, sets", [
    ("brats-segresnet", []),  # the single-task reference: MONAI's SegResNet, raw maps
    ("brats-cpu", ["model.encoder=segresnet", 'model.encoder_kwargs={"init_filters":8,"blocks_down":[1,1,1,1,1]}',
                   'model.segmentation={"decoder":"segresnet"}']),  # all three heads on the SegResNet backbone
])
def test_segresnet_recipes_train_and_evaluate_on_real_brats(brats2018, tmp_path, recipe, sets):
    """The issue-2 reference recipe and the multi-task model on the SegResNet backbone run end to end on the real
    cases (shrunk to a few steps on a 4 mm grid); the saved model.json rebuilds the same model for evaluation."""
    dataset, _ = brats2018
    run = tmp_path / "run"
    shrink = ["data.spacing=[4,4,4]", "data.patch_size=[32,32,32]", "training.epochs=1",
              "training.iterations_per_epoch=2", "training.warmup_iterations=1", "training.max_minutes=0"]
    args = ["train", str(dataset), "-c", recipe, "-o", str(run), "-q"]
    assert main(args + [a for kv in shrink + sets for a in ("--set", kv)]) == 0
    spec = json.loads((run / "model.json").read_text())
    assert spec["encoder"] == "segresnet" and spec["segmentation"]["decoder"] == "segresnet"
    losses = json.loads((run / "history.json").read_text())[-1]["losses"]
    assert all(math.isfinite(v) for v in losses.values()) and len(losses) == len(spec["heads"])
    assert main(["evaluate", str(run), str(dataset), "--split", "val", "-q"]) == 0
    summary = json.loads((run / "evaluation_val" / "summary.json").read_text())
    assert summary["num_cases"] == 2
    assert all(0.0 <= summary["segmentation"][f"dice_{r}"]["mean"] <= 1.0 for r in ("WT", "TC", "ET"))
    assert ("detection" in summary) == ("detection" in spec["heads"])


@pytest.mark.parametrize("ema_decay, fold, balancing", [(0.0, 0, "fixed"), (0.9, 1, "uncertainty"),
                                                        (0.0, 0, "gradnorm")])
def test_resume_continues_identically(synth_dataset, tmp_path, monkeypatch, ema_decay, fold, balancing):
    """A run interrupted after its first epoch and resumed with --resume ends with the same weights as a run
    that was never interrupted (same optimizer, scheduler, RNG and patch draws; with EMA, the same average too;
    on fold 1, resumed without --fold: the run's own fold, not the default 0; a learned loss balancer's parameters
    ride in the same weights file, and GradNorm's own optimizer state in the checkpoint's state)."""
    config = Config.load("tiny", {**TINY, "training.ema_decay": ema_decay, "training.balancing": balancing})
    straight = train(synth_dataset, config, tmp_path / "a", fold=fold, progress=False)
    assert straight.epochs_done == 2

    run = tmp_path / "b"
    original = Trainer.draw_batch

    def crash_in_second_epoch(self, step):
        if step == TINY["training.iterations_per_epoch"]:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "draw_batch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(synth_dataset, config, run, fold=fold, progress=False)
    assert load_state(run / "checkpoints" / "last")["step"] == 2
    monkeypatch.setattr(Trainer, "draw_batch", original)
    assert main(["train", str(synth_dataset), "-o", str(run), "--resume", "-q"]) == 0
    a = load_weights(tmp_path / "a" / "checkpoints" / "last")
    b = load_weights(run / "checkpoints" / "last")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    state = load_state(run / "checkpoints" / "last")
    assert state["step"] == 4 and state["epoch"] == 1
    assert [r["epoch"] for r in state["history"]] == [0, 1]


def test_resume_keeps_a_best_checkpoint_newer_than_last(synth_dataset, tmp_path):
    """`best` is written before `last`: a crash between the two leaves best recording a higher score than last's
    record of it. --resume takes the higher, so a worse epoch does not replace that best."""
    config = Config.load("tiny", {**TINY, "training.epochs": 1})
    run = tmp_path / "run"
    train(synth_dataset, config, run, progress=False)
    best = run / "checkpoints" / "best"
    state = load_state(best)
    state["best_score"] = 2.0  # above any reachable score: the epoch the crash lost from last
    save_checkpoint(best, load_weights(best), state)
    shutil.copy(run / "model.json", best / "model.json")
    assert load_state(best, tensors=False)["best_score"] == 2.0
    config.training.epochs = 2
    config.save(run / "config.yaml")
    result = train(synth_dataset, config, run, resume=True, progress=False)
    assert result.best_score == 2.0 and result.epochs_done == 2
    assert load_state(best)["epoch"] == 0 and load_state(run / "checkpoints" / "last")["epoch"] == 1


def test_a_best_checkpoint_left_as_best_old_is_kept(synth_dataset, tmp_path):
    """A crash between the renames of a `best` swap leaves only `best.old`; the resumed run reads it as the best
    checkpoint and replaces it only with a better epoch (it used to write the next epoch over it, better or not)."""
    config = Config.load("tiny", {**TINY, "training.epochs": 1})
    run = tmp_path / "run"
    train(synth_dataset, config, run, progress=False)
    best = run / "checkpoints" / "best"
    state = load_state(best)
    state["best_score"] = 2.0  # above any reachable score
    save_checkpoint(best, load_weights(best), state)
    best.rename(best.with_name("best.old"))
    config.training.epochs = 2
    config.save(run / "config.yaml")
    assert train(synth_dataset, config, run, resume=True, progress=False).best_score == 2.0
    assert load_state(best)["epoch"] == 0 and load_state(run / "checkpoints" / "last")["epoch"] == 1


def test_the_epoch_in_which_the_budget_runs_out_is_validated(synth_dataset, tmp_path, monkeypatch):
    """The time budget running out while an epoch is being saved (after its last step was checked) still ends
    the run with a validated epoch: the next epoch trains one step and is validated, not skipped unvalidated."""
    config = Config.load("tiny", {**TINY, "training.epochs": 4, "training.validate_every": 10,
                                  "training.max_minutes": 60})
    trainer = Trainer(synth_dataset, config, tmp_path / "run", progress=False)
    saved = []

    def plot_then_run_out(history, path):
        saved.append(len(history))
        if len(saved) == 1:
            trainer._t0 -= 3600  # the hour is spent while the first epoch is saved

    monkeypatch.setattr("medtriad.training.trainer.plot_progress", plot_then_run_out)
    result = trainer.fit()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1] and result.epochs_done == 2
    assert history[0]["validation"] == {} and history[1]["validation"]["num_cases"] >= 1
    assert history[1]["step"] == TINY["training.iterations_per_epoch"] + 1
    assert math.isfinite(result.best_score)


def test_resume_refuses_another_fold_config_or_dataset(synth_dataset, tmp_path, capsys):
    """--resume goes on with the run's own fold, config and cases: a different --fold, a config that differs (-c/--set,
    or train() given another config), or a dataset whose cases no longer give the run's split are refused with the
    reason, before training; -c/--set that match the run's config are accepted."""
    run = tmp_path / "run"
    sets = ["training.epochs=1", "training.iterations_per_epoch=1", "training.warmup_iterations=1"]
    as_args = [a for kv in sets for a in ("--set", kv)]
    assert main(["train", str(synth_dataset), "-c", "tiny", "-o", str(run), "--fold", "1", "-q"] + as_args) == 0
    checkpoint = (run / "checkpoints" / "last" / "state.json").read_bytes()
    capsys.readouterr()

    resume = ["train", str(synth_dataset), "-o", str(run), "--resume", "-q"]
    assert main(resume + ["--fold", "0"]) != 0
    assert "trains on fold 1" in capsys.readouterr().err
    assert main(resume + ["-c", "tiny"]) != 0  # the recipe without the run's --set
    assert "training.epochs: 1 -> 2" in capsys.readouterr().err
    assert main(resume + ["--set", "training.epochs=3"]) != 0  # --set alone applies to the run's own config
    err = capsys.readouterr().err
    assert "training.epochs: 1 -> 3" in err and "data." not in err
    with pytest.raises(ValueError, match="training.epochs: 1 -> 2"):  # the Python API checks the same
        train(synth_dataset, Config.load("tiny"), run, resume=True, progress=False)
    other = generate_dataset(tmp_path / "nine", 9, size=40, seed=3, progress=False)
    assert main(["train", str(other), "-o", str(run), "--resume", "-q"]) != 0
    assert "SYNTH_008" in capsys.readouterr().err  # the new case, in the fold's train or val cases
    assert (run / "checkpoints" / "last" / "state.json").read_bytes() == checkpoint  # nothing was overwritten
    assert main(resume + ["-c", "tiny", "--fold", "1"] + as_args) == 0  # the same config and fold: nothing to do
    assert main(resume + ["--set", "training.epochs=1"]) == 0
    (run / "split.json").unlink()  # a run without its split cannot say which fold to go on with
    assert main(resume) != 0
    err = capsys.readouterr().err
    assert err.count("split.json") == 1 and "not found" in err and "Traceback" not in err


def test_ema_checkpoint_holds_the_average(synth_dataset, tmp_path, monkeypatch):
    """With training.ema_decay the checkpoint's model weights are the exponential moving average of the trained
    weights (the first update copies, then ema = d * ema + (1 - d) * w), the raw weights ride along as `train.*`,
    and evaluation loads the average."""
    decay = 0.75
    seen = []
    original = Trainer._weights
    monkeypatch.setattr(Trainer, "_weights", lambda self: seen.append(
        {k: v.clone() for k, v in original(self).items()}) or seen[-1])
    run = tmp_path / "run"
    config = Config.load("tiny", {**TINY, "training.iterations_per_epoch": 1, "training.ema_decay": decay})
    train(synth_dataset, config, run, progress=False)
    first, second = seen[0], seen[-1]  # after step 1 (epoch 1) and after step 2 (epoch 2)
    floats = [k for k in second if not k.startswith(("train.", "balancer.")) and second[k].is_floating_point()]
    assert floats and all(f"train.{k}" in second for k in floats)
    for k in floats:
        torch.testing.assert_close(first[k], first[f"train.{k}"], msg=k)  # the first update copies
        expected = decay * first[f"train.{k}"] + (1 - decay) * second[f"train.{k}"]
        torch.testing.assert_close(second[k], expected, rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k in floats if not torch.equal(second[k], second[f"train.{k}"])]
    assert moved, "the average equals the trained weights: no averaging happened"
    assert load_state(run / "checkpoints" / "last")["ema_updates"] == 2
    assert main(["evaluate", str(run), str(synth_dataset), "--checkpoint", "last", "-q"]) == 0


def test_ema_leaves_the_trained_weights_untouched(synth_dataset, tmp_path):
    """For the same steps, an EMA run's trained weights (`train.*`) are those of a run without EMA: the average draws
    no random numbers and feeds nothing back, so one EMA run holds both arms of a paired comparison
    (benchmarks/ema_trained_copy.py, benchmarks/brats_ema_pair.sh)."""
    plain = train(synth_dataset, Config.load("tiny", TINY), tmp_path / "plain", progress=False)
    averaged = train(synth_dataset, Config.load("tiny", {**TINY, "training.ema_decay": 0.5}), tmp_path / "ema",
                     progress=False)
    assert plain.epochs_done == averaged.epochs_done == 2
    a = load_weights(tmp_path / "plain" / "checkpoints" / "last")
    b = load_weights(tmp_path / "ema" / "checkpoints" / "last")
    model_keys = [k for k in a if not k.startswith("balancer.")]
    assert model_keys and all(f"train.{k}" in b for k in model_keys)
    for key in model_keys:
        torch.testing.assert_close(b[f"train.{key}"], a[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(b[k], a[k]) for k in model_keys if a[k].is_floating_point())  # the average moved
    # benchmarks/ema_trained_copy.py turns them into a run of their own: the plain run's weights, evaluable
    script = Path(__file__).parents[2] / "benchmarks" / "ema_trained_copy.py"
    module_spec = importlib.util.spec_from_file_location("ema_trained_copy", script)
    copier = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(copier)
    copy = copier.trained_copy(tmp_path / "ema", tmp_path / "ema-trained")
    c = load_weights(copy / "checkpoints" / "last")
    assert c.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=0, msg=key)
    assert main(["evaluate", str(copy), str(synth_dataset), "--checkpoint", "last", "-q"]) == 0
    with pytest.raises(SystemExit, match="exists"):  # never written over
        copier.trained_copy(tmp_path / "ema", copy)
    with pytest.raises(SystemExit, match="no train"):  # a run without EMA has no trained weights to copy
        copier.trained_copy(tmp_path / "plain", tmp_path / "plain-trained")


def test_interrupted_checkpoint_swap_keeps_last_good(synth_dataset, tmp_path):
    """A crash between the renames of a checkpoint swap leaves `last.old`; resume and prediction fall back to it."""
    run = tmp_path / "run"
    train(synth_dataset, Config.load("tiny", {**TINY, "training.epochs": 1}), run, progress=False)
    last = run / "checkpoints" / "last"
    last.rename(last.with_name("last.old"))  # the state right after `last -> last.old`, before `last.tmp -> last`
    assert load_state(last)["step"] == 2


def test_training_refuses_invalid_dataset(synth_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth_dataset, broken)
    image = sorted((broken / "imagesTr").glob("*_0002.nii.gz"))[0]
    image.write_bytes(image.read_bytes()[:200])  # truncated gzip
    with pytest.raises(DatasetInvalidError, match=image.name):
        train(broken, Config.load("tiny", TINY), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("patch, message", [
    ([24, 32, 32], r"data.patch_size must be 3 multiples of 16 \(the resenc encoder's divisor\), got \(24, 32, 32\)"),
    ([16, 16, 16], r"data.patch_size \(16, 16, 16\) leaves the deepest map 1 voxel; make one side 32"),
])
def test_patch_size_the_encoder_cannot_take_is_refused_before_training(synth_dataset, tmp_path, patch, message):
    config = Config.load("tiny", {**TINY, "data.patch_size": patch})
    with pytest.raises(ValueError, match=message):
        train(synth_dataset, config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_single_task_is_the_same_builder(synth_dataset, tmp_path):
    config = Config.load("tiny", {**TINY, "training.epochs": 1, "model.heads": ["classification"]})
    result = train(synth_dataset, config, tmp_path / "run", progress=False)
    spec = json.loads((tmp_path / "run" / "model.json").read_text())
    assert spec["heads"] == ["classification"]
    weights = load_weights(tmp_path / "run" / "checkpoints" / "last")
    assert not any(k.startswith(("heads.segmentation", "heads.detection")) for k in weights)
    assert math.isfinite(result.best_score)


def test_fixed_weights_follow_the_heads_the_dataset_can_train(synth_dataset, tmp_path):
    """A recipe's fixed loss weights name every head's task (brats-cpu: segmentation, detection, class:grade); on a
    dataset without a class table the classification head is left out, and its weight with it. A task the recipe does
    not name weighs 1; a name that is no task of any head is refused."""
    data = tmp_path / "no-classes"
    shutil.copytree(synth_dataset, data)
    (data / "classes.csv").unlink()
    meta = json.loads((data / "dataset.json").read_text())
    del meta["medtriad"]["classification"]
    (data / "dataset.json").write_text(json.dumps(meta))
    weights = {"segmentation": 1.0, "class:grade": 0.02}
    trainer = Trainer(data, Config.load("tiny", {**TINY, "training.loss_weights": weights}), tmp_path / "a",
                      progress=False)
    with pytest.warns(UserWarning, match=r"cannot train classification \(no medtriad.classification tasks"):
        trainer.prepare()  # said, not silent
    assert trainer.model_spec.heads == ["segmentation", "detection"]
    assert trainer.balancer.weights() == {"segmentation": 1.0, "detection": 1.0}
    full = Trainer(synth_dataset, Config.load("tiny", TINY), tmp_path / "full", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full.prepare()
    assert not [w for w in caught if "cannot train" in str(w.message)]  # every head trainable: nothing said
    typo = Trainer(data, Config.load("tiny", {**TINY, "training.loss_weights": {"segmentaton": 1.0}}), tmp_path / "b",
                   progress=False)
    with pytest.raises(ValueError, match="segmentaton"):
        typo.prepare()


def test_a_batch_without_any_target_is_an_empty_step_not_a_crash(synth_dataset, tmp_path, monkeypatch):
    """A classification-only model learns the class from patches that hold tumour (a patch without it leaves the
    case's class unknown), so a batch can hold no target for any head. Such a step adds nothing and training goes
    on (it had stopped a 60-minute BraTS run with "no task loss to balance")."""
    config = Config.load("tiny", {**TINY, "training.epochs": 1, "model.heads": ["classification"]})
    batch = Trainer.draw_batch

    def unknown_classes(self, step):
        out = batch(self, step)
        out["classes"] = {t: torch.full_like(v, -1.0) for t, v in out["classes"].items()}
        return out

    monkeypatch.setattr(Trainer, "draw_batch", unknown_classes)
    train(synth_dataset, config, tmp_path / "run", progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["step"] == TINY["training.iterations_per_epoch"] and history[-1]["losses"] == {}
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "run" / "checkpoints" / "last").values())


def test_deep_supervision_trains_and_leaves_inference_alone(synth_dataset, tmp_path):
    config = Config.load("tiny", {**TINY, "training.epochs": 1,
                                  "model.segmentation": {"decoder_channels": [8, 8, 16, 16], "deep_supervision": 2}})
    trainer = Trainer(synth_dataset, config, tmp_path / "run", progress=False)
    result = trainer.fit()
    assert math.isfinite(result.best_score)
    model, batch = trainer.model.train(), trainer.draw_batch(0)
    out = model(batch["image"], det_targets=batch["boxes"])
    assert [o.shape[2] for o in [out["segmentation"], *out["segmentation_deep"]]] == [32, 16, 8]
    model.zero_grad()
    trainer.step_losses(batch)[0]["segmentation"].backward()  # the loss reads the coarse outputs
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads["segmentation"].deep_outs.parameters())
    with torch.no_grad():
        assert "segmentation_deep" not in model.eval()(batch["image"])
    weights = load_weights(tmp_path / "run" / "checkpoints" / "last")
    assert sum(k.startswith("heads.segmentation.deep_outs.") for k in weights) == 4  # 2 levels x (weight, bias)


def test_cpu_training_norms_keep_channels_last_and_checkpoints_load_into_the_built_model(synth_dataset, tmp_path):
    """On the CPU the trainer's instance norms are group norms (medtriad.models.memory_format); the checkpoint it
    writes loads into the model as built for inference (InstanceNorm3d), which predicts the same."""
    config = Config.load("tiny", {**TINY, "training.epochs": 1})
    trainer = Trainer(synth_dataset, config, tmp_path / "run", progress=False)
    trainer.fit()
    assert any(isinstance(m, InstanceNormAsGroupNorm) for m in trainer.model.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in trainer.model.modules())
    built = build_model(ModelSpec.load(tmp_path / "run" / "model.json"))
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in built.modules())
    load_model_weights(built, load_weights(tmp_path / "run" / "checkpoints" / "last"))
    image = trainer.draw_batch(0)["image"]
    with torch.no_grad():
        expected, found = built.eval()(image.contiguous()), trainer.model.eval()(image)
    torch.testing.assert_close(found["segmentation"], expected["segmentation"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("balancing", ["uncertainty", "gradnorm"])
def test_learned_loss_balancing_trains_and_logs_weights(synth_dataset, tmp_path, balancing):
    config = Config.load("tiny", {**TINY, "training.epochs": 1, "training.iterations_per_epoch": 3,
                                  "training.balancing": balancing})
    train(synth_dataset, config, tmp_path / "run", progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    weights = history[-1]["loss_weights"]
    assert set(weights) == {"segmentation", "detection", "class:grade"}
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    assert any(abs(w - 1.0) > 1e-4 for w in weights.values())  # learned: moved away from their start
    if balancing == "gradnorm":
        assert sum(weights.values()) == pytest.approx(3.0, rel=1e-4)
    saved = load_weights(tmp_path / "run" / "checkpoints" / "last")
    assert any(k.startswith("balancer.") for k in saved)  # the learned weights travel with the checkpoint


def test_a_new_run_never_trains_over_a_trained_one(synth_dataset, tmp_path, capsys):
    """Training without --resume into a folder that holds a checkpoint (or, after a crash mid-swap, only its .old
    copy) is refused before anything is written: that checkpoint would survive beside the new config and split, and a
    later --resume would continue it. A folder whose run stopped before its first checkpoint trains afresh."""
    run = tmp_path / "run"
    config = Config.load("tiny", {**TINY, "training.epochs": 1})
    train(synth_dataset, config, run, progress=False)
    state, config_file = (run / "checkpoints" / "last" / "state.json").read_bytes(), (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="already holds a trained run .*--resume"):
        train(synth_dataset, Config.load("tiny", {**TINY, "training.epochs": 3}), run, progress=False)
    assert main(["train", str(synth_dataset), "-c", "tiny", "-o", str(run), "-q"]) != 0
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoints" / "last" / "state.json").read_bytes() == state
    assert (run / "config.yaml").read_bytes() == config_file
    shutil.rmtree(run / "checkpoints" / "best")
    (run / "checkpoints" / "last").rename(run / "checkpoints" / "last.old")
    with pytest.raises(ValueError, match="already holds a trained run"):
        train(synth_dataset, config, run, progress=False)
    (run / "checkpoints" / "last.old").rename(run / "checkpoints" / "best.old")
    with pytest.raises(ValueError, match="already holds a trained run"):
        train(synth_dataset, config, run, progress=False)
    shutil.rmtree(run / "checkpoints")  # stopped before its first checkpoint: nothing to continue
    assert train(synth_dataset, config, run, progress=False).epochs_done == 1


def test_uncertainty_log_variances_have_no_weight_decay_and_old_runs_resume(synth_dataset, tmp_path):
    """The learned log-variances form an AdamW group without weight decay (decay would pull every task weight to 1);
    a run saved when they shared the model's group (one group) still resumes, its group split the same way."""
    config = Config.load("tiny", {**TINY, "training.epochs": 1, "training.balancing": "uncertainty"})
    trainer = Trainer(synth_dataset, config, tmp_path / "run", progress=False)
    trainer.prepare()
    model_group, balancer_group = trainer.optimizer.param_groups
    assert balancer_group["weight_decay"] == 0.0 and model_group["weight_decay"] == config.training.weight_decay
    assert {id(p) for p in balancer_group["params"]} == {id(p) for p in trainer.balancer.parameters()}

    run = tmp_path / "old"
    train(synth_dataset, config, run, progress=False)
    last = run / "checkpoints" / "last"
    state = load_state(last)
    groups = state["optimizer"]["param_groups"]
    state["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    state["scheduler"].update({k: state["scheduler"][k][:1] for k in ("base_lrs", "_last_lr", "lr_lambdas")})
    save_checkpoint(last, load_weights(last), state,
                    extras={name: lambda path, n=name: shutil.copy(run / n, path) for name in ("model.json",
                                                                                              "config.yaml")})
    config.training.epochs = 2
    config.save(run / "config.yaml")
    loaded = Trainer(synth_dataset, config, run, progress=False)
    loaded.prepare()
    loaded._restore()
    loaded.scheduler.step()  # one schedule for both groups, stepped on from the saved state
    model_group, balancer_group = loaded.optimizer.param_groups
    assert balancer_group["lr"] == model_group["lr"] > 0 and balancer_group["weight_decay"] == 0.0
    resumed = Trainer(synth_dataset, config, run, progress=False)
    assert resumed.fit(resume=True).epochs_done == 2


def _encoder_grads(trainer, batch, only=None):
    """The shared encoder's gradient of the balanced loss of ``batch`` (of the task ``only`` alone, if given)."""
    trainer.model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # RetinaNet samples its negative anchors at random: the same ones in every pass
        losses, tail = trainer.step_losses(batch)
    weighted = trainer.balancer({only: losses[only]} if only else losses)
    (weighted + tail).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in trainer.model.encoder.named_parameters()}


def test_a_stop_gradient_leaves_the_shared_encoder_to_segmentation(synth_dataset, tmp_path):
    """training.encoder_gradient {detection: 0, classification: 0}: the detection and classification losses train
    their heads but not the encoder, whose gradient is then segmentation's alone (deep supervision included); with
    0.25 their share is a quarter of what joint training gives it. Heads the model lacks (a single-task variant) drop
    out of the setting; stopping every head is refused."""
    weights = {"segmentation": 1.0, "detection": 0.5, "class:grade": 0.5}
    trainers = {}
    for share in (1.0, 0.25, 0.0):
        config = Config.load("tiny", {**TINY, "training.loss_weights": weights,
                                      "model.segmentation.deep_supervision": 1,
                                      "training.encoder_gradient": {"detection": share, "classification": share}})
        trainers[share] = Trainer(synth_dataset, config, tmp_path / f"s{share}", progress=False)
        trainers[share].prepare()
        trainers[share].model.load_state_dict(trainers[1.0].model.state_dict())
    batch = trainers[1.0].draw_batch(0)
    assert batch["classes"]["grade"].ge(0).any(), "the batch must hold a class target"
    joint = _encoder_grads(trainers[1.0], batch)
    seg = _encoder_grads(trainers[1.0], batch, "segmentation")
    quarter = _encoder_grads(trainers[0.25], batch)
    stopped = _encoder_grads(trainers[0.0], batch)
    assert max((joint[n] - seg[n]).abs().max() for n in joint) > 1e-4  # the other heads do move the encoder jointly
    for n in joint:
        torch.testing.assert_close(stopped[n], seg[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(quarter[n], seg[n] + 0.25 * (joint[n] - seg[n]), rtol=1e-3, atol=1e-6)
    for head in ("detection", "classification"):  # the heads themselves still learn from their losses
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainers[0.0].model.heads[head].parameters())
    single = Trainer(synth_dataset, Config.load("tiny", {
        **TINY, "model.heads": ["segmentation"], "training.loss_weights": {"segmentation": 1.0},
        "training.encoder_gradient": {"detection": 0.0}}), tmp_path / "single", progress=False)
    single.prepare()
    assert single.encoder_gradient == {}
    detection_only = Trainer(synth_dataset, Config.load("tiny", {
        **TINY, "model.heads": ["detection"], "training.loss_weights": {"detection": 1.0},
        "training.encoder_gradient": {"detection": 0.0, "classification": 0.0}}), tmp_path / "det", progress=False)
    detection_only.prepare()  # the recipe's own setting: its one head trains the encoder
    assert detection_only.encoder_gradient == {}
    none = Trainer(synth_dataset, Config.load("tiny", {
        **TINY, "model.heads": ["segmentation", "detection"], "training.loss_weights": {"segmentation": 1.0},
        "training.encoder_gradient": {"segmentation": 0.0, "detection": 0.0}}), tmp_path / "none", progress=False)
    with pytest.raises(ValueError, match="nothing would train the encoder"):
        none.prepare()


def test_encoder_gradient_settings_are_checked():
    with pytest.raises(ValueError, match="detecton"):
        Config.load("tiny", {"training.encoder_gradient": {"detecton": 0.0}})
    with pytest.raises(ValueError, match=r"share in \[0, 1\]"):
        Config.load("tiny", {"training.encoder_gradient": {"detection": 1.5}})
    with pytest.raises(ValueError, match="gradnorm"):  # GradNorm would undo the share
        Config.load("tiny", {"training.balancing": "gradnorm", "training.encoder_gradient": {"detection": 0.5}})
    with pytest.raises(ValueError, match="slice2d backbone is frozen"):  # when read, before any case is loaded
        Config.load("tiny", {"model.encoder": "slice2d", "model.heads": ["classification"],
                             "training.encoder_gradient": {"classification": 0.5}})
