"""Classification head: gated attention pooling over the deepest feature map, one pooling per task.

Gated attention-based multiple-instance pooling (Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance
Learning", ICML 2018): every voxel (token) of the deepest map gets a score ``w^T (tanh(V h) * sigmoid(U h))``; the
image vector is the softmax-weighted mean of the tokens. Unlike global average pooling, a small tumour can dominate the
vector of a large scan, and each task learns where to look.

Scores and values depend on one token each, so pooling splits into ``encode`` (per window) and ``pool`` (over any set
of tokens): at sliding-window inference the predictor concatenates scores and values of all windows (and of their
test-time mirrored copies) along the token axis and pools once over that set. This equals pooling the whole scan in
one window only where windows tile the scan without overlap and their features match a whole-scan pass; overlapping
windows count their shared tokens once per window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medtriad.models.encoders.base import FeatureInfo


class _GatedAttention(nn.Module):
    """Token scores (B, N, D) -> (B, N): ``w^T (tanh(V h) * sigmoid(U h))``."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh())
        self.sigmoid_branch = nn.Sequential(nn.Linear(channels, hidden), nn.Sigmoid())
        self.score = nn.Linear(hidden, 1, bias=False)  # softmax ignores a shared offset

    def forward(self, tokens: Tensor) -> Tensor:
        return self.score(self.tanh_branch(tokens) * self.sigmoid_branch(tokens)).squeeze(-1)


class ClassificationHead(nn.Module):
    """One gated-attention pooling and one linear classifier per task, on the deepest feature map.

    Args:
        feature_info: the encoder's levels (channels, stride), fine to coarse; only the last one is used.
        tasks: task name -> number of logits (1 for a binary task, K for K classes or K labels).
        hidden: width of the attention branches.
        dropout: dropout on the pooled vector before each classifier.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], tasks: Mapping[str, int], hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        if not tasks:
            raise ValueError("ClassificationHead needs at least one task, got none")
        bad = {name: n for name, n in tasks.items() if n < 1}
        if bad:
            raise ValueError(f"every task needs at least 1 logit, got {bad}")
        channels = feature_info[-1].channels
        self.attention = nn.ModuleDict({name: _GatedAttention(channels, hidden) for name in tasks})
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleDict({name: nn.Linear(channels, n) for name, n in tasks.items()})

    def encode(self, features: Sequence[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Deepest map (B, D, x, y, z) -> per task (scores (B, N), values (B, N, D)), N = x * y * z tokens."""
        tokens = features[-1].flatten(2).transpose(1, 2)
        return {name: (attention(tokens), tokens) for name, attention in self.attention.items()}

    @staticmethod
    def pool(scores: Tensor, values: Tensor) -> Tensor:
        """Attention-weighted mean of the tokens: scores (B, N), values (B, N, D) -> (B, D)."""
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("bn,bnd->bd", weights, values)

    def decode(self, task: str, pooled: Tensor) -> Tensor:
        """pooled (B, D) -> logits (B, n) of ``task``."""
        if task not in self.classifiers:
            raise ValueError(f"unknown classification task {task!r}; known tasks: {', '.join(self.classifiers)}")
        return self.classifiers[task](self.dropout(pooled))

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """features (fine -> coarse) -> {task: logits (B, n)}."""
        return {task: self.decode(task, self.pool(scores, values))
                for task, (scores, values) in self.encode(features).items()}
