"""The error of the adaptation package."""

from __future__ import annotations

__all__ = ["AdaptationError"]


class AdaptationError(ValueError):
    """Adaptation cannot start or go on: an empty set, an unreadable source, bad input."""
