"""Detector frames -> one fixed (q_z, q_par) grid, the same for every instrument.

The map of a geometry is computed once and cached (:func:`remap_table`): pyFAI gives every
pixel's position in the laboratory (PONI, detector tilt), its solid angle and polarisation;
exit angles are measured from the sample horizon (the surface tilted by the incidence angle)
and each pixel, split into ``s x s`` sub-pixels where bins are finer than pixels, is assigned
to the bin of its (q_par, q_z). The per-frame remap is then a gather over a CSR table (bin ->
pixels): :func:`remap` (numba, CPU) or :func:`remap_torch` (torch, any device).

Validity: a bin is empty where the detector does not see it at this geometry: module gaps and
inactive area, the beamstop, a user mask, below the sample horizon, outside the detector's q
range, and per frame the pixels the detector flags (-1, -2, NaN, inf).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from .record import GeometryError, InstrumentGeometry

__all__ = [
    "QGrid",
    "RemapTable",
    "RemapStats",
    "pixel_q",
    "remap",
    "remap_table",
    "remap_torch",
]


@dataclass(frozen=True)
class QGrid:
    """A fixed grid in (q_z, q_par), 1/nm; row 0 is the highest q_z (as a detector image).

    ``fold=True`` maps both sides of the beam onto |q_par| (in-plane isotropic samples), so a
    detector that sees only one side still fills the grid.
    """

    n_q_z: int = 128
    n_q_par: int = 128
    q_z_max_nm: float = 2.4
    q_par_max_nm: float = 2.4
    q_z_min_nm: float = 0.0
    fold: bool = True

    def __post_init__(self) -> None:
        if self.n_q_z < 2 or self.n_q_par < 2:
            raise ValueError(f"grid {self.n_q_z} x {self.n_q_par} must be at least 2 x 2")
        if not 0 <= self.q_z_min_nm < self.q_z_max_nm or self.q_par_max_nm <= 0:
            raise ValueError(
                f"q ranges q_z [{self.q_z_min_nm}, {self.q_z_max_nm}] and q_par max "
                f"{self.q_par_max_nm} must be increasing and > 0"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_q_z, self.n_q_par)

    @property
    def q_par_min_nm(self) -> float:
        return 0.0 if self.fold else -self.q_par_max_nm

    @property
    def q_par_step(self) -> float:
        return (self.q_par_max_nm - self.q_par_min_nm) / self.n_q_par

    @property
    def q_z_step(self) -> float:
        return (self.q_z_max_nm - self.q_z_min_nm) / self.n_q_z

    def q_par_centres(self) -> np.ndarray:
        return self.q_par_min_nm + (np.arange(self.n_q_par) + 0.5) * self.q_par_step

    def q_z_centres(self) -> np.ndarray:
        """q_z of each row, decreasing (row 0 at the top)."""
        return self.q_z_max_nm - (np.arange(self.n_q_z) + 0.5) * self.q_z_step

    def bin_of(self, q_par: np.ndarray, q_z: np.ndarray) -> np.ndarray:
        """Flat bin index (row * n_q_par + col) of each (q_par, q_z), -1 outside the grid."""
        q_par = np.abs(q_par) if self.fold else q_par
        col = np.floor((q_par - self.q_par_min_nm) / self.q_par_step)
        row = np.floor((self.q_z_max_nm - q_z) / self.q_z_step)
        inside = (col >= 0) & (col < self.n_q_par) & (row >= 0) & (row < self.n_q_z)
        out = np.where(inside, row * self.n_q_par + col, -1)
        return out.astype(np.int64)

    def to_dict(self) -> dict:
        return {"n_q_z": self.n_q_z, "n_q_par": self.n_q_par, "q_z_max_nm": self.q_z_max_nm,
                "q_par_max_nm": self.q_par_max_nm, "q_z_min_nm": self.q_z_min_nm,
                "fold": self.fold}


# -- pixel -> (q_par, q_z) ------------------------------------------------------------------
_LAB_CACHE: OrderedDict = OrderedDict()
_LAB_LOCK = threading.Lock()


def _lab(geometry: InstrumentGeometry, subdivide: int):
    """Unit exit directions (x right, y up, z along the beam) of every sub-pixel, and each
    pixel's solid angle and polarisation: pyFAI, cached per detector position."""
    key = (geometry.shape, geometry.pixel_size_mm, geometry.distance_mm, geometry.wavelength_nm,
           geometry.beam_center_px, geometry.tilt_deg, geometry.tilt_plane_deg,
           geometry.polarization_factor, subdivide)
    with _LAB_LOCK:
        if key in _LAB_CACHE:
            _LAB_CACHE.move_to_end(key)
            return _LAB_CACHE[key]
    fi = geometry.pyfai_geometry()
    h, w = geometry.shape
    solid = fi.solidAngleArray(shape=(h, w)).astype(np.float32)
    if geometry.polarization_factor is not None:
        pol = fi.polarization(shape=(h, w), factor=geometry.polarization_factor)
        solid = solid * pol.astype(np.float32)
    if subdivide == 1:
        pos = fi.position_array(shape=(h, w), corners=False)  # (h, w, [z, y, x]) at centres
        z, y, x = pos[..., 0], pos[..., 1], pos[..., 2]
    else:
        # sub-pixel centres: bilinear within each pixel's four corners
        corners = fi.position_array(shape=(h, w), corners=True)  # (h, w, 4, 3)
        t = (np.arange(subdivide) + 0.5) / subdivide
        a, b = np.meshgrid(t, t, indexing="ij")  # along rows, along cols
        # pyFAI corner order: (0,0), (1,0), (1,1), (0,1) in (dim1, dim2) pixel units
        c0, c1, c2, c3 = (corners[:, :, k, None, None, :] for k in range(4))
        a = a[None, None, :, :, None]
        b = b[None, None, :, :, None]
        pos = (c0 * (1 - a) * (1 - b) + c1 * a * (1 - b) + c2 * a * b + c3 * (1 - a) * b)
        z, y, x = pos[..., 0], pos[..., 1], pos[..., 2]  # (h, w, s, s)
    norm = np.sqrt(x * x + y * y + z * z)
    # rows count from the top: "up" is -y
    out = ((x / norm).astype(np.float32), (-y / norm).astype(np.float32),
           (z / norm).astype(np.float32), solid)
    with _LAB_LOCK:
        _LAB_CACHE[key] = out
        while len(_LAB_CACHE) > 4:
            _LAB_CACHE.popitem(last=False)
    return out


def pixel_q(geometry: InstrumentGeometry, subdivide: int = 1):
    """(q_par signed, q_z, alpha_f) at every (sub-)pixel, 1/nm and rad, in the sample frame.

    The surface normal is tilted by the incidence angle towards the beam: the exit angle is
    measured from the sample horizon, not from the direct beam.
    """
    ux, uy, uz, _ = _lab(geometry, subdivide)
    ai = math.radians(geometry.incidence_deg)
    k = geometry.k_nm
    ca, sa = math.cos(ai), math.sin(ai)
    # sample frame: normal n = (0, cos ai, -sin ai), along-beam b = (0, sin ai, cos ai)
    sin_af = uy * np.float32(ca) - uz * np.float32(sa)
    along = uy * np.float32(sa) + uz * np.float32(ca)
    qx = k * (along - np.float32(ca))
    qy = k * ux
    q_par = np.sign(qy) * np.sqrt(qx * qx + qy * qy)
    q_z = k * (sin_af + np.float32(sa))
    return q_par, q_z, np.arcsin(np.clip(sin_af, -1, 1))


# -- the table ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RemapTable:
    """CSR map bin -> (pixel, weight) of one geometry on one grid.

    ``coef`` = sub-pixel fraction / (solid angle x polarisation): the intensity correction;
    ``weight`` = sub-pixel fraction (pixels per bin); ``full_weight`` the weight of a bin
    with no pixel flagged.
    """

    grid: QGrid
    geometry: InstrumentGeometry
    indptr: np.ndarray  # (n_bins + 1,) int64
    indices: np.ndarray  # (nnz,) int64 flat pixel index
    coef: np.ndarray  # (nnz,) float32
    weight: np.ndarray  # (nnz,) float32
    full_weight: np.ndarray  # (n_q_z, n_q_par) float32
    k_fz: np.ndarray  # (n_q_z, n_q_par) float32: q_z - k sin(alpha_i), the exit wave vector

    @property
    def n_bins(self) -> int:
        return self.grid.n_q_z * self.grid.n_q_par

    @property
    def valid(self) -> np.ndarray:
        """Bins this detector sees at this geometry (before per-frame flags)."""
        return self.full_weight > 0

    def bin_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_bins), np.diff(self.indptr))


_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_LOCK = threading.Lock()
_TABLE_CACHE_SIZE = 16


def _auto_subdivide(geometry: InstrumentGeometry, grid: QGrid) -> int:
    """Sub-pixels per side so that a sub-pixel is at most ~half a bin wide in q."""
    pixel_q_step = geometry.k_nm * min(geometry.pixel_size_mm) / geometry.distance_mm
    bin_step = min(grid.q_par_step, grid.q_z_step)
    return int(min(max(math.ceil(2 * pixel_q_step / bin_step), 1), 4))


def _mask_digest(mask: np.ndarray | None) -> str | None:
    if mask is None:
        return None
    return hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).hexdigest()


def remap_table(
    geometry: InstrumentGeometry,
    grid: QGrid | None = None,
    mask: np.ndarray | None = None,
    *,
    subdivide: int | None = None,
) -> RemapTable:
    """The (cached) remap of ``geometry`` onto ``grid``; ``mask`` True on pixels to leave out."""
    grid = grid or QGrid()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != geometry.shape:
            raise GeometryError(
                f"mask shape {mask.shape} does not match detector_shape {geometry.shape}"
            )
    s = subdivide or _auto_subdivide(geometry, grid)
    key = (geometry.key(), grid, _mask_digest(mask), s)
    with _TABLE_LOCK:
        if key in _TABLE_CACHE:
            _TABLE_CACHE.move_to_end(key)
            return _TABLE_CACHE[key]
    table = _build_table(geometry, grid, mask, s)
    with _TABLE_LOCK:
        _TABLE_CACHE[key] = table
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return table


def static_mask(geometry: InstrumentGeometry, mask: np.ndarray | None = None) -> np.ndarray:
    """Pixels that never hold data at this geometry: inactive area, beamstop, user mask."""
    out = geometry.inactive_mask().copy()
    if geometry.beamstop_radius_px > 0:
        r0, c0 = geometry.beam_center_px
        rows = np.arange(geometry.shape[0])[:, None]
        cols = np.arange(geometry.shape[1])[None, :]
        out |= (rows - r0) ** 2 + (cols - c0) ** 2 <= geometry.beamstop_radius_px**2
    if mask is not None:
        out |= mask
    return out


def _build_table(geometry: InstrumentGeometry, grid: QGrid, mask, s: int) -> RemapTable:
    h, w = geometry.shape
    q_par, q_z, alpha_f = pixel_q(geometry, s)
    solid = _lab(geometry, s)[3]
    bins = grid.bin_of(q_par, q_z)
    bins = np.where(alpha_f >= 0, bins, -1)  # below the horizon: the substrate's side
    excluded = static_mask(geometry, mask)
    if s > 1:
        excluded = np.broadcast_to(excluded[:, :, None, None], bins.shape)
    bins = np.where(excluded, -1, bins)
    pixel = np.broadcast_to(np.arange(h * w).reshape(h, w, *([1, 1] if s > 1 else [])),
                            bins.shape)
    keep = bins >= 0
    b = bins[keep].astype(np.int64)
    p = pixel[keep].astype(np.int64)
    # one entry per (bin, pixel): sub-pixels of one pixel in one bin add their fractions
    combined = b * (h * w) + p
    unique, counts = np.unique(combined, return_counts=True)
    b = unique // (h * w)
    p = unique % (h * w)
    weight = (counts / (s * s)).astype(np.float32)
    coef = (weight / solid.reshape(-1)[p]).astype(np.float32)
    n_bins = grid.n_q_z * grid.n_q_par
    indptr = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(b, minlength=n_bins), out=indptr[1:])
    full = np.bincount(b, weights=weight, minlength=n_bins).astype(np.float32)
    k_fz = (grid.q_z_centres() - geometry.k_nm * math.sin(math.radians(geometry.incidence_deg)))
    k_fz = np.broadcast_to(k_fz[:, None], grid.shape).astype(np.float32)
    return RemapTable(grid, geometry, indptr, p, coef, weight, full.reshape(grid.shape), k_fz)


# -- per-frame remap ------------------------------------------------------------------------
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
def _gather(frames, indptr, indices, coef, weight, f0, f1, b0, b1, out):  # pragma: no cover
    """Statistics of bins [b0, b1) of frames [f0, f1) (one thread's share; GIL released)."""
    for b in range(b0, b1):
        j0, j1 = indptr[b], indptr[b + 1]
        if j0 == j1:
            continue
        for f in range(f0, f1):
            total = 0.0
            n_valid = 0.0
            n_flag = 0.0
            n_zero = 0.0
            n_neg = 0.0
            vmax = 0.0
            for j in range(j0, j1):
                x = float(frames[f, indices[j]])
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
            _gather(np.zeros((1, 1), dtype=dtype), np.array([0, 1], dtype=np.int64),
                    np.zeros(1, dtype=np.int64), one, one, 0, 1, 0, 1,
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


def _as_batch(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[1:] != shape:
        raise GeometryError(
            f"frames of shape {frames.shape} do not match detector_shape {shape}"
        )
    if not frames.dtype.isnative or frames.dtype.kind not in "iuf" or frames.dtype == np.float16:
        frames = frames.astype(np.float32)
    return np.ascontiguousarray(frames.reshape(frames.shape[0], -1))


def remap(table: RemapTable, frames: np.ndarray, *, threads: int | None = None) -> RemapStats:
    """(N, H, W) or (H, W) frames -> per-bin statistics on the table's grid (numba, CPU).

    The bins are shared among ``threads`` threads (default: one per core, 2 to 8).
    """
    flat = _as_batch(frames, table.geometry.shape)
    n = flat.shape[0]
    _ensure_compiled(flat.dtype)
    out = np.zeros((6, n, table.n_bins), dtype=np.float32)
    args = (flat, table.indptr, table.indices, table.coef, table.weight)
    pool = _pool() if threads is None or threads > 1 else None
    workers = 1 if pool is None else (threads or pool._max_workers)
    if workers == 1:
        _gather(*args, 0, n, 0, table.n_bins, out)
    else:
        # equal shares of table entries (not of bins: most pixels sit in a few rows of bins)
        cuts = np.searchsorted(table.indptr, np.linspace(0, table.indptr[-1], workers + 1))
        cuts[0], cuts[-1] = 0, table.n_bins
        jobs = [pool.submit(_gather, *args, 0, n, int(a), int(b), out)
                for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
        for job in jobs:
            job.result()
    out = out.reshape(6, flat.shape[0], *table.grid.shape)
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
