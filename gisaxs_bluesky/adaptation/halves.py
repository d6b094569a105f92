"""A beamtime's frames as pairs of thinned halves: counts (a counting detector's, or an
integrating one's ADU through an estimated gain), binomial thinning, preprocessing of both
halves; frames are not kept."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..models.inference import Encoder
from .adapt_config import AdaptConfig
from .errors import AdaptationError
from .gain import (
    GainError,
    GainEstimate,
    counting_by_gain,
    estimate_gain,
    gain_check_report,
    looks_counting,
    to_photon_counts,
)
from .sources import FrameSource, SourceFrame, iter_frames
from .thinning import binomial_split

__all__ = ["HalfView", "Pairs", "build_pairs", "counts_converter", "frames_gain"]


class Pairs:
    """Preprocessed halves of every frame and thinning (float16; about 1 MB per pair)."""

    def __init__(self) -> None:
        self.x = [[], []]  # halves a, b: (8, 128, 128)
        self.fine = [[], []]  # (2, *fine_shape)
        self.whole: list[torch.Tensor] = []  # (8, 128, 128) of each whole frame
        self.group: list[int] = []  # frame index
        self.draw: list[int] = []  # thinning index

    def add(self, x: np.ndarray, fine: np.ndarray, group: int, draw: int) -> None:
        for h in (0, 1):
            self.x[h].append(torch.from_numpy(x[h].astype(np.float16)))
            self.fine[h].append(torch.from_numpy(fine[h].astype(np.float16)))
        self.group.append(group)
        self.draw.append(draw)

    def freeze(self) -> None:
        self.x = [torch.stack(v) for v in self.x]
        self.whole = torch.stack(self.whole)
        self.fine = [torch.stack(v) for v in self.fine]
        self.group = np.asarray(self.group)
        self.draw = np.asarray(self.draw)


class HalfView:
    """What models.losses.denoise_errors reads: an input half and the other half as the target."""

    def __init__(self, pairs: Pairs, src: int) -> None:
        self.fine = pairs.fine[src]
        self.fine_target = pairs.fine[1 - src][:, 0]


def counts_converter(frames: list[SourceFrame], cfg: AdaptConfig,
                      gain: GainEstimate | float | None) -> tuple[dict, dict]:
    """Per frame shape: the GainEstimate to convert ADU (None for a counting detector)."""
    by_shape: dict[tuple, list[SourceFrame]] = {}
    for f in frames:
        by_shape.setdefault(tuple(f.frame.shape), []).append(f)
    converters: dict[tuple, GainEstimate | None] = {}
    report: dict[str, Any] = {}
    for shape, items in by_shape.items():
        key = "x".join(map(str, shape))
        if isinstance(gain, GainEstimate | int | float) and not isinstance(gain, bool):
            est = gain if isinstance(gain, GainEstimate) else GainEstimate.given(gain)
            converters[shape] = est
            report[key] = {"detector": "integrating", "gain": est.to_dict()}
            continue
        counting = cfg.detector == "counting" or (
            cfg.detector == "auto"
            and all(looks_counting(f.frame, f.mask) for f in items[: cfg.gain_frames])
            and _shape_is_counting(items, report, key))
        if counting:
            converters[shape] = None
            report.setdefault(key, {})["detector"] = "counting"
            continue
        est, estimates = frames_gain(items[: cfg.gain_frames])
        converters[shape] = est
        report[key] = {"detector": "integrating", "gain": est.to_dict(),
                       "gain_per_frame": [round(e.gain_adu_per_photon, 4) for e in estimates]}
    return converters, report


def frames_gain(items: list[SourceFrame]) -> tuple[GainEstimate, list[GainEstimate]]:
    """The gain of one detector from single-frame estimates of ``items``: the median gain and
    read noise (the rest as the first frame's), and the estimates themselves."""
    estimates = []
    for f in items:
        try:
            estimates.append(estimate_gain(f.frame, f.mask))
        except GainError as exc:
            raise AdaptationError(f"{f.source}: cannot estimate the detector gain ({exc}); "
                                  "pass gain=... (--gain) or detector='counting'") from exc
    est = dataclasses.replace(
        estimates[0],
        gain_adu_per_photon=float(np.median([e.gain_adu_per_photon for e in estimates])),
        read_noise_adu=float(np.median([e.read_noise_adu for e in estimates])))
    return est, estimates


def _shape_is_counting(items: list[SourceFrame], report: dict, key: str) -> bool:
    """Integer, non-negative frames of one shape: counting by the photon-transfer gain of the
    first (:func:`~gisaxs_bluesky.adaptation.gain.counting_by_gain`)."""
    counting, est = counting_by_gain(items[0].frame, items[0].mask)
    report[key] = {"gain_check": gain_check_report(est)}
    return counting


def build_pairs(src_list: list[FrameSource], encoder: Encoder, cfg: AdaptConfig,
                 gain: GainEstimate | float | None, fallback_geometry: dict | None,
                 require_geometry: bool, max_frames: int | None, progress: bool,
                 on_frame: Callable[[SourceFrame], None] | None = None,
                 ) -> tuple[Pairs, list[dict], dict]:
    """Thin and preprocess every frame as it arrives (frames are not kept: a few hundred
    Pilatus 1M frames would be GBs); the first ``gain_frames`` of each shape decide how that
    shape converts to counts. ``on_frame`` sees each frame as read (the noise-model fit of
    ``adapt(fit_noise=True)``). Returns the pairs, each frame's (source, geometry), the
    detector report."""
    rng = np.random.default_rng(cfg.seed)
    pairs = Pairs()
    meta: list[dict] = []
    converters: dict[tuple, GainEstimate | None] = {}
    report: dict[str, Any] = {}
    pending: dict[tuple, list[SourceFrame]] = {}
    bar = tqdm(desc="thinning + preprocessing", unit="frame", disable=not progress,
               total=max_frames)

    def process(item: SourceFrame) -> None:
        counts = item.frame
        est = converters[tuple(counts.shape)]
        if est is not None:
            counts = to_photon_counts(counts, est)
        for d in range(cfg.thinnings):
            pair = binomial_split(counts, cfg.split_fraction, mask=item.mask, rng=rng,
                                  name=item.source)
            x, fine = encoder.preprocess_with_fine([pair.a, pair.b], item.mask)
            pairs.add(x, fine, len(meta), d)
        pairs.whole.append(torch.from_numpy(encoder.preprocess([counts], item.mask)[0]
                                            .astype(np.float16)))
        meta.append({"source": item.source, "geometry": item.geometry, "group": item.group})
        bar.update(1)

    def flush(shape: tuple) -> None:
        items = pending.pop(shape)
        conv, rep = counts_converter(items, cfg, gain)
        converters.update(conv)
        report.update(rep)
        for it in items:
            process(it)

    for item in iter_frames(src_list, max_frames=max_frames):
        if item.geometry == "unknown" and fallback_geometry is not None:
            item.geometry = fallback_geometry
        elif item.geometry == "unknown" and require_geometry:
            raise AdaptationError(f"{item.source}: no geometry; pass geometry=... (--geometry)")
        if on_frame is not None:
            on_frame(item)
        shape = tuple(item.frame.shape)
        if shape in converters:
            process(item)
            continue
        pending.setdefault(shape, []).append(item)
        if len(pending[shape]) >= cfg.gain_frames:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    bar.close()
    pairs.freeze()
    return pairs, meta, report
