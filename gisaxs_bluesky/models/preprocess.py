"""Detector frame -> model input: masks, masked block means, dose normalisation, log.

One compiled pass over the detector pixels (numba, GIL released, so two frames preprocess in
parallel, or one frame's two halves) gathers every per-block statistic the model needs; a
second pass looks only at the pixels the first pass marks as suspicious (single bright pixels,
zeros among bright neighbours).
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor

import numba
import numpy as np

from ..config import PreprocessConfig

__all__ = [
    "N_CHANNELS",
    "preprocess",
    "preprocess_batch",
    "preprocess_fine",
    "preprocess_with_scale",
    "block_edges",
    "frame_scale",
]

#: channels of the model input, in order (see :func:`preprocess`)
CHANNELS = ("log_mean", "valid", "flagged", "log_max", "dead", "negative", "log_pair_max",
            "dead_isolated")
N_CHANNELS = len(CHANNELS)
#: a zero pixel whose valid 4-neighbours average at least this many counts is "dead-like":
#: photon counting gives it probability <= exp(-5) = 0.7 %
_DEAD_NEIGHBOUR_MEAN = 5.0


def block_edges(size: int, n_out: int) -> np.ndarray:
    """Start indices of ``n_out`` nearly equal blocks covering ``size`` pixels."""
    if size < n_out:
        raise ValueError(f"frame size {size} is smaller than the model resolution {n_out}")
    return np.linspace(0, size, n_out + 1).astype(np.int64)[:-1]


def _block_index(size: int, n_out: int) -> np.ndarray:
    """Block number of every pixel along one axis."""
    edges = block_edges(size, n_out)
    return (np.searchsorted(edges, np.arange(size), side="right") - 1).astype(np.int64)


@numba.njit(cache=True, nogil=True, inline="always")
def _is_flag(x: float) -> bool:
    return x != x or x == np.inf or x == -np.inf or x == -1.0 or x == -2.0


@numba.njit(cache=True, nogil=True)
def _col_bounds(c_idx, w):  # pragma: no cover - compiled
    """First column of each of the w block columns, and the frame width at the end."""
    bounds = np.empty(w + 1, dtype=np.int64)
    bounds[w] = len(c_idx)
    b = -1
    for j in range(len(c_idx)):
        if c_idx[j] != b:
            b = c_idx[j]
            bounds[b] = j
    return bounds


@numba.njit(cache=True, nogil=True)
def _block_stats(frame, mask, has_mask, r_idx, c_idx, h, w, row0, row1):  # pragma: no cover
    """Pass 1 over rows [row0, row1): per block sum, valid, flagged, zero, negative counts and
    maximum."""
    total = np.zeros((h, w))
    n_valid = np.zeros((h, w))
    n_flagged = np.zeros((h, w))
    n_zero = np.zeros((h, w))
    n_negative = np.zeros((h, w))
    block_max = np.zeros((h, w))
    rows, cols = frame.shape
    for i in range(row0, row1):
        bi = r_idx[i]
        for j in range(cols):
            bj = c_idx[j]
            x = float(frame[i, j])
            if _is_flag(x):
                n_flagged[bi, bj] += 1
                continue
            if has_mask and mask[i, j]:
                continue
            n_valid[bi, bj] += 1
            if x < 0:
                n_negative[bi, bj] += 1
            elif x == 0:
                n_zero[bi, bj] += 1
            else:
                total[bi, bj] += x
                if x > block_max[bi, bj]:
                    block_max[bi, bj] = x
    return total, n_valid, n_flagged, n_zero, n_negative, block_max


@numba.njit(cache=True, nogil=True)
def _block_stats_int(frame, mask, has_mask, r_idx, c_idx, h, w, row0, row1):  # pragma: no cover
    """:func:`_block_stats` for integer frames (counting detectors), with identical results:
    no NaN or inf to test for, and sums exact in int64. Each pixel row adds into per-column
    accumulators in one branch-free, vectorised loop; at the end of a block row the columns
    are summed into its blocks."""
    out = np.zeros((6, h, w))
    total, n_valid, n_flagged, n_zero, n_negative, block_max = (out[0], out[1], out[2], out[3],
                                                                 out[4], out[5])
    bounds = _col_bounds(c_idx, w)
    cols = frame.shape[1]
    acc = np.zeros((6, cols), dtype=np.int64)  # sum, max, valid, flagged, zero, negative
    current = r_idx[row0] if row0 < row1 else 0
    for i in range(row0, row1 + 1):
        if i == row1 or r_idx[i] != current:  # block row done: columns -> blocks
            for bj in range(w):
                for j in range(bounds[bj], bounds[bj + 1]):
                    total[current, bj] += acc[0, j]
                    block_max[current, bj] = max(block_max[current, bj], acc[1, j])
                    n_valid[current, bj] += acc[2, j]
                    n_flagged[current, bj] += acc[3, j]
                    n_zero[current, bj] += acc[4, j]
                    n_negative[current, bj] += acc[5, j]
            if i == row1:
                break
            acc[:] = 0
            current = r_idx[i]
        for j in range(cols):
            x = np.int64(frame[i, j])
            flag = (x == -1) | (x == -2)
            ok = not flag
            if has_mask:
                ok = ok & (not mask[i, j])
            pos = x if ok & (x > 0) else np.int64(0)
            acc[0, j] += pos
            acc[1, j] = max(acc[1, j], pos)
            acc[2, j] += ok
            acc[3, j] += flag
            acc[4, j] += ok & (x == 0)
            acc[5, j] += ok & (x < 0)
    return total, n_valid, n_flagged, n_zero, n_negative, block_max


@numba.njit(cache=True, nogil=True)
def _valid_value(frame, mask, has_mask, i, j):  # pragma: no cover - compiled
    """(value, valid) of pixel (i, j); negative readout values count as 0."""
    x = float(frame[i, j])
    if _is_flag(x) or (has_mask and mask[i, j]):
        return 0.0, False
    return max(x, 0.0), True


@numba.njit(cache=True, nogil=True)
def _spike_stats(frame, mask, has_mask, r_idx, c_idx, mean, dead_mean, row0, row1):  # pragma: no cover
    """Pass 2 over rows [row0, row1) (neighbours read beyond them): per block the largest value
    two adjacent pixels both reach (tracks, blobs: not single hot pixels), and the number of
    zeros whose valid 4-neighbours are all non-zero and average >= dead_mean."""
    h, w = mean.shape
    pair_max = np.zeros((h, w))
    n_dead = np.zeros((h, w))
    rows, cols = frame.shape
    # most pixels are neither a zero among bright pixels nor a spike: per pixel row, one
    # branch-free loop lists the candidates (in column order), and only they are looked at
    threshold = np.empty(cols)
    dead_possible = np.zeros(cols, dtype=np.bool_)
    candidates = np.empty(cols, dtype=np.int64)
    current = -1
    for i in range(row0, row1):
        bi = r_idx[i]
        if bi != current:
            current = bi
            for j in range(cols):
                m = mean[bi, c_idx[j]]
                threshold[j] = 3.0 * m + 3.0
                dead_possible[j] = not m < 0.5 * dead_mean
        k = 0
        for j in range(cols):
            x = float(frame[i, j])
            candidates[k] = j
            k += ((x == 0.0) & dead_possible[j]) | (x > threshold[j])
        for q in range(k):
            j = candidates[q]
            bj = c_idx[j]
            x = float(frame[i, j])
            if x == 0.0:
                if has_mask and mask[i, j]:
                    continue
                # every valid neighbour bright and none reading 0: edges of shadows, of
                # unflagged gaps and of dead clusters have dark neighbours and do not count
                s = 0.0
                n = 0
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < rows and 0 <= jj < cols:
                        y, ok2 = _valid_value(frame, mask, has_mask, ii, jj)
                        if ok2:
                            if y <= 0.0:
                                n = -4
                                break
                            s += y
                            n += 1
                if n >= 3 and s >= dead_mean * n:
                    n_dead[bi, bj] += 1
            elif x > pair_max[bi, bj]:
                if _is_flag(x) or (has_mask and mask[i, j]):
                    continue
                best = 0.0
                for di, dj in ((0, 1), (1, -1), (1, 0), (1, 1), (0, -1), (-1, -1), (-1, 0),
                               (-1, 1)):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < rows and 0 <= jj < cols:
                        y, ok2 = _valid_value(frame, mask, has_mask, ii, jj)
                        if ok2 and y > best:
                            best = y
                pair = min(x, best)
                if pair > pair_max[bi, bj]:
                    pair_max[bi, bj] = pair
    return pair_max, n_dead


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


def _block_stats_for(frame: np.ndarray):
    """The pass-1 kernel for this frame: integers (but uint64, which int64 cannot hold) take
    the vectorised one."""
    if frame.dtype.kind in "iu" and frame.dtype != np.uint64:
        return _block_stats_int
    return _block_stats


def _in_halves(pool: Executor | None, fn, rows: int, split: int, *args) -> list:
    """``fn(*args, row0, row1)`` over all rows, or over two halves split at ``split`` (a block
    row's first row, so no block straddles it: sums add up in the same order) with one half
    on ``pool``; the per-block results of the halves, element-wise combined by the caller."""
    if pool is None:
        return [fn(*args, 0, rows)]
    other = pool.submit(fn, *args, split, rows)
    return [fn(*args, 0, split), other.result()]


#: frame dtypes (``dtype.str``) the compiled passes are ready for in this process
_compiled: set[str] = set()
_compile_lock = threading.Lock()


def _ensure_compiled(dtype: np.dtype) -> None:
    """Compile (or load from numba's cache) the passes for frames of ``dtype``, once and on one
    thread: numba compiles at the first call with new argument types, and compiling one
    function from several threads at once is not safe in every numba release (seen: a
    KeyError in its typing tables on a 16-thread pool). A 4 x 4 frame has the same types."""
    if dtype.str in _compiled:
        return
    with _compile_lock:
        if dtype.str in _compiled:
            return
        frame = np.zeros((4, 4), dtype=dtype)
        mask = np.zeros((1, 1), dtype=np.bool_)
        idx = np.array([0, 0, 1, 1], dtype=np.int64)
        _block_stats_for(frame)(frame, mask, False, idx, idx, 2, 2, 0, 4)
        _spike_stats(frame, mask, False, idx, idx, np.zeros((2, 2)), _DEAD_NEIGHBOUR_MEAN, 0, 4)
        _compiled.add(dtype.str)


def preprocess_with_scale(
    frame: np.ndarray, mask: np.ndarray | None = None, config: PreprocessConfig | None = None,
    pool: Executor | None = None,
) -> tuple[np.ndarray, float]:
    """:func:`preprocess` and the dose normalisation it divided by (:func:`frame_scale`);
    with ``pool``, the frame's two halves are gathered in parallel (the same sums)."""
    config = config or PreprocessConfig()
    frame = _check_frame(frame)
    mask, has_mask = _check_mask(mask, frame.shape)
    _ensure_compiled(frame.dtype)
    h, w = config.out_shape
    edges = block_edges(frame.shape[0], h)
    block_edges(frame.shape[1], w)  # size check
    r_idx, c_idx = _index(frame.shape[0], h), _index(frame.shape[1], w)
    split = int(edges[h // 2])
    parts = _in_halves(pool, _block_stats_for(frame), frame.shape[0], split,
                       frame, mask, has_mask, r_idx, c_idx, h, w)
    total, n_valid, n_flagged, n_zero, n_negative = (sum(p[k] for p in parts) for k in range(5))
    block_max = np.maximum.reduce([p[5] for p in parts])
    counts = np.bincount(r_idx, minlength=h)[:, None] * np.bincount(c_idx, minlength=w)[None, :]
    valid_frac = n_valid / counts
    good = valid_frac >= config.min_valid_fraction
    mean = np.where(good, total / np.maximum(n_valid, 1), 0)
    scale = max(float(np.median(mean[good])) if good.any() else 1.0, 1e-3)
    parts = _in_halves(pool, _spike_stats, frame.shape[0], split,
                       frame, mask, has_mask, r_idx, c_idx, mean, _DEAD_NEIGHBOUR_MEAN)
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
    _ensure_compiled(frame.dtype)
    h, w = shape
    block_edges(frame.shape[0], h), block_edges(frame.shape[1], w)
    r_idx, c_idx = _index(frame.shape[0], h), _index(frame.shape[1], w)
    stats = _block_stats_for(frame)(frame, mask, has_mask, r_idx, c_idx, h, w, 0, frame.shape[0])
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
    from ..geometry import remap, remap_table

    table = remap_table(geometry, grid, mask)
    return q_inputs(remap(table, frames), table)[0]
