"""The encoder interface every head relies on, and the registry that builds encoders by name.

An encoder maps an image batch (B, C, X, Y, Z) to a list of feature maps, fine to coarse, whose channels and strides
are declared up front in ``feature_info``. Heads are built from ``feature_info`` alone, so any registered encoder works
with any head, and configs name encoders by string (``create_encoder("resenc", in_channels=4)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureInfo:
    """One level of an encoder's output: a map with ``channels`` channels at 1/``stride`` of the input size."""

    channels: int
    stride: int


class Encoder(nn.Module):
    """Base class of all encoders.

    Subclasses set ``in_channels``, ``feature_info`` (fine -> coarse, strides strictly increasing, the first 1 or 2) and
    ``size_divisible``, and implement ``forward_features`` and ``last_shared_layer``. ``forward`` checks the input
    first, so every encoder rejects a wrong channel count or spatial size with the same clear error instead of failing
    deep inside a convolution or a window partition.
    """

    in_channels: int
    feature_info: list[FeatureInfo]
    size_divisible: int

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, in_channels, X, Y, Z) -> one map (B, info.channels, X/info.stride, ...) per ``feature_info`` entry."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % self.size_divisible for s in spatial):
            raise ValueError(
                f"{type(self).__name__} needs spatial sizes that are multiples of {self.size_divisible}, got {spatial}"
            )
        return self.forward_features(x)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def last_shared_layer(self, level: int = -1) -> nn.Module:
        """The deepest module that the feature maps of ``level`` (an index into ``feature_info``) and of every deeper
        level all depend on: a head that reads ``level`` or a deeper one sends its gradient through it. GradNorm
        measures per-task gradient norms on its parameters, for the shallowest of the heads' deepest levels
        (:meth:`medtriad.models.multitask.MultiTaskModel.last_shared_layer`)."""
        raise NotImplementedError


_ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(name: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator: make an ``Encoder`` subclass buildable as ``create_encoder(name, ...)``."""

    def register(cls: type[Encoder]) -> type[Encoder]:
        if name in _ENCODERS:
            raise ValueError(f"encoder name {name!r} is already registered by {_ENCODERS[name].__name__}")
        _ENCODERS[name] = cls
        return cls

    return register


def create_encoder(name: str, in_channels: int, **kwargs) -> Encoder:
    """Build the encoder registered as ``name``; ``kwargs`` go to its constructor (e.g. ``embed_dim=12``)."""
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}")
    return _ENCODERS[name](in_channels=in_channels, **kwargs)


def list_encoders() -> list[str]:
    """Names of all registered encoders, sorted."""
    return sorted(_ENCODERS)
