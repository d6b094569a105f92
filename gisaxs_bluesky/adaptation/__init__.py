"""Self-supervised adaptation of the DAE to one beamtime's own, unlabelled frames."""

from .adapt_config import AdaptConfig
from .calibration import CalibrationConfig, calibrate_from_groups
from .detector_files import read_detector_file
from .errors import AdaptationError
from .finetune import (
    AdaptResult,
    adapt,
    list_adapted,
    load_adapted,
    model_cache_dir,
    resolve_model,
)
from .gain import GainError, GainEstimate, estimate_gain, looks_counting, to_photon_counts
from .noise_model import fit_noise_model
from .sources import (
    ArraySource,
    FileSource,
    FrameSource,
    RunSource,
    SourceFrame,
    collect_frames,
)
from .thinning import ThinnedPair, ThinningError, binomial_split, flagged_pixels

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "AdaptationError",
    "ArraySource",
    "CalibrationConfig",
    "FileSource",
    "FrameSource",
    "GainError",
    "GainEstimate",
    "RunSource",
    "SourceFrame",
    "ThinnedPair",
    "ThinningError",
    "adapt",
    "binomial_split",
    "calibrate_from_groups",
    "collect_frames",
    "estimate_gain",
    "fit_noise_model",
    "flagged_pixels",
    "list_adapted",
    "load_adapted",
    "looks_counting",
    "model_cache_dir",
    "read_detector_file",
    "resolve_model",
    "to_photon_counts",
]
