"""The per-frame remap: a gather over a :class:`~.reciprocal.RemapTable` (bin -> pixels).

:func:`remap` runs in numba on CPU threads (the GIL released), :func:`remap_torch` in torch on
any device. Both give per-bin statistics (:class:`RemapStats`); pixels the detector flags
(-1, -2, NaN, inf) are counted, not averaged.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from .detectors import GeometryError
from .reciprocal import RemapTable

__all__ = ["RemapStats", "remap", "remap_torch"]


@dataclass(frozen=True)
class RemapStats:
    """Per-bin statistics of a batch of frames, each (N, n_q_z, n_q_par) float32.

    ``mean``: intensity per unit solid angle (relative to the PONI pixel), averaged over the
    bin's valid pixels (negative readout values count as 0); ``n_valid``, ``n_flagged``,
    ``n_zero``, ``n_negative``: pixel weights; ``max``: the largest valid reading.
    """

    mean: np.ndarray
    n_valid: np.ndarray
    n_flagged: np.ndarray
    n_zero: np.ndarray
    n_negative: np.ndarray
    max: np.ndarray


@numba.njit(cache=True, nogil=True)
def _gather(frame, indptr, indices, coef, weight, f, b0, b1, out):  # pragma: no cover
    """Statistics of bins [b0, b1) of one flat frame into ``out[:, f]`` (GIL released)."""
    for b in range(b0, b1):
        j0, j1 = indptr[b], indptr[b + 1]
        if j0 == j1:
            continue
        total = 0.0
        n_valid = 0.0
        n_flag = 0.0
        n_zero = 0.0
        n_neg = 0.0
        vmax = 0.0
        for j in range(j0, j1):
            x = float(frame[indices[j]])
            if x != x or x == np.inf or x == -np.inf or x == -1.0 or x == -2.0:
                n_flag += weight[j]
                continue
            n_valid += weight[j]
            if x > 0:
                total += coef[j] * x
                if x > vmax:
                    vmax = x
            elif x == 0:
                n_zero += weight[j]
            else:
                n_neg += weight[j]
        out[0, f, b] = total / n_valid if n_valid > 0 else 0.0
        out[1, f, b] = n_valid
        out[2, f, b] = n_flag
        out[3, f, b] = n_zero
        out[4, f, b] = n_neg
        out[5, f, b] = vmax


_POOL: ThreadPoolExecutor | None = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()


_COMPILED: set[str] = set()


def _ensure_compiled(dtype: np.dtype) -> None:
    """Compile the gather for frames of ``dtype`` on this thread, once: numba compiling one
    function from several threads at once is not safe (KeyError in its typing tables)."""
    if dtype.str in _COMPILED:
        return
    with _POOL_LOCK:
        if dtype.str not in _COMPILED:
            one = np.zeros(1, dtype=np.float32)
            _gather(np.zeros(1, dtype=dtype), np.array([0, 1], dtype=np.int64),
                    np.zeros(1, dtype=np.int64), one, one, 0, 0, 1,
                    np.zeros((6, 1, 1), dtype=np.float32))
            _COMPILED.add(dtype.str)


def _pool() -> ThreadPoolExecutor:
    """Threads for the gather (numba's own parallel layer fights torch's OpenMP threads)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():  # threads do not survive a fork
            _POOL_PID = os.getpid()
            _POOL = ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 2)),
                                       thread_name_prefix="gisaxs-remap")
        return _POOL


def _flat_frames(frames, shape: tuple[int, int]) -> list[np.ndarray]:
    """Each frame as a flat, native, numeric array (a view where it already is one): an
    (N, H, W) array, one (H, W) frame, or a sequence of (H, W) frames (never stacked)."""
    if not isinstance(frames, list | tuple):
        frames = np.asarray(frames)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.ndim != 3:
            raise GeometryError(
                f"frames of shape {frames.shape} do not match detector_shape {shape}")
    if len(frames) == 0:
        raise GeometryError("no frames to remap")
    out = []
    for frame in frames:
        frame = np.asarray(frame)
        if frame.shape != shape:
            raise GeometryError(
                f"frame of shape {frame.shape} does not match detector_shape {shape}")
        if not frame.dtype.isnative or frame.dtype.kind not in "iuf" or frame.dtype == np.float16:
            frame = frame.astype(np.float32)
        out.append(np.ascontiguousarray(frame).reshape(-1))
    return out


def _gather_frames(flats, table: RemapTable, frames: range, b0: int, b1: int,
                   out: np.ndarray) -> None:
    for f in frames:
        _gather(flats[f], table.indptr, table.indices, table.coef, table.weight, f, b0, b1, out)


def remap(table: RemapTable, frames, *, threads: int | None = None) -> RemapStats:
    """(N, H, W) or (H, W) frames, or a sequence of (H, W) frames -> per-bin statistics on the
    table's grid (numba, CPU).

    With at least as many frames as ``threads`` (default: one per core, 2 to 8) each thread
    takes whole frames, one after the other (a frame's pixels stay in cache); with fewer, the
    bins of each frame are shared among them.
    """
    flats = _flat_frames(frames, table.geometry.shape)
    n = len(flats)
    for dtype in {f.dtype for f in flats}:
        _ensure_compiled(dtype)
    out = np.zeros((6, n, table.n_bins), dtype=np.float32)
    pool = _pool() if threads is None or threads > 1 else None
    workers = 1 if pool is None else (threads or pool._max_workers)
    if n < workers:
        # equal shares of table entries (not of bins: most pixels sit in a few rows of bins)
        cuts = np.searchsorted(table.indptr, np.linspace(0, table.indptr[-1], workers + 1))
        cuts[0], cuts[-1] = 0, table.n_bins
        shares = [(range(n), int(a), int(b))
                  for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    else:  # whole frames per thread (one share when single-threaded)
        shares = [(range(k, n, workers), 0, table.n_bins) for k in range(workers)]
    if len(shares) == 1:
        _gather_frames(flats, table, *shares[0], out)
    else:
        for job in [pool.submit(_gather_frames, flats, table, *share, out) for share in shares]:
            job.result()
    out = out.reshape(6, n, *table.grid.shape)
    return RemapStats(*out)


class _TorchTable:
    def __init__(self, table: RemapTable, device) -> None:
        import torch

        self.device = device
        self.bin = torch.as_tensor(table.bin_of_entry(), device=device)
        self.indices = torch.as_tensor(table.indices, device=device)
        self.coef = torch.as_tensor(table.coef, device=device)
        self.weight = torch.as_tensor(table.weight, device=device)


_TORCH_TABLES: OrderedDict = OrderedDict()


def remap_torch(table: RemapTable, frames) -> RemapStats:
    """:func:`remap` in torch on ``frames``' device ((N, H, W) tensor); returns tensors."""
    import torch

    if frames.ndim == 2:
        frames = frames[None]
    if tuple(frames.shape[1:]) != table.geometry.shape:
        raise GeometryError(
            f"frames of shape {tuple(frames.shape)} do not match detector_shape "
            f"{table.geometry.shape}"
        )
    key = (id(table), str(frames.device))
    tt = _TORCH_TABLES.get(key)
    if tt is None:
        tt = _TORCH_TABLES[key] = _TorchTable(table, frames.device)
        while len(_TORCH_TABLES) > 8:
            _TORCH_TABLES.popitem(last=False)
    n = frames.shape[0]
    x = frames.reshape(n, -1)[:, tt.indices].float()  # (N, nnz)
    flag = ~torch.isfinite(x) | (x == -1) | (x == -2)
    ok = ~flag
    w = tt.weight.expand(n, -1)
    zeros = torch.zeros((n, table.n_bins), device=frames.device, dtype=torch.float32)

    def total(values):
        return zeros.index_add(1, tt.bin, values)

    positive = ok & (x > 0)
    xp = torch.where(positive, x, torch.zeros((), device=x.device))
    n_valid = total(w * ok)
    mean = total(tt.coef * xp) / n_valid.clamp_min(1e-12)
    vmax = zeros.scatter_reduce(1, tt.bin.expand(n, -1), xp, reduce="amax", include_self=True)
    stats = [mean, n_valid, total(w * flag), total(w * (ok & (x == 0))),
             total(w * (ok & (x < 0))), vmax]
    return RemapStats(*(s.reshape(n, *table.grid.shape) for s in stats))
