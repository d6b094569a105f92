"""The compiled passes of :func:`~gisaxs_bluesky.models.preprocess.preprocess` (numba, GIL
released): pass 1 gathers every per-block statistic in one sweep over the detector pixels (a
vectorised kernel for integer frames), pass 2 looks only at the pixels pass 1 marks as
suspicious (single bright pixels, zeros among bright neighbours). Compiled once per frame
dtype, on one thread."""

from __future__ import annotations

import threading

import numba
import numpy as np

__all__ = ["DEAD_NEIGHBOUR_MEAN", "block_stats", "block_stats_int", "block_stats_for",
           "spike_stats", "ensure_compiled"]

#: a zero pixel whose valid 4-neighbours average at least this many counts is "dead-like":
#: photon counting gives it probability <= exp(-5) = 0.7 %
DEAD_NEIGHBOUR_MEAN = 5.0


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
def block_stats(frame, mask, has_mask, r_idx, c_idx, h, w, row0, row1):  # pragma: no cover
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
def block_stats_int(frame, mask, has_mask, r_idx, c_idx, h, w, row0, row1):  # pragma: no cover
    """:func:`block_stats` for integer frames (counting detectors), with identical results:
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
def spike_stats(frame, mask, has_mask, r_idx, c_idx, mean, dead_mean, row0, row1):  # pragma: no cover
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


def block_stats_for(frame: np.ndarray):
    """The pass-1 kernel for this frame: integers (but uint64, which int64 cannot hold) take
    the vectorised one."""
    if frame.dtype.kind in "iu" and frame.dtype != np.uint64:
        return block_stats_int
    return block_stats


#: frame dtypes (``dtype.str``) the compiled passes are ready for in this process
_compiled: set[str] = set()


_compile_lock = threading.Lock()


def ensure_compiled(dtype: np.dtype) -> None:
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
        block_stats_for(frame)(frame, mask, False, idx, idx, 2, 2, 0, 4)
        spike_stats(frame, mask, False, idx, idx, np.zeros((2, 2)), DEAD_NEIGHBOUR_MEAN, 0, 4)
        _compiled.add(dtype.str)
