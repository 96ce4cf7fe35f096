"""training.precision / inference.precision: which dtype the forward pass autocasts to; a bf16 training run on the
CPU and bf16 predictions from it."""

import math

import pytest
import torch

from medtriad.config import Config
from medtriad.data.layout import load_dataset
from medtriad.data.transforms import load_sample
from medtriad.inference.predictor import Predictor
from medtriad import precision
from medtriad.precision import autocast_dtype
from medtriad.training.trainer import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_autocast_dtype_per_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device=None: True)
    assert autocast_dtype("auto", CPU) is None  # the default leaves CPU training in float32
    assert autocast_dtype("auto", CUDA) is torch.bfloat16
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("bf16", CUDA) is torch.bfloat16
    assert autocast_dtype("fp32", CPU) is None and autocast_dtype("fp32", CUDA) is None
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", CPU)


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert autocast_dtype("bf16", CPU) is None
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device=None: True)
    assert autocast_dtype("bf16", CUDA) is torch.bfloat16  # the GPU's own answer counts there


def test_a_gpu_without_native_bf16_autocasts_to_float16(monkeypatch):
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device=None: False)  # e.g. a V100 or T4
    assert autocast_dtype("auto", CUDA) is torch.float16
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert autocast_dtype("bf16", CUDA) is torch.float16
    assert autocast_dtype("fp32", CUDA) is None


def test_gpu_probe_answers_a_bool():
    assert isinstance(precision.cuda_has_native_bf16(), bool)


def test_cpu_probe_answers_a_bool():
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_config_rejects_unknown_precision():
    with pytest.raises(ValueError, match="training.precision"):
        Config.load("tiny", {"training.precision": "half"})
    with pytest.raises(ValueError, match="inference.precision"):
        Config.load("tiny", {"inference.precision": "fp16"})


def test_bf16_training_on_cpu_runs_in_bfloat16_and_keeps_float32_weights(synth_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # emulated where the CPU lacks it: slower only
    config = Config.load("tiny", {"training.epochs": 1, "training.iterations_per_epoch": 2,
                                  "training.warmup_iterations": 1, "training.precision": "bf16"})
    trainer = Trainer(synth_dataset, config, tmp_path / "run", device="cpu", progress=False)
    result = trainer.fit()
    assert trainer.autocast is torch.bfloat16 and math.isfinite(result.best_score)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast: weights stay float32
    seen = []
    hook = trainer.model.encoder.stages[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    losses, _ = trainer.step_losses(trainer.draw_batch(0))
    hook.remove()
    assert seen == [torch.bfloat16]  # the convolutions ran in bfloat16 (the deepest, tiny maps: float32) ...
    assert losses and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())  # losses float32

    # the run predicted in bf16 agrees with float32 predictions, and every output comes back as float32
    spec, cases = load_dataset(synth_dataset)
    sample = load_sample(cases[0], spec, config.data.spacing)
    exact = Predictor.from_pretrained(tmp_path / "run", device="cpu").predict_grid(sample.image)
    fast = Predictor.from_pretrained(tmp_path / "run", device="cpu", inference={"precision": "bf16"})
    seen = []
    hook = fast.model.encoder.stages[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    approx = fast.predict_grid(sample.image)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert approx.region_probs.dtype == torch.float32 and approx.region_probs.shape == exact.region_probs.shape
    assert (approx.region_probs - exact.region_probs).abs().max() < 0.05
    assert approx.scores.dtype == torch.float32 and approx.boxes.dtype == torch.float32
    for task, p in exact.class_probs.items():
        assert approx.class_probs[task].dtype == torch.float32
        torch.testing.assert_close(approx.class_probs[task], p, atol=0.03, rtol=0)
    assert fast.predict_sample(sample).mask.shape == sample.geometry.shape  # the input grid path takes bf16 output
