"""Encoders: shared backbones that return multi-scale features; importing this package registers all of them."""

from medtriad.models.encoders.base import (
    Encoder,
    FeatureInfo,
    create_encoder,
    list_encoders,
    register_encoder,
)
from medtriad.models.encoders.resenc import ResEncEncoder
from medtriad.models.encoders.segresnet import SegResNetEncoder
from medtriad.models.encoders.swin import SwinEncoder

__all__ = [
    "Encoder",
    "FeatureInfo",
    "ResEncEncoder",
    "SegResNetEncoder",
    "SwinEncoder",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]
