"""The one exception of the frame-source layer."""

from __future__ import annotations

__all__ = ["FrameSourceError"]


class FrameSourceError(ValueError):
    """A frame or document that cannot be turned into a frame; the message names what and why."""
