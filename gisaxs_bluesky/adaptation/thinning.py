"""Binomial thinning: one photon-counting frame -> two statistically independent Poisson halves.

If a pixel counts k ~ Poisson(lambda) photons and each photon is kept with probability p, the
kept k1 ~ Binomial(k, p) and the rest k2 = k - k1 are independent, k1 ~ Poisson(p lambda) and
k2 ~ Poisson((1 - p) lambda). The two halves are two measurements of one sample with
independent noise: what Noise2Noise needs, and what a binner's within-identity spread is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ThinningError", "ThinnedPair", "binomial_split", "flagged_pixels"]

#: values a counting detector writes for pixels that carry no count (Pilatus: -1 gap, -2 bad)
DETECTOR_FLAGS = (-1, -2)


class ThinningError(ValueError):
    """A frame that is not a photon-counting frame (non-integer or negative counts)."""


@dataclass(frozen=True)
class ThinnedPair:
    """The two halves of one frame; flagged and masked pixels are copied into both unchanged."""

    a: np.ndarray  # kept photons, mean p * lambda
    b: np.ndarray  # the rest, mean (1 - p) * lambda
    p: float
    excluded: np.ndarray  # (H, W) bool: flagged (-1, -2, non-finite) or masked, not thinned


def flagged_pixels(frame: np.ndarray) -> np.ndarray:
    """Pixels the detector flagged: -1 / -2 (Pilatus gap / bad) and non-finite values."""
    frame = np.asarray(frame)
    flags = np.isin(frame, DETECTOR_FLAGS)
    if frame.dtype.kind == "f":
        flags |= ~np.isfinite(frame)
    return flags


def binomial_split(
    frame: np.ndarray,
    p: float = 0.5,
    *,
    mask: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
    name: str = "frame",
) -> ThinnedPair:
    """Split a counting frame into k1 ~ Binomial(k, p) and k2 = k - k1 (same dtype as ``frame``).

    Pixels the detector flagged (-1, -2, NaN/inf) and ``mask`` pixels (True = not data) are not
    thinned: both halves keep their value, so they stay flagged / masked in both. Every other
    pixel must hold a non-negative integer count; anything else raises :class:`ThinningError`
    naming the first offending pixel (an integrating detector: convert ADU to photons first,
    :func:`gisaxs_bluesky.adaptation.gain.to_photon_counts`).
    """
    if not 0 < float(p) < 1:
        raise ValueError(f"split fraction p={p} must be in (0, 1)")
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ThinningError(f"{name}: expected a 2-D frame, got shape {frame.shape}")
    if frame.dtype.kind not in "iuf":
        raise ThinningError(f"{name}: dtype {frame.dtype} is not a count type")
    excluded = flagged_pixels(frame)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != frame.shape:
            raise ValueError(f"{name}: mask shape {mask.shape} does not match frame {frame.shape}")
        excluded = excluded | mask
    counts = frame[~excluded]
    if frame.dtype.kind == "f":
        bad = counts != np.round(counts)
        if bad.any():
            _raise_at(frame, excluded, bad, name, "is not an integer count")
    negative = counts < 0
    if negative.any():
        _raise_at(frame, excluded, negative, name, "is a negative count")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    k = counts.astype(np.int64)
    k1 = gen.binomial(k, float(p))
    a = frame.copy()
    b = frame.copy()
    a[~excluded] = k1
    b[~excluded] = k - k1
    return ThinnedPair(a=a, b=b, p=float(p), excluded=excluded)


def _raise_at(frame, excluded, bad, name, what) -> None:
    rows, cols = np.nonzero(~excluded)
    i = int(np.argmax(bad))
    r, c = int(rows[i]), int(cols[i])
    raise ThinningError(
        f"{name}: pixel ({r}, {c}) = {frame[r, c].item()} {what} ({int(bad.sum())} such pixels); "
        "binomial thinning needs photon counts: convert an integrating detector's ADU with "
        "gisaxs_bluesky.adaptation.gain.to_photon_counts, or mask the pixels"
    )
