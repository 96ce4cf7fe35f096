import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from torch import nn

from medtriad.training.losses import (
    ClassificationLoss,
    FixedWeights,
    GradNorm,
    SegmentationLoss,
    UncertaintyWeighting,
    build_balancer,
    deep_supervision_loss,
)

# --- task losses --------------------------------------------------------------------------------------------------


def test_segmentation_loss_is_batch_dice_focal_and_rewards_correct_masks():
    torch.manual_seed(0)
    targets = (torch.rand(2, 3, 8, 8, 8) > 0.7).float()
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    loss = SegmentationLoss()(logits, targets)
    reference = DiceFocalLoss(sigmoid=True, batch=True)(logits, targets)
    assert loss.item() == pytest.approx(reference.item())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    confident = SegmentationLoss()(20.0 * (2 * targets - 1), targets.bool())
    assert confident.item() < 0.05 < loss.item()
    with pytest.raises(ValueError, match="differ"):
        SegmentationLoss()(logits, targets[:, :2])


def test_deep_supervision_loss_weighs_downsampled_targets_like_nnunet():
    torch.manual_seed(0)
    targets = (torch.rand(2, 3, 8, 8, 8) > 0.7).float()
    logits = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    single = SegmentationLoss()(logits[0], targets)
    assert deep_supervision_loss(1)([logits[0]], targets).item() == pytest.approx(single.item())
    coarse = SegmentationLoss()(logits[1], targets[:, :, 1::2, 1::2, 1::2])  # nearest-exact: voxel 2i + 1
    assert deep_supervision_loss(2)(logits, targets).item() == pytest.approx((2 * single + coarse).item() / 3)


def test_classification_loss_ignores_unknown_targets():
    torch.manual_seed(1)
    loss_fn = ClassificationLoss({"grade": ("binary", 1), "subtype": ("multiclass", 3), "findings": ("multilabel", 2)})
    logits = {"grade": torch.randn(4, 1), "subtype": torch.randn(4, 3), "findings": torch.randn(4, 2)}
    targets = {
        "grade": torch.tensor([1.0, -1.0, 0.0, float("nan")]),
        "subtype": torch.tensor([2, -1, -1, 0]),
        "findings": torch.tensor([[1.0, -1.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 0.0]]),
    }
    losses = loss_fn(logits, targets)
    expected_grade = F.binary_cross_entropy_with_logits(logits["grade"][[0, 2], 0], torch.tensor([1.0, 0.0]))
    expected_subtype = F.cross_entropy(logits["subtype"][[0, 3]], torch.tensor([2, 0]))
    known = targets["findings"] >= 0
    expected_findings = F.binary_cross_entropy_with_logits(logits["findings"][known], targets["findings"][known])
    assert losses["grade"].item() == pytest.approx(expected_grade.item())
    assert losses["subtype"].item() == pytest.approx(expected_subtype.item())
    assert losses["findings"].item() == pytest.approx(expected_findings.item())


def test_classification_loss_omits_tasks_without_known_targets():
    loss_fn = ClassificationLoss({"grade": ("binary", 1), "subtype": ("multiclass", 3)})
    logits = {"grade": torch.randn(2, 1), "subtype": torch.randn(2, 3)}
    losses = loss_fn(logits, {"grade": torch.tensor([-1.0, -1.0]), "subtype": torch.tensor([1, -1])})
    assert set(losses) == {"subtype"} and torch.isfinite(losses["subtype"])
    assert loss_fn(logits, {"grade": torch.tensor([[0.0], [1.0]])}).keys() == {"grade"}


def test_classification_loss_rejects_bad_tasks_and_shapes():
    with pytest.raises(ValueError, match="ordinal"):
        ClassificationLoss({"grade": ("ordinal", 3)})
    with pytest.raises(ValueError, match="2 outputs"):
        ClassificationLoss({"grade": ("binary", 2)})
    with pytest.raises(ValueError, match="grade"):
        ClassificationLoss({"grade": ("binary", 1)})({"grade": torch.randn(2, 3)}, {"grade": torch.ones(2)})


# --- balancing ----------------------------------------------------------------------------------------------------


def test_fixed_weights_arithmetic_and_missing_tasks():
    balancer = build_balancer("fixed", ["seg", "cls"], weights={"seg": 2.0, "cls": 0.5})
    assert isinstance(balancer, FixedWeights)
    assert balancer({"seg": torch.tensor(3.0), "cls": torch.tensor(4.0)}).item() == pytest.approx(8.0)
    assert balancer({"cls": torch.tensor(4.0)}).item() == pytest.approx(2.0)
    assert balancer.weights() == {"seg": 2.0, "cls": 0.5}
    assert build_balancer("fixed", ["a", "b"]).weights() == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="det"):
        balancer({"det": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="no task loss"):
        balancer({})


def test_uncertainty_weighting_moves_log_variances_to_log_losses():
    balancer = build_balancer("uncertainty", ["seg", "cls"])
    assert isinstance(balancer, UncertaintyWeighting)
    losses = {"seg": torch.tensor(4.0), "cls": torch.tensor(0.25)}
    total = balancer(losses)
    assert total.item() == pytest.approx(4.25)  # s = 0: exp(0) * L + 0
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    start_gap = {t: abs(0.0 - math.log(losses[t].item())) for t in losses}
    for _ in range(300):
        optimizer.zero_grad()
        balancer(losses).backward()
        optimizer.step()
    for task, loss in losses.items():
        s = balancer.log_vars[task].item()
        assert abs(s - math.log(loss.item())) < 0.05 * start_gap[task]
        assert balancer.weights()[task] == pytest.approx(1 / loss.item(), rel=0.1)


def test_uncertainty_weighting_skips_absent_task():
    balancer = UncertaintyWeighting(["seg", "cls"])
    balancer({"seg": torch.tensor(2.0)}).backward()
    assert balancer.log_vars["cls"].grad is None
    assert balancer.log_vars["seg"].grad.item() == pytest.approx(1 - 2.0)


def two_task_problem(seed: int) -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shared layer with two linear heads; task B carries irreducible noise, so its loss falls slower."""
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y_a = x @ torch.randn(8, 1)
    y_b = x @ torch.randn(8, 1) + 2.0 * torch.randn(256, 1)
    return nn.Linear(8, 16), nn.Linear(16, 1), nn.Linear(16, 1), x, y_a, y_b


def test_gradnorm_raises_weight_of_slower_task():
    shared, head_a, head_b, x, y_a, y_b = two_task_problem(0)
    balancer = build_balancer("gradnorm", ["A", "B"], shared_parameters=shared.parameters())
    assert isinstance(balancer, GradNorm)
    optimizer = torch.optim.SGD([*shared.parameters(), *head_a.parameters(), *head_b.parameters()], lr=0.02)
    for _ in range(80):
        features = torch.relu(shared(x))
        losses = {"A": F.mse_loss(head_a(features), y_a), "B": F.mse_loss(head_b(features), y_b)}
        weights = balancer.weights()
        total = balancer(losses)
        assert total.item() == pytest.approx(weights["A"] * losses["A"].item() + weights["B"] * losses["B"].item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    final = balancer.weights()
    assert final["B"] > final["A"]
    assert final["A"] + final["B"] == pytest.approx(2.0, abs=1e-5)
    assert balancer.task_weights.grad is None  # the main optimizer never updates the weights


def test_gradnorm_absent_task_is_neither_counted_nor_moved():
    shared, head_a, head_b, x, y_a, y_b = two_task_problem(1)
    balancer = GradNorm(["A", "B"], shared.parameters())
    features = torch.relu(shared(x))
    loss_a = F.mse_loss(head_a(features), y_a)
    total = balancer({"A": loss_a})
    assert total.item() == pytest.approx(loss_a.item())
    assert torch.isnan(balancer.initial_losses[1]) and balancer.initial_losses[0].item() == pytest.approx(loss_a.item())
    total.backward()  # the graph survives the weight update
    assert shared.weight.grad is not None
    for _ in range(3):  # both tasks, then A alone: B's weight must not drift with Adam's momentum
        features = torch.relu(shared(x))
        balancer({"A": F.mse_loss(head_a(features), y_a), "B": F.mse_loss(head_b(features), y_b)})
    w_b = balancer.weights()["B"]
    balancer({"A": F.mse_loss(head_a(torch.relu(shared(x))), y_a)})
    assert balancer.weights()["B"] == w_b
    balancer.eval()
    before = balancer.weights()
    balancer({"A": F.mse_loss(head_a(torch.relu(shared(x))), y_a), "B": F.mse_loss(head_b(torch.relu(shared(x))), y_b)})
    assert balancer.weights() == before


def test_build_balancer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="magic"):
        build_balancer("magic", ["a"])
    with pytest.raises(ValueError, match="shared_parameters"):
        build_balancer("gradnorm", ["a", "b"])
    with pytest.raises(ValueError, match=r"\['c'\], which are not tasks"):
        build_balancer("fixed", ["a", "b"], weights={"a": 1.0, "c": 2.0})


def test_fixed_weights_default_to_one_for_tasks_not_named():
    assert build_balancer("fixed", ["a", "b"], weights={"a": 0.5}).weights() == {"a": 0.5, "b": 1.0}
