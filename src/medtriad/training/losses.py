"""Per-task losses and the balancing that turns them into one number to backpropagate.

A training step produces a dictionary ``task -> scalar loss``. Tasks may be absent from a step (no
case in the batch had a known class label, the detection head was skipped, ...), so every balancer
takes whatever subset arrives and weights only that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceFocalLoss
from torch import Tensor, nn

CLASSIFICATION_KINDS = ("binary", "multiclass", "multilabel")
BALANCERS = ("fixed", "uncertainty", "gradnorm")


class SegmentationLoss(DiceFocalLoss):
    """Dice + focal loss over region channels (WT/TC/ET ...), each an independent sigmoid.

    Regions overlap (ET inside TC inside WT), hence sigmoid per channel rather than a softmax. Dice is
    computed over the whole batch (``batch=True``, as nnU-Net does) so a region absent from one case
    (no ET in many low-grade gliomas) does not produce a noisy all-or-nothing per-sample Dice.

    Forward: logits (B, R, X, Y, Z) and 0/1 targets of the same shape -> scalar loss.
    """

    def __init__(self) -> None:
        super().__init__(include_background=True, sigmoid=True, batch=True)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"segmentation logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
        return super().forward(logits, targets.to(logits.dtype))


def deep_supervision_loss(levels: int) -> DeepSupervisionLoss:
    """:class:`SegmentationLoss` over a list of logits, finest first, each coarser one scored against targets
    downsampled to its size (MONAI's ``DeepSupervisionLoss``, nearest-exact). Weights halve per level and are
    normalised to sum to 1, as nnU-Net's (Isensee et al. 2021); with ``levels=1`` it is the plain loss."""
    weights = [0.5**level for level in range(levels)]
    return DeepSupervisionLoss(SegmentationLoss(), weights=[w / sum(weights) for w in weights])


class ClassificationLoss(nn.Module):
    """One loss per classification task, ignoring samples whose label is unknown.

    Binary (logits (B, 1), targets (B,) or (B, 1) in {0, 1}) and multilabel (logits (B, L), targets
    (B, L) in {0, 1}) use BCE-with-logits; multiclass (logits (B, K), targets (B,) class indices) uses
    cross-entropy. A target is unknown where it is negative (-1) or NaN; those entries are left out of
    the mean (per element for multilabel). A task with no known target in the batch, or missing from
    ``targets``, is omitted from the output, so the result never holds NaN.

    Args:
        tasks: task name -> (kind, number of outputs), e.g. ``{"grade": ("binary", 1)}``.
    """

    def __init__(self, tasks: Mapping[str, tuple[str, int]]) -> None:
        super().__init__()
        for name, (kind, num_outputs) in tasks.items():
            if kind not in CLASSIFICATION_KINDS:
                raise ValueError(f"task {name!r}: kind must be one of {CLASSIFICATION_KINDS}, got {kind!r}")
            minimum = 2 if kind == "multiclass" else 1
            if num_outputs < minimum or (kind == "binary" and num_outputs != 1):
                raise ValueError(f"task {name!r}: a {kind} task cannot have {num_outputs} outputs")
        self.tasks = dict(tasks)

    def forward(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        losses = {}
        for name, (kind, num_outputs) in self.tasks.items():
            if name not in targets:
                continue
            out, target = logits[name], targets[name]
            if out.ndim != 2 or out.shape[1] != num_outputs:
                raise ValueError(f"task {name!r}: expected logits (B, {num_outputs}), got {tuple(out.shape)}")
            if kind == "multiclass":
                target = target.reshape(-1)
                known = target >= 0  # False for -1 and NaN
                if known.any():
                    losses[name] = F.cross_entropy(out[known], target[known].long())
                continue
            target = target.reshape(out.shape).to(out.dtype)
            known = target >= 0
            if known.any():
                losses[name] = F.binary_cross_entropy_with_logits(out[known], target[known])
        return losses


class LossBalancer(nn.Module):
    """Base class: combines a dictionary of task losses (any subset of ``tasks``) into one total.

    It is an ``nn.Module`` so learnable weights are saved with the checkpoint and, where they are trained
    by the main optimizer (uncertainty weighting), reach it through ``balancer.parameters()``.
    """

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("a loss balancer needs at least one task, got none")

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current weight of every task, for logging."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step; a no-op unless a balancer needs it."""

    def _present(self, losses: Mapping[str, Tensor]) -> list[str]:
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"losses for unknown tasks {unknown}; the balancer knows {self.tasks}")
        present = [t for t in self.tasks if t in losses]
        if not present:
            raise ValueError(f"no task loss to balance; the balancer knows {self.tasks}")
        return present


class FixedWeights(LossBalancer):
    """Total = sum_i w_i * L_i over the tasks present, with constant weights."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__(weights)
        self._weights = {t: float(w) for t, w in weights.items()}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        return sum(self._weights[t] * losses[t] for t in self._present(losses))

    def weights(self) -> dict[str, float]:
        return dict(self._weights)


class UncertaintyWeighting(LossBalancer):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    One learnable s_i = log sigma_i^2 per task (initialised to 0) and
    total = sum_i exp(-s_i) * L_i + s_i over the tasks present. This is the common simplified form,
    the same for regression and classification (the paper's 1/2 factors dropped). Its minimum in s_i is
    at s_i = log L_i, so a task with a large loss is weighted down by 1 / L_i; the ``+ s_i`` term stops
    the weights from collapsing to zero. The s_i are trained by the main optimizer with the model.
    """

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__(tasks)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        return sum(torch.exp(-self.log_vars[t]) * losses[t] + self.log_vars[t] for t in self._present(losses))

    def weights(self) -> dict[str, float]:
        return {t: float(torch.exp(-s.detach())) for t, s in self.log_vars.items()}


class GradNorm(LossBalancer):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018): balance tasks by gradient size.

    At each call (each micro-batch under gradient accumulation), for the tasks present:
    G_i = ||d(w_i L_i)/d(shared)|| over ``shared_parameters`` (the shared encoder's last layer), relative inverse
    training rate r_i = L~_i / mean_j L~_j with L~_i = L_i / L_i(0), L_i(0) being the loss at the first step the task
    appeared. The weights move to reduce sum_i |G_i - mean(G) * r_i^alpha| (target held constant), so a task whose
    loss falls more slowly gets a larger weight. This update runs inside ``forward`` with its own Adam optimizer
    (learning rate ``lr``; its state is checkpointed through ``extra_state``), after which the weights of the tasks
    present are clamped positive and rescaled to their previous sum, so all weights keep summing to the number of
    tasks and an absent task's weight is left as it was. The returned total, sum_i w_i * L_i with the pre-update
    weights detached, keeps the graph for the network's backward; the main optimizer sees no gradient on w. The
    update is skipped in eval mode or under ``torch.no_grad()``.

    Args:
        tasks: task names.
        shared_parameters: parameters whose gradient norms are compared; not registered here.
        alpha: strength of the pull towards equal training rates (paper: 0.12 to 3).
        lr: learning rate of the weights' optimizer.
    """

    def __init__(
        self, tasks: Iterable[str], shared_parameters: Iterable[nn.Parameter], alpha: float = 1.5, lr: float = 0.025
    ) -> None:
        super().__init__(tasks)
        self.shared_parameters = [p for p in shared_parameters if p.requires_grad]
        if not self.shared_parameters:
            raise ValueError("GradNorm needs shared_parameters that require grad, got none")
        if alpha < 0:
            raise ValueError(f"GradNorm alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))
        self._optimizer = torch.optim.Adam([self.task_weights], lr=lr)

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        present = self._present(losses)
        index = torch.tensor([self.tasks.index(t) for t in present], device=self.task_weights.device)
        weights = self.task_weights.detach()[index]  # a copy: the update below does not change it
        total = sum(w * losses[t] for w, t in zip(weights, present))
        if self.training and torch.is_grad_enabled():
            self._update_weights(present, index, losses)
        return total

    def _update_weights(self, present: list[str], index: Tensor, losses: Mapping[str, Tensor]) -> None:
        values = torch.stack([losses[t].detach().float() for t in present]).to(self.initial_losses.device)
        if not torch.isfinite(values).all():
            return  # a non-finite loss (the trainer skips such a step) would make the weights NaN for good
        first_seen = torch.isnan(self.initial_losses[index])
        self.initial_losses[index[first_seen]] = values[first_seen]
        grad_norms = []
        for t in present:
            grads = torch.autograd.grad(losses[t], self.shared_parameters, retain_graph=True, allow_unused=True)
            if all(g is None for g in grads):
                raise RuntimeError(f"GradNorm: task {t!r} has no gradient on the shared layer, so its weight could not "
                                   f"be balanced; the shared layer must be one every task's loss passes through")
            squares = [(g.detach().float() ** 2).sum() for g in grads if g is not None]
            grad_norms.append(torch.sqrt(sum(squares, self.task_weights.new_zeros(()))))
        # G_i = w_i * ||dL_i/dW||: w_i factors out, so no second-order graph is needed.
        norms = self.task_weights[index] * torch.stack(grad_norms).to(self.task_weights.device)
        if not torch.isfinite(norms).all():
            return
        ratios = values / self.initial_losses[index].clamp_min(1e-12)
        target = norms.mean().detach() * (ratios / ratios.mean()) ** self.alpha
        before = self.task_weights.detach().clone()
        self._optimizer.zero_grad()
        (norms - target).abs().sum().backward(inputs=[self.task_weights])
        self._optimizer.step()  # Adam momentum would also move absent tasks: they are restored below
        self.task_weights.grad = None
        with torch.no_grad():
            updated = self.task_weights[index].clamp(min=1e-3)
            before[index] = updated * before[index].sum() / updated.sum()
            self.task_weights.copy_(before)

    def weights(self) -> dict[str, float]:
        return {t: float(w) for t, w in zip(self.tasks, self.task_weights.detach())}

    def extra_state(self) -> dict[str, Any]:
        """The weights' own Adam state (moments, step count): checkpointed beside the main optimizer's, so a resumed
        run updates the weights as an uninterrupted one would."""
        return {"optimizer": self._optimizer.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if state.get("optimizer"):  # absent in checkpoints written before it was saved: Adam starts afresh
            self._optimizer.load_state_dict(state["optimizer"])


def loss_head(task: str) -> str:
    """The head a loss term belongs to: ``segmentation``, ``detection``, or ``classification`` for ``class:TASK``
    (and a plugin's auxiliary ``aux:TASK``)."""
    return "classification" if task.startswith(("class:", "aux:")) else task


def build_balancer(
    kind: str,
    tasks: Iterable[str],
    weights: Mapping[str, float] | None = None,
    shared_parameters: Iterable[nn.Parameter] | None = None,
    alpha: float = 1.5,
) -> LossBalancer:
    """Balancer by name: "fixed" (``weights``; a task not named weighs 1, a name that is no task is refused),
    "uncertainty" or "gradnorm"."""
    tasks = list(tasks)
    if kind == "fixed":
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ValueError(f"fixed weights are given for {unknown}, which are not tasks of this model; its tasks "
                             f"are {tasks}")
        return FixedWeights({t: float(weights.get(t, 1.0)) for t in tasks})
    if kind == "uncertainty":
        return UncertaintyWeighting(tasks)
    if kind == "gradnorm":
        if shared_parameters is None:
            raise ValueError("the gradnorm balancer needs shared_parameters (the shared encoder's last layer)")
        return GradNorm(tasks, shared_parameters, alpha=alpha)
    raise ValueError(f"loss balancer must be one of {BALANCERS}, got {kind!r}")
