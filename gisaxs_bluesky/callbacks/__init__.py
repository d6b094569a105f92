"""Bluesky callbacks: live DAE binning of detector frames into Tiled."""

from .dae_binning import (
    DAEBinningCallback,
    default_binner_path,
    find_image_key,
    scanned_motors,
    serialized,
)

__all__ = [
    "DAEBinningCallback",
    "default_binner_path",
    "find_image_key",
    "scanned_motors",
    "serialized",
]
