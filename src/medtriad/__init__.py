"""medtriad: one model that detects, segments and classifies in 3D medical images."""

__version__ = "0.1.0"
