"""training.precision: which dtype the forward pass autocasts to, and a bf16 training run on the CPU."""

import math

import pytest
import torch

from medtriad.config import Config
from medtriad.training import precision
from medtriad.training.precision import autocast_dtype
from medtriad.training.trainer import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_autocast_dtype_per_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
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
    assert autocast_dtype("bf16", CUDA) is torch.bfloat16  # GPUs are not asked


def test_cpu_probe_answers_a_bool():
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_config_rejects_unknown_precision():
    with pytest.raises(ValueError, match="training.precision"):
        Config.load("tiny", {"training.precision": "half"})


def test_bf16_training_on_cpu_runs_in_bfloat16_and_keeps_float32_weights(synth_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # emulated where the CPU lacks it: slower only
    config = Config.load("tiny", {"training.epochs": 1, "training.iterations_per_epoch": 2,
                                  "training.warmup_iterations": 1, "training.precision": "bf16"})
    trainer = Trainer(synth_dataset, config, tmp_path / "run", device="cpu", progress=False)
    result = trainer.fit()
    assert trainer.autocast is torch.bfloat16 and math.isfinite(result.best_score)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast: weights stay float32
    seen = []
    hook = trainer.model.encoder.last_shared_layer().register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    losses, _ = trainer._losses(trainer._batch(0))
    hook.remove()
    assert seen == [torch.bfloat16]  # the convolutions ran in bfloat16 ...
    assert losses and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())  # losses float32
