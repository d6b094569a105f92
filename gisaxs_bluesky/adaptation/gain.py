"""Gain of an integrating detector (CCD) from its own frames: ADU -> photon counts.

Photon transfer: a pixel that collects N ~ Poisson(lambda) photons reads
ADU = g N + offset + e, e ~ Normal(0, sigma_read), so over pixels of one mean level

    Var(ADU) = g (Mean(ADU) - offset) + sigma_read^2 = g Mean + c,  c = sigma_read^2 - g offset.

The slope is the gain g (ADU per photon). Mean and variance come from

* repeated frames of one sample (N >= 2, same shape): per pixel, across the frames; or
* one frame: per 8 x 8 patch, the mean, and the noise variance from second differences along
  rows, x[j] - (x[j-1] + x[j+1]) / 2, which cancel the pattern where it is locally linear
  (Var = 1.5 sigma^2 for independent pixels).

Pixels (binned by their 5 x 5 local mean) / patches (by their mean) fall into 40 quantile
bins; per bin the mean variance enters a weighted straight-line fit, refit without the bins
that lie > 3 sigma above it (curved pattern near peaks, hot pixels). The line alone cannot
separate the offset from the read noise: ``dark`` frames (or a mask of pixels that see no
photons, e.g. behind the beamstop) give both; without them the frame is taken as
dark-subtracted (offset 0, as the simulator and most CCD pipelines write it), and the
intercept is kept in the estimate so that a wrong assumption shows as sigma_read^2 < 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .thinning import flagged_pixels

__all__ = [
    "COUNTING_GAIN_BAND",
    "GainError",
    "GainEstimate",
    "counting_by_gain",
    "gain_check_report",
    "estimate_gain",
    "looks_counting",
    "to_photon_counts",
]

#: photon-transfer gains (ADU per photon) of integer frames read as a counting detector's: a
#: pixel-to-pixel flat-field response inflates the single-frame estimate of a counting frame
#: (1.39-1.40 with a 12 % flat field at ~200 counts, tests/adaptation/test_gain.py), while
#: integrating detectors sit well outside
COUNTING_GAIN_BAND = (0.7, 1.5)


class GainError(ValueError):
    """The frames do not allow a gain estimate (too few valid pixels, no mean range...)."""


@dataclass(frozen=True)
class GainEstimate:
    """ADU = gain * photons + offset + Normal(0, read_noise_adu)."""

    gain_adu_per_photon: float
    offset_adu: float
    read_noise_adu: float
    intercept_adu2: float  # c of Var = g Mean + c
    method: str  # "repeated-frames" | "single-frame-patches" | "given"
    offset_source: str  # "given" | "dark frames" | "dark pixels" | "assumed 0 (dark-subtracted)"
    n_points: int  # pixels or patches that entered the fit
    n_bins: int
    gain_stderr: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def given(cls, gain: float) -> GainEstimate:
        """A gain the user gave (``--gain``): no estimate, offset and read noise 0."""
        return cls(float(gain), 0.0, 0.0, 0.0, "given", "given", 0, 0)


def looks_counting(frame: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """True when every unflagged, unmasked pixel holds a non-negative integer (a counting
    detector, or an integrating one whose ADU happen to be integers: see :func:`estimate_gain`)."""
    frame = np.asarray(frame)
    keep = ~flagged_pixels(frame)
    if mask is not None:
        keep &= ~np.asarray(mask, dtype=bool)
    values = frame[keep]
    if values.size == 0:
        return False
    if frame.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        return False
    return bool(values.min() >= 0)


def counting_by_gain(frame: np.ndarray, mask: np.ndarray | None = None
                     ) -> tuple[bool, GainEstimate | str]:
    """Is an integer, non-negative frame (:func:`looks_counting`) a counting detector's? Yes when
    its photon-transfer gain lies in :data:`COUNTING_GAIN_BAND` or within 3 standard errors of
    1 (a 16-bit CCD's ADU are integers too); a frame too irregular for a gain estimate is
    taken as counting. Returns the answer and the estimate (or why there is none): the one
    rule of ``adapt`` and the noise-model fit."""
    try:
        est = estimate_gain(frame, mask)
    except GainError as exc:
        return True, f"not possible ({exc}); integer counts taken as photons"
    g, err = est.gain_adu_per_photon, est.gain_stderr
    lo, hi = COUNTING_GAIN_BAND
    return bool(lo <= g <= hi or abs(g - 1) <= 3 * err), est


def gain_check_report(estimate: GainEstimate | str) -> dict | str:
    """What a report records of :func:`counting_by_gain`'s estimate (adapt's detector report
    and the noise-model fit's write the same)."""
    return estimate.to_dict() if isinstance(estimate, GainEstimate) else estimate


def _valid(frames: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    valid = ~np.any([flagged_pixels(f) for f in frames], axis=0)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != frames.shape[1:]:
            raise GainError(f"mask shape {mask.shape} does not match frames {frames.shape[1:]}")
        valid &= ~mask
    return valid


def _patch_stats(frame: np.ndarray, valid: np.ndarray, patch: int) -> tuple[np.ndarray, ...]:
    """Per patch (all pixels valid): mean, noise variance from second differences, dof."""
    h, w = (s // patch * patch for s in frame.shape)
    x = frame[:h, :w].astype(np.float64)
    ok = valid[:h, :w]
    hp, wp = h // patch, w // patch
    blocks = x.reshape(hp, patch, wp, patch).transpose(0, 2, 1, 3)
    good = ok.reshape(hp, patch, wp, patch).all(axis=(1, 3))
    d = blocks[..., 1:-1] - 0.5 * (blocks[..., :-2] + blocks[..., 2:])
    # ddof=0: the second differences of a row are correlated (-2/3 between neighbours), and
    # their sum telescopes; the plain mean square about the mean is then unbiased to 0.2 %
    var = d.reshape(hp, wp, -1).var(axis=-1) / 1.5
    mean = blocks.reshape(hp, wp, -1).mean(axis=-1)
    good &= var > 0  # constant fill (inactive area, saturated block) carries no noise
    return mean[good], var[good], patch * (patch - 2) - 1


def _binned_fit(mean: np.ndarray, var: np.ndarray, dof: int, n_bins: int,
                level: np.ndarray | None = None) -> tuple[float, float, float, int]:
    """Weighted line var = g mean + c through per-bin mean variances; (g, c, stderr g, bins).

    Points are binned by ``level`` (default: ``mean``): a level that is not the sample mean
    itself keeps the selection from favouring points whose noise drew high (Poisson sample
    mean and variance are correlated)."""
    level = mean if level is None else level
    lo, hi = np.quantile(level, [0.01, 0.99])
    keep = (level >= lo) & (level <= hi)
    mean, var, level = mean[keep], var[keep], level[keep]
    edges = np.unique(np.quantile(level, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, len(edges) - 2)
    m, v, n = [], [], []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.sum() < 8:
            continue
        mb, vb = mean[sel], var[sel]
        # the mean variance, without gross outliers (hot pixels, zingers); a median would
        # need the variance distribution's shape, which Poisson noise at low counts skews
        m.append(mb.mean())
        v.append(vb[vb < 20 * np.median(vb)].mean())
        n.append(sel.sum())
    m, v, n = np.array(m), np.array(v), np.array(n)
    if len(m) < 3 or np.ptp(m) <= 0:
        raise GainError(
            f"only {len(m)} mean level(s) with enough pixels: the frames need a range of "
            "intensities to estimate a gain"
        )
    use = np.ones(len(m), bool)
    for _ in range(3):
        # Var of a bin's variance level ~ 2 v^2 / (dof n): weights n / v^2
        wts = n[use] / np.maximum(v[use], 1e-12) ** 2
        A = np.stack([m[use], np.ones(use.sum())], axis=1)
        cov = np.linalg.inv(A.T @ (A * wts[:, None]))
        g, c = cov @ (A.T @ (wts * v[use]))
        resid = (v - (g * m + c)) / (v * np.sqrt(2 / (dof * n)))
        new = resid < 3
        if new.sum() < 3 or np.array_equal(new, use):
            break
        use = new
    stderr = float(np.sqrt(cov[0, 0]) * max(1.0, np.sqrt(np.mean(resid[use] ** 2))))
    return float(g), float(c), stderr, int(use.sum())


def estimate_gain(
    frames: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    dark: np.ndarray | None = None,
    offset_adu: float | None = None,
    patch: int = 8,
    n_bins: int = 40,
) -> GainEstimate:
    """Gain, offset and read noise from one frame (H, W) or repeated frames (N, H, W).

    ``dark``: dark frames (H, W) or (N, H, W) taken without beam, or a boolean (H, W) mask of
    pixels that see no photons; ``offset_adu`` a known offset. See the module docstring.
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[0] == 0:
        raise GainError(f"expected a frame (H, W) or frames (N, H, W), got shape {frames.shape}")
    valid = _valid(frames, mask)
    if dark is not None:
        dark = np.asarray(dark)
        if dark.shape[-2:] != frames.shape[1:] or dark.ndim not in (2, 3):
            kind = "dark mask" if dark.dtype == bool else "dark frames"
            raise GainError(f"{kind} shape {dark.shape} does not match the frames' "
                            f"{frames.shape[1:]}")
    if frames.shape[0] >= 2:
        x = frames.astype(np.float64)
        mean_img = x.mean(axis=0)
        # binned by the 5 x 5 local mean of valid pixels: the pattern is smooth on that scale
        w = ndimage.uniform_filter(valid.astype(np.float64), 5)
        smooth = ndimage.uniform_filter(np.where(valid, mean_img, 0), 5) / np.maximum(w, 1e-9)
        mean, var = mean_img[valid], x[:, valid].var(axis=0, ddof=1)
        good = var > 0
        g, c, err, used = _binned_fit(mean[good], var[good], frames.shape[0] - 1, n_bins,
                                      smooth[valid][good])
        method, n_points = "repeated-frames", int(good.sum())
    else:
        mean, var, dof = _patch_stats(frames[0], valid, patch)
        if len(mean) < 50:
            raise GainError(f"only {len(mean)} fully valid {patch} x {patch} patches: too few "
                            "for a gain estimate")
        g, c, err, used = _binned_fit(mean, var, dof, n_bins)
        method, n_points = "single-frame-patches", len(mean)
    if not g > 3 * err:
        raise GainError(f"variance does not grow with the mean (slope {g:.3g} +- {err:.2g}): "
                        "not a photon signal, too small a range of intensities, or frames "
                        "that differ by more than noise")
    offset, read2, source = 0.0, c, "assumed 0 (dark-subtracted)"
    if offset_adu is not None:
        offset, source = float(offset_adu), "given"
        read2 = c + g * offset
    if dark is not None:
        if dark.dtype == bool:
            values = frames[:, dark & valid].astype(np.float64)
            if values.size < 10:
                raise GainError("the dark-pixel mask selects fewer than 10 valid pixels")
            offset, source = float(np.median(values)), "dark pixels"
            read2 = float(values.var(axis=1, ddof=1).mean())
        else:
            d = dark[None] if dark.ndim == 2 else dark
            values = d.astype(np.float64)[:, valid]
            offset, source = float(np.median(values)), "dark frames"
            # the spread of one dark frame about its per-pixel level: across frames if several
            read2 = float(values.var(axis=0, ddof=1).mean() if len(d) > 1 else values.var())
    return GainEstimate(
        gain_adu_per_photon=g, offset_adu=offset, read_noise_adu=float(np.sqrt(max(read2, 0.0))),
        intercept_adu2=c, method=method, offset_source=source, n_points=n_points, n_bins=used,
        gain_stderr=err,
    )


def to_photon_counts(frame: np.ndarray, estimate: GainEstimate) -> np.ndarray:
    """int32 photon counts round((ADU - offset) / gain), clipped at 0; flagged pixels (-1, -2,
    non-finite) read -1, so they stay flagged. Read noise stays in the counts (sigma_read /
    gain photons): thinning then splits it too, which is small when that is below 1 photon."""
    frame = np.asarray(frame)
    flags = flagged_pixels(frame)
    x = np.where(flags, 0, frame).astype(np.float64)
    counts = np.rint((x - estimate.offset_adu) / estimate.gain_adu_per_photon)
    counts = np.clip(counts, 0, np.iinfo(np.int32).max).astype(np.int32)
    counts[flags] = -1
    return counts
