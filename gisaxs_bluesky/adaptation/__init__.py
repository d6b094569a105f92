"""Self-supervised adaptation of the DAE to one beamtime's own, unlabelled frames."""

from .thinning import ThinnedPair, ThinningError, binomial_split, flagged_pixels

__all__ = ["ThinnedPair", "ThinningError", "binomial_split", "flagged_pixels"]
