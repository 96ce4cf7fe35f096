"""Steps with non-finite gradients are skipped, counted and, when they keep coming, stop training with a clear error.

On the CPU a bfloat16 convolution's weight gradient on a 2^3-voxel map is non-finite now and then (docs/benchmarks.md,
fifteenth session): one such step used to turn every weight into NaN for the rest of the run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medtriad.cli import main
from medtriad.config import Config
from medtriad.training import trainer as trainer_module
from medtriad.training.losses import GradNorm
from medtriad.training.trainer import Trainer, TrainingDivergedError

TINY = {"training.epochs": 1, "training.iterations_per_epoch": 4, "training.warmup_iterations": 1}


def _poison(parameter: torch.nn.Parameter, bad_calls: set[int]) -> list[int]:
    """Make ``parameter``'s gradient NaN on the backward passes numbered in ``bad_calls``; returns the call counter."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * math.nan if calls[0] in bad_calls else grad
    parameter.register_hook(hook)
    return calls


def test_a_step_with_nan_gradients_is_skipped_and_the_weights_stay_finite(synth_dataset, tmp_path):
    trainer = Trainer(synth_dataset, Config.load("tiny", TINY), tmp_path / "run", device="cpu", progress=False)
    trainer.prepare()
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    weight = next(trainer.model.encoder.last_shared_layer().parameters())
    calls = _poison(weight, {2, 3})
    trainer.prepare = lambda: None  # keep the model the hook is on
    with pytest.warns(UserWarning, match="2 of 4 steps had non-finite gradients"):
        result = trainer.fit()
    assert calls[0] == 4
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["skipped_steps"] == 2 and history[0]["step"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # without the skip: all NaN
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # good steps applied
    assert all(math.isfinite(v) for v in history[0]["losses"].values()) and math.isfinite(result.best_score)
    assert "skipped=2" in (tmp_path / "run" / "train.log").read_text()


def test_a_run_whose_gradients_stay_non_finite_stops_with_a_clear_error(synth_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_IN_A_ROW", 3)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(math.nan))
    run = tmp_path / "run"
    code = main(["train", str(synth_dataset), "-c", "tiny", "-o", str(run), "-q",
                 "--set", "training.epochs=2", "--set", "training.iterations_per_epoch=4"])
    err = capsys.readouterr().err
    assert code == 3 and "training diverged: 3 steps in a row" in err and "Traceback" not in err
    assert "training.precision=fp32" in err
    with pytest.raises(TrainingDivergedError, match="up to step 3, epoch 1"):
        Trainer(synth_dataset, Config.load("tiny", TINY), tmp_path / "run2", device="cpu", progress=False).fit()


def test_gradnorm_ignores_a_step_with_a_non_finite_loss():
    torch.manual_seed(0)
    shared, head_a, head_b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    balancer = GradNorm(["A", "B"], shared.parameters())
    for _ in range(3):  # a few finite steps move the weights
        features = torch.relu(shared(x))
        balancer({"A": F.mse_loss(head_a(features), y), "B": 3 * F.mse_loss(head_b(features), y)})
    moved = balancer.task_weights.detach().clone()
    features = torch.relu(shared(x))
    balancer({"A": F.mse_loss(head_a(features), y) * math.inf, "B": F.mse_loss(head_b(features), y)})
    assert torch.equal(balancer.task_weights.detach(), moved) and torch.isfinite(moved).all()
