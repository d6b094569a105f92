"""Detector frame -> model input: masks, masked block means, dose normalisation, log.

One compiled pass over the detector pixels (numba, GIL released, so two frames preprocess in
parallel, or one frame's two halves) gathers every per-block statistic the model needs; a
second pass looks only at the pixels the first pass marks as suspicious (single bright pixels,
zeros among bright neighbours): :mod:`.block_kernels`.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from ..config import PreprocessConfig
from ..geometry import remap, remap_table
from .block_kernels import DEAD_NEIGHBOUR_MEAN, block_stats_for, ensure_compiled, spike_stats

__all__ = [
    "N_CHANNELS",
    "preprocess",
    "preprocess_batch",
    "preprocess_fine",
    "preprocess_with_scale",
    "block_edges",
    "frame_scale",
    "coverage_masks",
    "drop_coverage",
]

#: channels of the model input, in order (see :func:`preprocess`)
CHANNELS = ("log_mean", "valid", "flagged", "log_max", "dead", "negative", "log_pair_max",
            "dead_isolated")
N_CHANNELS = len(CHANNELS)


def block_edges(size: int, n_out: int) -> np.ndarray:
    """Start indices of ``n_out`` nearly equal blocks covering ``size`` pixels."""
    if size < n_out:
        raise ValueError(f"frame size {size} is smaller than the model resolution {n_out}")
    return np.linspace(0, size, n_out + 1).astype(np.int64)[:-1]


def _block_index(size: int, n_out: int) -> np.ndarray:
    """Block number of every pixel along one axis."""
    edges = block_edges(size, n_out)
    return (np.searchsorted(edges, np.arange(size), side="right") - 1).astype(np.int64)


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"frame must be 2-D (rows, cols), got shape {frame.shape}")
    if frame.dtype.kind not in "iufb":
        raise ValueError(f"frame dtype {frame.dtype} is not numeric")
    if not frame.dtype.isnative:  # big-endian TIFF / HDF5 data
        frame = frame.astype(frame.dtype.newbyteorder("="))
    if frame.dtype.kind == "b" or frame.dtype.itemsize > 8 or frame.dtype == np.float16:
        frame = frame.astype(np.float32)  # types the compiled pass does not take
    return np.ascontiguousarray(frame)


def _check_mask(mask, shape) -> tuple[np.ndarray, bool]:
    if mask is None:
        return np.zeros((1, 1), dtype=np.bool_), False
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match frame shape {shape}")
    return np.ascontiguousarray(mask, dtype=np.bool_), True


_INDEX_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _index(size: int, n_out: int) -> np.ndarray:
    key = (size, n_out)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _block_index(size, n_out)
    return _INDEX_CACHE[key]


def preprocess(
    frame: np.ndarray, mask: np.ndarray | None = None, config: PreprocessConfig | None = None
) -> np.ndarray:
    """One frame (H, W) of any int/float dtype -> (8, h, w) float32 model input.

    Channels (:data:`CHANNELS`): log1p(block mean / median block mean) with masked blocks at 0;
    the fraction of valid pixels per block; the fraction the detector itself flagged (Pilatus -1
    gap and -2 bad pixels, non-finite values); the block maximum over the mean on the same log
    scale (single hot pixels, zingers, overflow vanish in a mean but not in a max); the fraction
    of valid pixels reading 0 beyond Poisson's exp(-mean) of the surrounding blocks (dead
    clusters); the fraction reading below 0 (readout noise around a subtracted offset: a
    counting detector never reports it); the largest value two adjacent pixels share over the
    mean (cosmic tracks light neighbours, a hot pixel does not); the fraction of zeros among
    bright neighbours (single dead pixels). Negative values that are not flags count as 0.
    """
    return preprocess_with_scale(frame, mask, config)[0]


def _in_halves(pool: Executor | None, fn, rows: int, split: int, *args) -> list:
    """``fn(*args, row0, row1)`` over all rows, or over two halves split at ``split`` (a block
    row's first row, so no block straddles it: sums add up in the same order) with one half
    on ``pool``; the per-block results of the halves, element-wise combined by the caller."""
    if pool is None:
        return [fn(*args, 0, rows)]
    other = pool.submit(fn, *args, split, rows)
    return [fn(*args, 0, split), other.result()]


def preprocess_with_scale(
    frame: np.ndarray, mask: np.ndarray | None = None, config: PreprocessConfig | None = None,
    pool: Executor | None = None,
) -> tuple[np.ndarray, float]:
    """:func:`preprocess` and the dose normalisation it divided by (:func:`frame_scale`);
    with ``pool``, the frame's two halves are gathered in parallel (the same sums)."""
    config = config or PreprocessConfig()
    frame = _check_frame(frame)
    mask, has_mask = _check_mask(mask, frame.shape)
    ensure_compiled(frame.dtype)
    h, w = config.out_shape
    edges = block_edges(frame.shape[0], h)
    block_edges(frame.shape[1], w)  # size check
    r_idx, c_idx = _index(frame.shape[0], h), _index(frame.shape[1], w)
    split = int(edges[h // 2])
    parts = _in_halves(pool, block_stats_for(frame), frame.shape[0], split,
                       frame, mask, has_mask, r_idx, c_idx, h, w)
    total, n_valid, n_flagged, n_zero, n_negative = (sum(p[k] for p in parts) for k in range(5))
    block_max = np.maximum.reduce([p[5] for p in parts])
    counts = np.bincount(r_idx, minlength=h)[:, None] * np.bincount(c_idx, minlength=w)[None, :]
    valid_frac = n_valid / counts
    good = valid_frac >= config.min_valid_fraction
    mean = np.where(good, total / np.maximum(n_valid, 1), 0)
    scale = max(float(np.median(mean[good])) if good.any() else 1.0, 1e-3)
    parts = _in_halves(pool, spike_stats, frame.shape[0], split,
                       frame, mask, has_mask, r_idx, c_idx, mean, DEAD_NEIGHBOUR_MEAN)
    pair_max = np.maximum.reduce([p[0] for p in parts])
    n_dead = sum(p[1] for p in parts)
    log_i = np.where(good, np.log1p(mean / scale), 0)
    log_max = np.where(good, np.log1p(block_max / scale) - log_i, 0)
    log_pair = np.where(good & (pair_max > 0), np.log1p(pair_max / scale) - log_i, 0)
    # zeros beyond what photon counting explains: at block mean m a pixel reads 0 with
    # probability ~exp(-m), so only dead pixels push the fraction above that. A block that
    # reads 0 throughout (inside a dead cluster) is judged by the median of its 8 neighbours
    all_zero = good & (n_zero >= n_valid)
    local = mean.copy()
    if all_zero.any():
        padded = np.pad(np.where(good, mean, np.nan), 1, constant_values=np.nan)
        around = np.stack([padded[1 + a : 1 + a + h, 1 + b : 1 + b + w]
                           for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b])
        with np.errstate(all="ignore"):
            nb = np.nanmedian(around[:, all_zero], axis=0)
        local[all_zero] = np.nan_to_num(nb, nan=0.0)
    per_valid = 1 / np.maximum(n_valid, 1)
    zero_frac = np.where(good, np.clip(n_zero * per_valid - np.exp(-local), 0, 1), 0)
    negative_frac = np.where(good, n_negative * per_valid, 0)
    dead_isolated = np.where(good, n_dead * per_valid, 0)
    channels = [log_i, good * valid_frac, n_flagged / counts, log_max, zero_frac, negative_frac,
                log_pair, dead_isolated]
    out = np.empty((len(channels), h, w), dtype=np.float32)
    for k, channel in enumerate(channels):
        out[k] = channel  # cast on copy: no float64 stack of all channels first
    return out, scale


def frame_scale(
    frame: np.ndarray, mask: np.ndarray | None = None, config: PreprocessConfig | None = None
) -> float:
    """The dose normalisation preprocess() divides by: the median valid block mean."""
    return preprocess_with_scale(frame, mask, config)[1]


def preprocess_fine(
    frame: np.ndarray, scale: float, mask: np.ndarray | None = None,
    shape: tuple[int, int] = (256, 256),
) -> np.ndarray:
    """(2, *shape) float32: log1p(block mean / ``scale``) and the valid fraction, at the
    denoiser's resolution (``scale`` from :func:`frame_scale`, so both resolutions agree)."""
    frame = _check_frame(frame)
    mask, has_mask = _check_mask(mask, frame.shape)
    ensure_compiled(frame.dtype)
    h, w = shape
    block_edges(frame.shape[0], h), block_edges(frame.shape[1], w)
    r_idx, c_idx = _index(frame.shape[0], h), _index(frame.shape[1], w)
    stats = block_stats_for(frame)(frame, mask, has_mask, r_idx, c_idx, h, w, 0, frame.shape[0])
    total, n_valid = stats[:2]
    counts = np.bincount(r_idx, minlength=h)[:, None] * np.bincount(c_idx, minlength=w)[None, :]
    valid = n_valid / counts
    good = valid >= 0.25
    log_i = np.where(good, np.log1p(total / np.maximum(n_valid, 1) / scale), 0)
    return np.stack([log_i, good * valid]).astype(np.float32)


def preprocess_batch(
    frames: np.ndarray, mask: np.ndarray | None = None, config: PreprocessConfig | None = None
) -> np.ndarray:
    """(N, H, W) or (H, W) -> (N, 8, h, w) float32."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W) or (H, W), got shape {frames.shape}")
    return np.stack([preprocess(f, mask, config) for f in frames])


# -- reciprocal-space input ------------------------------------------------------------------
#: channels of the q-grid model input, in order (see :func:`preprocess_q`)
Q_CHANNELS = ("log_mean", "valid", "flagged", "log_max", "dead", "negative", "log_pixels",
              "k_fz")


def q_inputs(stats, table, min_valid_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin statistics (:func:`gisaxs_bluesky.geometry.remap`) -> (N, 8, n_q_z, n_q_par)
    float32 model input and the (N,) dose scales.

    Channels (:data:`Q_CHANNELS`): log1p(mean / median valid mean), intensity per solid angle
    on the fixed q grid; the valid fraction of the bin's pixels; the fraction the detector
    flagged; the bin maximum over the mean (hot pixels, zingers); zeros beyond Poisson's
    exp(-mean) (dead pixels); readings below 0 (integrating detectors); log1p(valid pixels in
    the bin) / 5 (how much statistics a bin holds: detectors and distances differ); the exit
    wave vector q_z - k sin(alpha_i) over the grid's q_z range, where the bin is valid (the
    Yoneda band sits at a fixed exit angle, not at a fixed q_z). Works on numpy arrays and on
    torch tensors alike (``stats`` from :func:`remap_torch`).
    """
    full = table.full_weight
    k_fz = table.k_fz / np.float32(table.grid.q_z_max_nm)
    if not isinstance(stats.mean, np.ndarray):
        return _q_inputs_torch(stats, full, k_fz, min_valid_fraction)
    n_valid = stats.n_valid
    frac = np.where(full > 0, n_valid / np.maximum(full, 1e-12), 0)
    good = frac >= min_valid_fraction
    scales = np.array([max(float(np.median(m[g])) if g.any() else 1.0, 1e-3)
                       for m, g in zip(stats.mean, good, strict=True)], dtype=np.float32)
    s = scales[:, None, None]
    log_i = np.where(good, np.log1p(stats.mean / s), 0)
    log_max = np.where(good, np.log1p(stats.max / s) - log_i, 0)
    per_valid = 1 / np.maximum(n_valid, 1e-12)
    dead = np.where(good, np.clip(stats.n_zero * per_valid - np.exp(-stats.mean), 0, 1), 0)
    channels = [log_i, good * frac, np.where(full > 0, stats.n_flagged / np.maximum(full, 1e-12),
                                             0), log_max, dead,
                np.where(good, stats.n_negative * per_valid, 0), np.log1p(n_valid) / 5,
                good * k_fz]
    out = np.empty((len(stats.mean), len(channels), *full.shape), dtype=np.float32)
    for k, channel in enumerate(channels):
        out[:, k] = channel
    return out, scales


def _q_inputs_torch(stats, full, k_fz, min_valid_fraction):
    import torch

    device = stats.mean.device
    full = torch.as_tensor(full, device=device)
    k_fz = torch.as_tensor(k_fz, device=device)
    n_valid = stats.n_valid
    frac = torch.where(full > 0, n_valid / full.clamp_min(1e-12), 0)
    good = frac >= min_valid_fraction
    masked = torch.where(good, stats.mean, torch.nan).flatten(1)
    scales = torch.nan_to_num(masked.nanmedian(dim=1).values, nan=1.0).clamp_min(1e-3)
    s = scales[:, None, None]
    zero = torch.zeros((), device=device)
    log_i = torch.where(good, torch.log1p(stats.mean / s), zero)
    log_max = torch.where(good, torch.log1p(stats.max / s) - log_i, zero)
    per_valid = 1 / n_valid.clamp_min(1e-12)
    dead = torch.where(good, (stats.n_zero * per_valid - torch.exp(-stats.mean)).clamp(0, 1),
                       zero)
    channels = [log_i, good * frac,
                torch.where(full > 0, stats.n_flagged / full.clamp_min(1e-12), zero), log_max,
                dead, torch.where(good, stats.n_negative * per_valid, zero),
                torch.log1p(n_valid) / 5, good * k_fz]
    return torch.stack(channels, dim=1).float(), scales


def preprocess_q(frames: np.ndarray, geometry, mask: np.ndarray | None = None, grid=None,
                 ) -> np.ndarray:
    """(N, H, W) or (H, W) frames of one geometry -> (N, 8, n_q_z, n_q_par) q-grid input."""
    table = remap_table(geometry, grid, mask)
    return q_inputs(remap(table, frames), table)[0]


def coverage_masks(good: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """(N, n_q_z, n_q_par) bool: the q-grid bins each frame is to lose (all False for a frame
    left whole, with probability 1 - ``p``), from ``good``, the bins each frame sees.

    What another set-up would not see: a shorter reach in q_par and in q_z than this frame's
    (a smaller detector, a longer distance), a rod beamstop over the low q_par, a module gap
    as a band.
    """
    n, rows, cols = good.shape
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    out = np.zeros(good.shape, dtype=bool)
    for i in np.flatnonzero(rng.random(n) < p):
        seen_r, seen_c = np.flatnonzero(good[i].any(1)), np.flatnonzero(good[i].any(0))
        if not seen_r.size:
            continue
        top, right = seen_r[0], seen_c[-1] + 1
        drop = np.zeros((rows, cols), dtype=bool)
        if rng.random() < 0.7:  # reach: q_par beyond a cut, q_z above one
            drop |= c >= max(int(right * rng.uniform(0.3, 1.0)), 2)
            drop |= r < top + int((rows - top) * rng.uniform(0.0, 0.6))
        if rng.random() < 0.4:  # a rod beamstop from below over the smallest q_par
            width, height = int(rng.integers(1, 9)), int(rows * rng.uniform(0.125, 1.0))
            drop |= (c < width) & (r >= rows - height)
        if rng.random() < 0.4:  # a module gap
            width = int(rng.integers(1, 5))
            if rng.random() < 0.5:
                start = int(rng.integers(top, rows - width + 1))
                drop |= (r >= start) & (r < start + width)
            else:
                start = int(rng.integers(0, max(right - width, 0) + 1))
                drop |= (c >= start) & (c < start + width)
        out[i] = drop
    return out


def drop_coverage(x, p: float, rng: np.random.Generator, min_kept: float = 0.1):
    """(N, 8, n_q_z, n_q_par) q-grid inputs (torch) with part of the coverage of a fraction
    ``p`` of the frames taken away (:func:`coverage_masks`), renormalised as :func:`q_inputs`
    would have: the log intensity and the maximum over the median of the bins still valid.

    A frame that would keep less than ``min_kept`` of its valid bins stays whole.
    """
    import torch

    good = x[:, 1] > 0
    drop = torch.as_tensor(coverage_masks(good.cpu().numpy(), p, rng), device=x.device)
    kept = good & ~drop
    n_good = good.flatten(1).sum(1)
    change = drop.flatten(1).any(1) & (kept.flatten(1).sum(1) >= min_kept * n_good) & (n_good > 0)
    if not bool(change.any()):
        return x
    x = x.clone()
    sub = x[change]
    keep = kept[change]
    ratio = torch.expm1(sub[:, 0].float())  # mean / old scale
    top = torch.expm1(sub[:, 3].float() + sub[:, 0].float())  # max / old scale
    level = torch.where(keep, ratio, torch.nan).flatten(1).nanmedian(dim=1).values
    level = torch.nan_to_num(level, nan=1.0).clamp_min(1e-6)[:, None, None]
    log_i = torch.log1p(ratio / level)
    sub[:, 0] = torch.where(keep, log_i, 0).to(sub.dtype)
    sub[:, 3] = torch.where(keep, torch.log1p(top / level) - log_i, 0).to(sub.dtype)
    sub = sub * (~drop[change])[:, None].to(sub.dtype)
    x[change] = sub
    return x
