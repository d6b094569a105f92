"""Adaptive scanning from live DAE results: suggest where to measure next.

* :mod:`.core` -- pure functions: per-frame outlier scores, bins and positions -> suggestions.
* :mod:`.optimizer` -- a bluesky-adaptive 1.0 ``Optimizer`` (``suggest``/``ingest`` with ``_id``).
* :mod:`.plans` -- :func:`adaptive_scan`, coarse grid + live refinement in one run.
* :mod:`.live` -- result sources for the plan (the DAE binning callback, or a light encoder).
* :mod:`.tiled_io` -- suggestions stored in Tiled beside the derived data.
* :mod:`.plot` -- :func:`plot_suggestions` for reports.
"""

from .live import DerivedCallbackResults, LiveEncoder, ResultsSource
from .optimizer import DAEOptimizer, LiveEvaluation
from .plans import Suggester, adaptive_scan
from .plot import plot_suggestions
from .results import ScanResults
from .scenes import defect_scene, exposure_frame_fn
from .suggest import (
    REASONS,
    SuggestConfig,
    Suggestion,
    check_limits,
    suggest_points,
)
from .tiled_io import SuggestionWriter, read_suggestions, suggestions_key

__all__ = [
    "DAEOptimizer",
    "DerivedCallbackResults",
    "LiveEncoder",
    "LiveEvaluation",
    "REASONS",
    "ResultsSource",
    "ScanResults",
    "SuggestConfig",
    "Suggester",
    "Suggestion",
    "SuggestionWriter",
    "adaptive_scan",
    "check_limits",
    "defect_scene",
    "exposure_frame_fn",
    "plot_suggestions",
    "read_suggestions",
    "suggest_points",
    "suggestions_key",
]
