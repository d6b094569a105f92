"""Plot of an adaptive scan: measured frames by bin, outliers, and suggested points."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .results import ScanResults
from .suggest import Suggestion

__all__ = ["plot_suggestions"]

_REASON_STYLE = {
    "refine_outlier": ("tab:red", "v"),
    "bin_boundary": ("tab:blue", "^"),
    "remeasure_noise": ("tab:green", "s"),
}


def plot_suggestions(
    results: ScanResults,
    suggestions: Sequence[Suggestion] | Any = (),
    *,
    motor: str | None = None,
    path: str | Path | None = None,
    regions: Sequence[tuple[float, float, str]] = (),
    title: str = "",
) -> Any:
    """Outlier score vs position (colour = bin, x = outlier) with suggestions as markers.

    ``suggestions`` is a list of :class:`Suggestion` or the DataFrame of
    :func:`~gisaxs_bluesky.adaptive.tiled_io.read_suggestions`; ``regions`` are shaded
    ``(low, high, label)`` spans (e.g. true defect regions). Saves a PNG to ``path`` if given and
    returns the matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    motor = motor or results.motors[0]
    if motor not in results.positions:
        raise ValueError(f"motor={motor!r} is not one of the results' motors {results.motors}")
    x = results.positions[motor]
    score = np.nan_to_num(results.outlier_score, nan=0.0, posinf=10.0)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    for lo, hi, label in regions:
        for a in (ax, ax2):
            a.axvspan(lo, hi, color="0.85", zorder=0)
        ax.text((lo + hi) / 2, 0.98, label, transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8)
    bins = results.bin_id
    cmap = plt.get_cmap("tab10")
    for b in np.unique(bins):
        sel = bins == b
        ax.scatter(x[sel], score[sel], s=28, color="k" if b < 0 else cmap(int(b) % 10),
                   label="unexplained" if b < 0 else f"bin {b}", zorder=3)
    out = results.is_outlier
    ax.scatter(x[out], score[out], s=90, marker="x", color="tab:red", label="outlier", zorder=4)
    ax.axhline(1.0, color="tab:red", lw=0.8, ls="--")
    ax.set_ylabel("outlier score")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    # measured order (seq_num) below, suggestions marked by reason
    ax2.scatter(x, results.seq_num, s=10, color="0.3")
    rows = _suggestion_rows(suggestions, motor)
    # suggestions not measured yet sit on a line just above the last measured frame
    pending = float(np.nanmax(results.seq_num)) + 3 if len(results.seq_num) else 1.0
    rows = [(p, r, pending if np.isnan(q) else q) for p, r, q in rows]
    for reason, (color, marker) in _REASON_STYLE.items():
        pts = [(p, q) for p, r, q in rows if r == reason]
        if pts:
            ax2.scatter([p for p, _ in pts], [q for _, q in pts], s=40, marker=marker,
                        facecolor="none", edgecolor=color, label=reason)
    ax2.set_ylabel("seq_num")
    ax2.set_xlabel(motor)
    if rows:
        ax2.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _suggestion_rows(suggestions: Any, motor: str) -> list[tuple[float, str, float]]:
    """(position, reason, seq_num or nan) for lists of Suggestion or a suggestions DataFrame."""
    if hasattr(suggestions, "iterrows"):
        return [(float(r[motor]), str(r["reason"]),
                 float(r["seq_num"]) if r["seq_num"] >= 0 else np.nan)
                for _, r in suggestions.iterrows()]
    return [(float(s.position[motor]), s.reason, np.nan) for s in suggestions]
