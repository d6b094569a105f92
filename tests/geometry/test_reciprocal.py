"""Frames on one (q_z, q_par) grid: analytic positions on different instruments, corrections,
validity, numba and torch agree, the table is cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gisaxs_bluesky.geometry import GeometryError, QGrid, remap, remap_table, remap_torch
from gisaxs_bluesky.geometry.reciprocal import _lab
from gisaxs_bluesky.sim import Detector, Geometry

GEOMETRIES = {
    "pilatus1m_1.7m": Geometry(),
    "eiger4m_3m_13keV": Geometry(
        detector=Detector("Eiger 4M", (2167, 2070), 0.075, (), ()), distance_mm=3000.0,
        wavelength_nm=0.0954, incidence_deg=0.25, beam_center_px=(1900.0, 700.0)),
    "ccd1024_lab_1m": Geometry(
        detector=Detector("CCD 1024", (1024, 1024), 0.0648, (), ()), distance_mm=1000.0,
        wavelength_nm=0.154, incidence_deg=0.6, beam_center_px=(880.0, 512.0)),
}


def _rod_frame(geometry: Geometry, g_nm: float, width_nm: float = 0.012) -> np.ndarray:
    """Bragg rods of a grating along the beam at |q_y| = n g (n = 1, 2), from the simulator's
    own pixel -> q (an independent code path), on a flat background."""
    qx, qy, qz = geometry.q(*geometry.pixel_grid)
    rods = sum(np.exp(-0.5 * ((np.abs(qy) - n * g_nm) / width_nm) ** 2) / n for n in (1, 2))
    return (5.0 + 1000.0 * rods).astype(np.float32)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_bragg_rods_land_at_their_analytic_q_on_every_instrument(name):
    geometry = GEOMETRIES[name]
    period_nm = 12.0
    g = 2 * np.pi / period_nm
    grid = QGrid()
    table = remap_table(geometry.instrument(), grid)
    stats = remap(table, _rod_frame(geometry, g))
    valid = stats.n_valid[0] > 0
    assert valid.sum() > 500, valid.sum()
    profile = np.where(valid, stats.mean[0], 0).sum(0) / np.maximum(valid.sum(0), 1)
    q = grid.q_par_centres()
    for n in (1, 2):
        near = np.abs(q - n * g) < 0.15
        if not valid[:, near].any(axis=0).all():
            continue  # this detector does not reach the second order
        i = np.flatnonzero(near)[np.argmax(profile[near])]
        # parabolic refinement of the peak bin
        a, b, c = profile[i - 1 : i + 2]
        peak = q[i] + 0.5 * (a - c) / (a - 2 * b + c) * grid.q_par_step
        assert abs(peak - n * g) < 0.3 * grid.q_par_step, (name, n, peak, n * g)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_nothing_below_the_horizon_or_outside_the_detector(name):
    geometry = GEOMETRIES[name]
    instrument = geometry.instrument()
    grid = QGrid()
    table = remap_table(instrument, grid)
    k_sin_ai = instrument.k_nm * np.sin(np.deg2rad(instrument.incidence_deg))
    rows = np.flatnonzero(table.valid.any(axis=1))
    assert grid.q_z_centres()[rows].min() >= k_sin_ai - grid.q_z_step
    # the largest |q_par| seen is what the detector edge farthest from the beam reaches
    cols = geometry.shape[1] - 1 - geometry.beam_center_px[1], geometry.beam_center_px[1]
    farthest = instrument.k_nm * np.sin(np.arctan(max(cols) * instrument.pixel_size_mm[1]
                                                  / instrument.distance_mm))
    seen = grid.q_par_centres()[np.flatnonzero(table.valid.any(axis=0))].max()
    assert seen <= min(farthest, grid.q_par_max_nm) + grid.q_par_step


def test_gaps_and_flags_are_invalid_and_solid_angle_is_corrected():
    geometry = GEOMETRIES["pilatus1m_1.7m"]
    instrument = geometry.instrument()
    table = remap_table(instrument, QGrid())
    # pixels see intensity in proportion to their solid angle: corrected, the grid is flat
    solid = _lab(instrument, 1)[3]
    frame = (1000.0 * solid).astype(np.float32)
    frame[geometry.detector.gap_mask()] = -1  # the detector's own gap flag
    stats = remap(table, frame)
    valid = stats.n_valid[0] > 0
    np.testing.assert_allclose(stats.mean[0][valid], 1000.0, rtol=1e-4)
    # gap pixels never enter the table (the Pilatus gaps from pyFAI): no flagged weight
    assert stats.n_flagged[0].sum() == 0
    # a flagged pixel that is not a gap is counted as flagged, not as data
    row, col = 300, 700
    frame[row, col] = -2
    flagged = remap(table, frame).n_flagged[0]
    assert flagged.sum() == pytest.approx(1.0)


def test_table_is_cached_per_geometry_and_checks_shapes():
    instrument = GEOMETRIES["ccd1024_lab_1m"].instrument()
    assert remap_table(instrument) is remap_table(instrument)
    other = remap_table(instrument.with_incidence(0.3))
    assert other is not remap_table(instrument)
    assert not np.array_equal(other.valid, remap_table(instrument).valid)
    with pytest.raises(GeometryError, match=r"frame of shape \(10, 10\) does not match detector_shape"):
        remap(other, np.zeros((1, 10, 10)))
    with pytest.raises(GeometryError, match="mask shape"):
        remap_table(instrument, mask=np.zeros((5, 5), dtype=bool))


def test_ccd_circular_active_area_is_left_out():
    geometry = Geometry(detector=Detector("CCD 1024", (1024, 1024), 0.0648, (), ()),
                        distance_mm=1000.0, wavelength_nm=0.154, incidence_deg=0.6,
                        beam_center_px=(880.0, 512.0))
    instrument = geometry.instrument()
    assert instrument.detector == "CCD 1024"
    mask = instrument.inactive_mask()
    assert mask[0, 0] and mask[0, 1023] and not mask[512, 512]
    table = remap_table(instrument)
    assert not np.isin(np.flatnonzero(mask), table.indices).any()


def test_numba_and_torch_remaps_agree():
    geometry = GEOMETRIES["eiger4m_3m_13keV"]
    table = remap_table(geometry.instrument())
    rng = np.random.default_rng(0)
    frames = rng.poisson(3.0, size=(2, *geometry.shape)).astype(np.float32)
    frames[0, 100:110, 500:520] = -1
    frames[1, 1500, 800] = np.nan
    a = remap(table, frames)
    b = remap_torch(table, torch.as_tensor(frames))
    for name in ("mean", "n_valid", "n_flagged", "n_zero", "n_negative", "max"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name).numpy(), rtol=1e-5,
                                   atol=1e-4, err_msg=name)


def test_a_list_of_frames_remaps_as_the_stacked_batch_on_any_thread_split():
    """Frames handed over one by one (never stacked) of mixed dtypes, whole frames per thread
    (batch >= threads) or bins shared out (fewer frames): the same statistics as one thread."""
    geometry = GEOMETRIES["ccd1024_lab_1m"]
    table = remap_table(geometry.instrument())
    rng = np.random.default_rng(2)
    frames = rng.poisson(4.0, size=(5, *geometry.shape)).astype(np.int32)
    frames[2, 600:620, 400:410] = -2
    serial = remap(table, frames, threads=1)
    mixed = [frames[0], frames[1].astype(np.uint16), frames[2].astype(">i4"),
             frames[3].astype(np.float64), frames[4]]
    for result in (remap(table, mixed, threads=2), remap(table, frames, threads=3),
                   remap(table, frames[:1], threads=2)):
        n = result.mean.shape[0]
        for name in ("mean", "n_valid", "n_flagged", "n_zero", "n_negative", "max"):
            # a converted dtype sums in another compiled loop: equal to float32 rounding
            np.testing.assert_allclose(getattr(result, name), getattr(serial, name)[:n],
                                       rtol=1e-6, atol=0, err_msg=name)
    assert serial.n_flagged[2].sum() > 0 and serial.n_flagged[[0, 1, 3, 4]].sum() == 0
    with pytest.raises(GeometryError, match="no frames to remap"):
        remap(table, [])
    with pytest.raises(GeometryError, match=r"frame of shape \(10, 10\)"):
        remap(table, [frames[0], np.zeros((10, 10))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_remap_on_cuda_matches_numba():
    geometry = GEOMETRIES["pilatus1m_1.7m"]
    table = remap_table(geometry.instrument())
    frames = np.random.default_rng(1).poisson(10.0, size=(4, *geometry.shape)).astype(np.int32)
    a = remap(table, frames)
    b = remap_torch(table, torch.as_tensor(frames, device="cuda"))
    np.testing.assert_allclose(a.mean, b.mean.cpu().numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(a.n_valid, b.n_valid.cpu().numpy())
