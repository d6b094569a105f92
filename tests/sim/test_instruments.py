"""Training across instruments: what a drawn set-up may be, and physics that follows it."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

from gisaxs_bluesky.geometry import QGrid, remap, remap_table
from gisaxs_bluesky.models.dataset import DatasetSpec, iter_identity
from gisaxs_bluesky.models.preprocess import q_inputs
from gisaxs_bluesky.sim import Geometry, NoiseSpec, Sample, expected_intensity, nominal_mask
from gisaxs_bluesky.sim import simulate as simulate_frame
from gisaxs_bluesky.sim.geometry import Detector
from gisaxs_bluesky.sim.instruments import (
    DISTANCE_RANGE_MM,
    HELD_OUT,
    INCIDENCE_RANGE_DEG,
    MIN_Q_REACH_NM,
    TRAIN_DETECTORS,
    WAVELENGTH_RANGE_NM,
    _q_reach,
    at_wavelength,
    is_held_out,
    random_instrument,
)
from gisaxs_bluesky.sim.physics import scattered_intensity


def test_drawn_instruments_cover_the_ranges_and_never_a_held_out_one():
    rng = np.random.default_rng(1)
    drawn = [random_instrument(rng) for _ in range(60)]
    assert {g.detector.name for g in drawn} == set(TRAIN_DETECTORS)
    assert {g.beamstop_kind for g in drawn} == {"round", "rod"}
    for g in drawn:
        assert WAVELENGTH_RANGE_NM[0] <= g.wavelength_nm <= WAVELENGTH_RANGE_NM[1]
        assert DISTANCE_RANGE_MM[0] <= g.distance_mm <= DISTANCE_RANGE_MM[1]
        assert INCIDENCE_RANGE_DEG[0] <= g.incidence_deg <= INCIDENCE_RANGE_DEG[1]
        assert 0 < g.horizon_row() < g.shape[0]  # the horizon is on the detector
        assert min(_q_reach(g)) >= MIN_Q_REACH_NM
        assert not is_held_out(g)
    assert all(is_held_out(g) for g in HELD_OUT.values())


def test_named_detectors_take_their_gaps_from_pyfai():
    pilatus = Detector.named("Pilatus 1M")
    assert pilatus.gap_rows == Detector().gap_rows and pilatus.gap_cols == Detector().gap_cols
    eiger = Detector.named("Eiger 4M")
    assert eiger.shape == (2167, 2070) and eiger.pixel_size_mm == 0.075
    assert eiger.gap_rows[0] == (514, 550)
    ccd = Detector.named("CCD 1024")
    assert not ccd.counting and ccd.gap_mask()[0, 0] and not ccd.gap_mask()[512, 512]


def test_critical_angle_follows_the_wavelength():
    """delta ~ lambda^2 makes alpha_c ~ lambda: the Yoneda band moves with the instrument."""
    sample = Sample("cylinders_dilute", radius_nm=3.0, height_nm=3.0, polydispersity=0.0)
    found = {}
    for wavelength in (0.08, 0.16):
        geometry = Geometry(wavelength_nm=wavelength, incidence_deg=0.6,
                            beam_center_px=(1000.0, 500.0))
        scaled = at_wavelength(sample, wavelength)
        rows = np.arange(50.0, geometry.horizon_row() - 1)
        col = geometry.col_of_qy(0.3)
        profile = scattered_intensity(geometry, scaled, rows[:, None], np.array([[col]]))[:, 0]
        _, af = geometry.angles(rows[np.argmax(profile)], np.array(col))
        found[wavelength] = float(af)
        alpha_c = math.sqrt(2 * scaled.delta_substrate)
        assert abs(float(af) - alpha_c) < 0.06 * alpha_c
    assert found[0.16] / found[0.08] == pytest.approx(2.0, rel=0.08)


def test_ccd_frame_has_readout_noise_and_a_round_active_area():
    geometry = HELD_OUT["lab_ccd1024_cu_1.2m"]
    noise = NoiseSpec(3.0, {"poisson": 1.0, "readout": 0.5})
    result = simulate_frame(at_wavelength(Sample(), geometry.wavelength_nm), geometry, noise,
                            seed=2, compute_binning=6)
    assert result.counts.dtype == np.float32 and (result.counts < 0).any()
    assert result.mask[0, 0] and result.mask[-1, -1] and not result.mask[300, 512]
    assert not (result.counts == -1).any()


def test_rod_beamstop_covers_direct_beam_and_specular():
    geometry = HELD_OUT["lab_ccd1024_cu_1.2m"]
    mask = nominal_mask(geometry)
    r0, c0 = geometry.beam_center_px
    spec_row = geometry.row_of_alpha_f(geometry.incidence_deg)
    assert mask[int(r0), int(c0)] and mask[int(spec_row), int(c0)]
    assert not mask[int(spec_row) - int(geometry.beamstop_radius_px) - 5, int(c0)]
    clean = expected_intensity(Sample(), geometry, dose_counts=10.0, compute_binning=6)
    round_stop = expected_intensity(Sample(), dataclasses.replace(geometry, beamstop_kind="round"),
                                    dose_counts=10.0, compute_binning=6)
    # the specular spot is in the bar's shadow (a round stop leaves it open)
    spot = int(round(spec_row)), int(round(c0))
    assert clean[spot] < 1e-3 * round_stop[spot]


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_lamellar_bragg_rods_of_the_simulator_at_their_analytic_q(name):
    geometry = HELD_OUT[name]
    period = 25.0
    sample = at_wavelength(Sample("lamellar", radius_nm=6.0, height_nm=10.0, distance_nm=period,
                                  polydispersity=0.0, disorder=0.05), geometry.wavelength_nm)
    clean = expected_intensity(sample, geometry, dose_counts=100.0, compute_binning=2)
    grid = QGrid()
    table = remap_table(geometry.instrument(), grid, nominal_mask(geometry))
    stats = remap(table, clean)
    valid = stats.n_valid[0] > 0
    rows = valid.sum(1) > 10
    log_i = np.where(valid, np.log(np.maximum(stats.mean[0], 1e-6)), np.nan)[rows]
    with warnings.catch_warnings():  # q_par columns this detector does not reach
        warnings.simplefilter("ignore", RuntimeWarning)
        profile = np.nanmean(log_i, axis=0)
    q = grid.q_par_centres()
    g = 2 * np.pi / period
    for n in (1, 2, 3):
        near = np.abs(q - n * g) < 0.4 * g
        if not np.isfinite(profile[near]).all():
            continue
        i = np.flatnonzero(near)[np.nanargmax(profile[near])]
        assert abs(q[i] - n * g) <= 1.0 * grid.q_par_step, (name, n, q[i], n * g)


def test_one_sample_on_two_instruments_looks_alike_on_the_q_grid():
    """What the q grid is for: the same identity seen by two detectors at two distances."""
    a = Geometry()  # Pilatus 1M, 1.73 m
    b = Geometry(detector=Detector.named("Eiger 4M"), distance_mm=3200.0,
                 beam_center_px=(1800.0, 600.0), wavelength_nm=a.wavelength_nm,
                 incidence_deg=a.incidence_deg, beamstop_radius_px=25.0)
    grid = QGrid()

    def q_image(geometry, sample):
        clean = expected_intensity(sample, geometry, dose_counts=10.0, compute_binning=4)
        table = remap_table(geometry.instrument(), grid, nominal_mask(geometry))
        x = q_inputs(remap(table, clean), table)[0][0]
        return x[0], x[1] > 0.5

    same = Sample("spheres_paracrystal", radius_nm=5.0, distance_nm=22.0)
    other = Sample("spheres_paracrystal", radius_nm=7.0, distance_nm=35.0)
    ia, va = q_image(a, same)
    ib, vb = q_image(b, same)
    io, vo = q_image(a, other)
    both = va & vb & vo
    assert both.sum() > 1000
    # the dose normalisation differs with what each detector sees: compare shapes (centred)
    def corr(x, y):
        return np.corrcoef(x[both] - x[both].mean(), y[both] - y[both].mean())[0, 1]
    assert corr(ia, ib) > 0.97
    assert corr(ia, ib) > corr(ia, io) + 0.05


def test_q_grid_dataset_rows_and_bad_specs():
    spec = DatasetSpec(n_identities=2, frames_per_identity=2, instruments="train",
                       input_mode="qgrid", seed=3)
    rows = list(iter_identity(spec, 1))
    assert rows[0]["inputs"].shape == (8, 128, 128) and rows[0]["target"].shape == (64, 64)
    assert rows[0]["wavelength_nm"] == rows[1]["wavelength_nm"]
    assert rows[0]["detector_index"] >= 0
    with pytest.raises(ValueError, match="instruments='nowhere'"):
        DatasetSpec(instruments="nowhere")
    with pytest.raises(ValueError, match="input_mode='fourier'"):
        DatasetSpec(input_mode="fourier")
    with pytest.raises(ValueError, match="binned=False"):
        DatasetSpec(instruments="train", binned=False)


def test_one_sample_on_several_instruments():
    """instruments_per_identity=2: frames of one identity alternate between two instruments
    (geometry labels differ, sample labels do not), each with its own clean target; the first
    instrument is the one-instrument spec's."""
    one = DatasetSpec(n_identities=2, frames_per_identity=4, instruments="train",
                      input_mode="qgrid", seed=3)
    two = DatasetSpec(n_identities=2, frames_per_identity=4, instruments="train",
                      input_mode="qgrid", seed=3, instruments_per_identity=2)
    rows1, rows2 = list(iter_identity(one, 1)), list(iter_identity(two, 1))
    geom = [(r["wavelength_nm"], r["sample_distance_mm"], r["incidence_deg"]) for r in rows2]
    assert geom[0] == geom[2] != geom[1] == geom[3]
    assert geom[0] == (rows1[0]["wavelength_nm"], rows1[0]["sample_distance_mm"],
                       rows1[0]["incidence_deg"])
    for key in ("identity", "structure_index", "radius_nm", "distance_nm"):
        assert len({r[key] for r in rows2}) == 1, key
    np.testing.assert_array_equal(rows2[0]["target"], rows1[0]["target"])
    assert not np.array_equal(rows2[0]["target"], rows2[1]["target"])
    with pytest.raises(ValueError, match="instruments_per_identity > 1 needs"):
        DatasetSpec(instruments_per_identity=2)
    with pytest.raises(ValueError, match="instruments_per_identity=0"):
        DatasetSpec(instruments="train", input_mode="qgrid", instruments_per_identity=0)
