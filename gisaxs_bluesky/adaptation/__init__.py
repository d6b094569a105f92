"""Self-supervised adaptation of the DAE to one beamtime's own, unlabelled frames."""

from .gain import GainError, GainEstimate, estimate_gain, looks_counting, to_photon_counts
from .sources import (
    AdaptationError,
    FileSource,
    FrameSource,
    RunSource,
    SourceFrame,
    collect_frames,
    read_detector_file,
)
from .thinning import ThinnedPair, ThinningError, binomial_split, flagged_pixels

__all__ = [
    "AdaptationError",
    "FileSource",
    "FrameSource",
    "RunSource",
    "SourceFrame",
    "collect_frames",
    "read_detector_file",
    "GainError",
    "GainEstimate",
    "ThinnedPair",
    "ThinningError",
    "binomial_split",
    "estimate_gain",
    "flagged_pixels",
    "looks_counting",
    "to_photon_counts",
]
