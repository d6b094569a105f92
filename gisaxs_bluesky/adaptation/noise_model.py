"""Fit a per-instrument noise model from a beamtime's own frames (real-noise transfer).

Frames come from the same sources as ``adapt`` (files, Tiled runs, databroker catalogs, arrays)
and are grouped by shape (one detector each). Per detector, streamed frame by frame:

* **kind and gain**: integer frames whose photon-transfer gain says so count photons (the
  rule of :func:`.gain.counting_by_gain`, shared with adapt); others are integrating, gain =
  the median single-frame estimate of the first ``gain_frames`` frames, read noise from its
  intercept (:mod:`.gain`), and the frames are converted to photons;
* **dose**: median photons of the valid pixels, log mean / std / range over the frames;
* **background**: :func:`gisaxs_bluesky.sim.noise_transfer.background_level` over the median
  (10th percentile of 16 x 16 block means, hot pixels left out);
* **hot pixels**: valid pixels above 20 x (the median of their 8 neighbours + 1) photons, over
  the valid pixels; their log10 level;
* **dead pixels**: valid pixels reading 0 whose 8 neighbours' median is >= 15 photons
  (P(0) < 3e-7 for Poisson), over the pixels with such neighbours (isolated dead pixels: a
  dead cluster's own neighbours are dark);
* **inactive area**: pixels flagged (-1, -2, non-finite) or masked in every frame, and the
  value they read (a pixel reading one value in every frame is not taken as inactive: at low
  dose a dark pixel reads 0 in every frame);
* **noise head / latent** (with an ``encoder``): the mean noise-kind probabilities and the
  noise latent's mean and standard deviation of the frames.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ..models.inference import Encoder
from ..sim.noise_transfer import InstrumentNoise, NoiseModel, background_level
from .errors import AdaptationError
from .gain import (
    GainEstimate,
    counting_by_gain,
    gain_check_report,
    looks_counting,
    to_photon_counts,
)
from .halves import frames_gain
from .sources import FrameSource, SourceFrame, iter_frames
from .thinning import flagged_pixels

__all__ = [
    "DEAD_NEIGHBOUR_PHOTONS",
    "HOT_FACTOR",
    "NoiseModelFitter",
    "fit_noise_model",
    "frame_statistics",
]

HOT_FACTOR = 20.0
DEAD_NEIGHBOUR_PHOTONS = 15.0
_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
_MAX_HOT_LEVELS = 20000  # hot-pixel levels kept per detector for the log10 statistics


def frame_statistics(photons: np.ndarray, valid: np.ndarray, zero_photons: float = 0.0) -> dict:
    """Dose, background, hot and dead pixels of one frame in photons (module docstring).

    ``zero_photons``: what a dead pixel may read (3 read-noise sigmas of an integrating
    detector, in photons; 0 for a counting one); its neighbours then need 3 x that more."""
    x = np.where(valid, photons, 0).astype(np.float32)
    neighbours = ndimage.median_filter(x, footprint=_RING, mode="nearest")
    hot = valid & (x > HOT_FACTOR * (neighbours + 1))
    clean = valid & ~hot
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise AdaptationError("a frame without a valid pixel")
    median = float(np.median(x[clean]))
    eligible = clean & (neighbours >= DEAD_NEIGHBOUR_PHOTONS + 3 * zero_photons)
    return {
        "dose": median,
        "background": background_level(x, clean),
        "n_valid": n_valid,
        "hot": int(hot.sum()),
        "hot_levels": x[hot],
        "eligible": int(eligible.sum()),
        "dead": int((eligible & (x <= zero_photons)).sum()),
    }


class _Detector:
    """Running statistics of one frame shape."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.kind = "counting"
        self.gain = None
        self.report: dict[str, Any] = {}
        self.frames = 0
        self.always_flagged = np.ones(shape, bool)
        self.first: np.ndarray | None = None
        self.flag_values: list[float] = []
        self.stats: list[dict] = []
        self.hot_levels: list[np.ndarray] = []
        self.noise_prob: list[np.ndarray] = []
        self.noise_latent: list[np.ndarray] = []

    def decide(self, items: list[SourceFrame], detector: str,
               gain: GainEstimate | float | None,
               gain_frames: int) -> None:
        if gain is not None:
            self.kind, self.gain = "integrating", _gain_estimate(items, gain)
        elif detector == "counting":
            self.kind = "counting"
        elif detector == "integrating" or not all(looks_counting(f.frame, f.mask)
                                                   for f in items[:gain_frames]):
            self.kind, self.gain = "integrating", _gain_estimate(items[:gain_frames], None)
        else:
            counting, est = counting_by_gain(items[0].frame, items[0].mask)
            self.report["gain_check"] = gain_check_report(est)
            if not counting:
                self.kind, self.gain = "integrating", _gain_estimate(items[:gain_frames],
                                                                        None)
        self.report["detector"] = self.kind
        if self.gain is not None:
            self.report["gain"] = self.gain.to_dict()

    def add(self, item: SourceFrame, encoder: Encoder | None) -> None:
        frame = np.asarray(item.frame)
        flagged = flagged_pixels(frame)
        if flagged.any():
            self.flag_values.append(float(np.median(frame[flagged])))
        flags = flagged if item.mask is None else flagged | np.asarray(item.mask, bool)
        self.always_flagged &= flags
        if self.first is None:
            self.first = frame.copy()
        photons = frame if self.gain is None else to_photon_counts(frame, self.gain)
        g = self.gain
        zero = 0.0 if g is None else 3 * g.read_noise_adu / g.gain_adu_per_photon
        stats = frame_statistics(photons, ~flags & (photons >= 0), zero)
        kept = sum(len(h) for h in self.hot_levels)
        if kept < _MAX_HOT_LEVELS:
            self.hot_levels.append(stats["hot_levels"][: _MAX_HOT_LEVELS - kept])
        stats.pop("hot_levels")
        self.stats.append(stats)
        if encoder is not None:
            r = encoder.encode(photons, item.mask)
            self.noise_prob.append(r.noise_prob[0])
            self.noise_latent.append(r.noise_latent[0])
        self.frames += 1

    def result(self, noise_kinds: tuple[str, ...]) -> InstrumentNoise:
        s = {k: np.array([st[k] for st in self.stats], dtype=np.float64) for k in self.stats[0]}
        dose = np.maximum(s["dose"], 1e-3)
        inactive = self.always_flagged
        levels = np.concatenate(self.hot_levels) if self.hot_levels else np.zeros(0)
        log_levels = np.log10(np.maximum(levels, 1.0))
        if self.flag_values:
            inactive_value = float(np.median(self.flag_values))
        elif inactive.any() and self.first is not None:
            inactive_value = float(np.median(self.first[inactive]))
        else:
            inactive_value = -1.0
        g = self.gain
        kw: dict[str, Any] = {}
        if self.noise_prob:
            prob = np.mean(self.noise_prob, axis=0)
            kw["kind_probability"] = {k: round(float(p), 4) for k, p in zip(noise_kinds, prob,
                                                                              strict=True)}
            lat = np.stack(self.noise_latent)
            kw["noise_latent_mean"] = lat.mean(0).astype(np.float32)
            kw["noise_latent_std"] = lat.std(0).astype(np.float32)
        return InstrumentNoise(
            shape=self.shape, detector=self.kind, frames=self.frames,
            gain_adu_per_photon=1.0 if g is None else g.gain_adu_per_photon,
            offset_adu=0.0 if g is None else g.offset_adu,
            read_noise_adu=0.0 if g is None else g.read_noise_adu,
            dose_log_mean=float(np.log(dose).mean()), dose_log_std=float(np.log(dose).std()),
            dose_range=(float(dose.min()), float(dose.max())),
            background_fraction=float(np.median(s["background"] / dose)),
            hot_pixel_fraction=float(s["hot"].sum() / s["n_valid"].sum()),
            hot_log10_mean=float(log_levels.mean()) if levels.size else 4.0,
            hot_log10_std=float(log_levels.std()) if levels.size > 1 else 0.5,
            dead_pixel_fraction=(float(s["dead"].sum() / s["eligible"].sum())
                                 if s["eligible"].sum() >= 1000 else 0.0),
            inactive_value=inactive_value, inactive=inactive, **kw)


def _gain_estimate(items: list[SourceFrame], gain: GainEstimate | float | None
                   ) -> GainEstimate:
    if isinstance(gain, GainEstimate):
        return gain
    return GainEstimate.given(gain) if gain is not None else frames_gain(items)[0]


class NoiseModelFitter:
    """:func:`fit_noise_model` one frame at a time, for a caller that reads the frames anyway
    (``adapt(..., fit_noise=True)`` reads each frame once for both). :meth:`add` each
    :class:`SourceFrame` as it is read; the first ``gain_frames`` of each shape decide how that
    shape converts to photons. With ``encoder=None`` the noise head's probabilities and noise
    latents can come later, one row per frame in the order added (:meth:`set_noise`: adapt
    gives the adapted model's, on the frames it preprocessed)."""

    def __init__(self, *, encoder: Encoder | None = None, detector: str = "auto",
                 gain: GainEstimate | float | None = None, gain_frames: int = 4,
                 progress: bool = False) -> None:
        if detector not in ("auto", "counting", "integrating"):
            raise ValueError(f"detector={detector!r}: expected auto, counting or integrating")
        self.encoder, self.detector, self.gain, self.gain_frames = (encoder, detector, gain,
                                                                     gain_frames)
        self._dets: dict[tuple, _Detector] = {}
        self._pending: dict[tuple, list[SourceFrame]] = {}
        self._rows: dict[tuple, list[int]] = {}  # shape -> positions of its frames
        self._noise_kinds: tuple[str, ...] = (tuple(encoder.noise_kinds) if encoder is not None
                                              else ())
        self._bar = tqdm(desc="fitting the noise model", unit="frame", disable=not progress)

    def add(self, item: SourceFrame) -> None:
        shape = tuple(np.shape(item.frame))
        self._rows.setdefault(shape, []).append(self.frames)
        if shape in self._dets:
            self._dets[shape].add(item, self.encoder)
            self._bar.update(1)
            return
        self._pending.setdefault(shape, []).append(item)
        if len(self._pending[shape]) >= self.gain_frames:
            self._flush(shape)

    def _flush(self, shape: tuple) -> None:
        items = self._pending.pop(shape)
        det = self._dets[shape] = _Detector(shape)
        det.decide(items, self.detector, self.gain, self.gain_frames)
        for it in items:
            det.add(it, self.encoder)
            self._bar.update(1)

    @property
    def frames(self) -> int:
        return sum(map(len, self._rows.values()))

    def set_noise(self, noise_prob: np.ndarray, noise_latent: np.ndarray,
                  noise_kinds: Sequence[str]) -> None:
        """The noise head's probabilities and the noise latents of every frame added, in
        order (one row each), in place of an encoder's."""
        prob, lat = np.asarray(noise_prob), np.asarray(noise_latent)
        if len(prob) != self.frames or len(lat) != self.frames:
            raise ValueError(f"{len(prob)} noise-probability and {len(lat)} noise-latent rows "
                             f"for {self.frames} frames")
        for shape in list(self._pending):
            self._flush(shape)
        for shape, det in self._dets.items():
            rows = self._rows[shape]
            det.noise_prob, det.noise_latent = list(prob[rows]), list(lat[rows])
        self._noise_kinds = tuple(noise_kinds)

    def result(self, sources: Sequence[FrameSource], *, model: dict | None = None,
               seconds: float = 0.0) -> NoiseModel:
        """The fitted model; ``model`` (name, version, sha256) of the model whose noise head
        and latents it holds (default: the encoder's)."""
        for shape in list(self._pending):
            self._flush(shape)
        self._bar.close()
        if not self._dets:
            raise AdaptationError("no frames to fit a noise model on")
        if model is None and self.encoder is not None:
            model = {"name": self.encoder.name, "version": self.encoder.version,
                     "sha256": self.encoder.sha256}
        instruments = tuple(d.result(self._noise_kinds) for d in self._dets.values())
        provenance = {
            "sources": [s.describe() for s in sources],
            "frames": sum(d.frames for d in self._dets.values()),
            "model": model if self._noise_kinds else None,
            "detectors": {"x".join(map(str, d.shape)): d.report for d in self._dets.values()},
            "method": "gisaxs_bluesky.adaptation.noise_model (see its docstring)",
            "seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return NoiseModel(instruments, provenance)


def fit_noise_model(
    sources: FrameSource | Iterable[FrameSource],
    *,
    encoder: Encoder | None = None,
    detector: str = "auto",
    gain: float | None = None,
    gain_frames: int = 4,
    max_frames: int | None = None,
    progress: bool = True,
) -> NoiseModel:
    """The :class:`~gisaxs_bluesky.sim.noise_transfer.NoiseModel` of the frames of ``sources``.

    ``encoder``: a model whose noise head and noise latent describe the frames (None: physics
    estimates only); ``detector`` auto / counting / integrating and ``gain`` as for adapt."""
    t0 = time.time()
    src_list = [sources] if hasattr(sources, "describe") else list(sources)
    fitter = NoiseModelFitter(encoder=encoder, detector=detector, gain=gain,
                              gain_frames=gain_frames, progress=progress)
    for item in iter_frames(src_list, max_frames=max_frames):
        fitter.add(item)
    return fitter.result(src_list, seconds=time.time() - t0)
