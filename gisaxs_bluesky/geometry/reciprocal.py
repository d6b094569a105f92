"""Detector frames -> one fixed (q_z, q_par) grid, the same for every instrument.

The map of a geometry is computed once and cached (:func:`remap_table`): pyFAI gives every
pixel's position in the laboratory (PONI, detector tilt), its solid angle and polarisation;
exit angles are measured from the sample horizon (the surface tilted by the incidence angle)
and each pixel, split into ``s x s`` sub-pixels where bins are finer than pixels, is assigned
to the bin of its (q_par, q_z). The per-frame remap is then a gather over a CSR table (bin ->
pixels): :func:`~.gather.remap` (numba, CPU) or :func:`~.gather.remap_torch` (torch,
any device).

Validity: a bin is empty where the detector does not see it at this geometry: module gaps and
inactive area, the beamstop, a user mask, below the sample horizon, outside the detector's q
range, and per frame the pixels the detector flags (-1, -2, NaN, inf).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .detectors import GeometryError
from .qgrid import QGrid
from .record import InstrumentGeometry

__all__ = ["QGrid", "RemapTable", "pixel_q", "remap_table", "static_mask"]


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
