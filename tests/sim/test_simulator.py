"""Physics and noise of the simulator: each test checks a number that physics fixes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.signal import find_peaks

from gisaxs_bluesky.models.dataset import DatasetSpec
from gisaxs_bluesky.sim import (
    NOISE_KINDS,
    Geometry,
    NoiseSpec,
    Sample,
    nominal_mask,
    simulate,
)
from gisaxs_bluesky.sim.physics import (
    hexagonal_peak_positions,
    hexagonal_sf,
    paracrystal_sf,
    scattered_intensity,
)
from gisaxs_bluesky.sim.reality import find_real_data, galaxi_yoneda_check

GEOMETRY = Geometry()


def _row_cut(sample: Sample, row: float, cols: np.ndarray) -> np.ndarray:
    return scattered_intensity(GEOMETRY, sample, np.array([[row]]), cols[None, :])[0]


def _predicted_col(row: float, q_target: float, kind: str) -> float:
    """Column right of the beam where |q| (sphere) or q_par (cylinder) reaches q_target."""
    cols = np.linspace(GEOMETRY.beam_center_px[1], GEOMETRY.shape[1] - 1, 20001)
    qx, qy, qz = GEOMETRY.q(np.full_like(cols, row), cols)
    q = np.sqrt(qx**2 + qy**2 + qz**2) if kind == "sphere" else np.hypot(qx, qy)
    return float(np.interp(q_target, q, cols))


def _first_min_col(profile: np.ndarray, cols: np.ndarray) -> float:
    minima, _ = find_peaks(-np.log(profile))
    return float(cols[minima[0]])


def test_sphere_form_factor_zero_on_predicted_pixel():
    radius = 5.0
    sample = Sample("spheres_dilute", radius_nm=radius, polydispersity=0.0, approximation="ba")
    row = GEOMETRY.row_of_alpha_f(0.5)
    cols = np.arange(int(GEOMETRY.beam_center_px[1]) + 5, GEOMETRY.shape[1], dtype=float)
    found = _first_min_col(_row_cut(sample, row, cols), cols)
    predicted = _predicted_col(row, 4.4934 / radius, "sphere")
    assert abs(found - predicted) <= 1.0, (found, predicted)


def test_cylinder_form_factor_zero_on_predicted_pixel_in_dwba():
    radius = 6.0
    sample = Sample("cylinders_dilute", radius_nm=radius, height_nm=4.0, polydispersity=0.0)
    row = GEOMETRY.row_of_alpha_f(0.4)
    cols = np.arange(int(GEOMETRY.beam_center_px[1]) + 5, GEOMETRY.shape[1], dtype=float)
    found = _first_min_col(_row_cut(sample, row, cols), cols)
    predicted = _predicted_col(row, 3.8317 / radius, "cylinder")
    assert abs(found - predicted) <= 1.0, (found, predicted)


def test_yoneda_maximum_at_critical_angle():
    sample = Sample("cylinders_dilute", radius_nm=3.0, height_nm=3.0)
    col = GEOMETRY.beam_center_px[1] + 60
    rows = np.arange(450.0, GEOMETRY.horizon_row() - 2)
    profile = scattered_intensity(GEOMETRY, sample, rows[:, None], np.array([[col]]))[:, 0]
    found = rows[np.argmax(profile)]
    alpha_c = np.rad2deg(np.sqrt(2 * sample.delta_substrate))
    assert abs(found - GEOMETRY.row_of_alpha_f(alpha_c)) <= 2.0


def test_hexagonal_peaks_in_ratio_1_sqrt3_2_sqrt7():
    distance = 20.0
    q = np.linspace(0.05, 2.5, 50_000)
    s = hexagonal_sf(q, distance, disorder=0.02)
    peaks, _ = find_peaks(s, prominence=0.05)
    ratios = q[peaks[:4]] / q[peaks[0]]
    np.testing.assert_allclose(ratios, [1, np.sqrt(3), 2, np.sqrt(7)], rtol=0.01)
    np.testing.assert_allclose(q[peaks[0]], hexagonal_peak_positions(distance)[0], rtol=0.01)


def test_paracrystal_peak_near_two_pi_over_distance():
    distance = 30.0
    q = np.linspace(0.02, 0.5, 20_000)
    s = paracrystal_sf(q, distance, disorder=0.15)
    assert abs(q[np.argmax(s)] - 2 * np.pi / distance) / (2 * np.pi / distance) < 0.05


def test_poisson_counts_have_mean_equal_variance():
    result = simulate(Sample(), noise=NoiseSpec(20.0, {"poisson": 1.0}), seed=3, compute_binning=4)
    lam = result.expected
    pick = (~result.mask) & (lam > 5) & (lam < 200)
    z = (result.counts[pick] - lam[pick]) / np.sqrt(lam[pick])
    assert pick.sum() > 100_000
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1) < 0.02


def test_dose_sets_median_counts():
    for dose in (0.1, 1.0, 100.0):
        result = simulate(Sample(), noise=NoiseSpec(dose, {}), seed=0, compute_binning=4)
        valid = ~result.mask
        assert abs(np.median(result.expected[valid]) / dose - 1) < 0.1


def test_gaps_exactly_where_mask_says():
    result = simulate(Sample(), noise=NoiseSpec(5.0, {"poisson": 1, "gaps": 1}), seed=1,
                      compute_binning=4)
    gaps = GEOMETRY.detector.gap_mask()
    assert np.array_equal(result.counts == -1, gaps)
    assert result.mask[gaps].all()
    assert gaps[195:212].all() and gaps[:, 487:494].all() and not gaps[194, 0]
    unflagged = simulate(Sample(), noise=NoiseSpec(5.0, {"poisson": 1}), seed=1, compute_binning=4)
    assert (unflagged.counts[gaps] == 0).all() and (unflagged.counts >= 0).all()


def test_same_seed_same_frame_and_labels():
    noise = NoiseSpec(3.0, {k: 0.7 for k in NOISE_KINDS if k != "readout"})
    a = simulate(Sample(), noise=noise, seed=42, compute_binning=4)
    b = simulate(Sample(), noise=noise, seed=42, compute_binning=4)
    c = simulate(Sample(), noise=noise, seed=43, compute_binning=4)
    assert np.array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)
    assert a.counts.shape == (1043, 981) and a.counts.dtype == np.int32
    assert a.labels["noise"]["kinds"] == [k for k in NOISE_KINDS if k != "readout"]
    np.testing.assert_array_equal(a.noise_vector, [k != "readout" for k in NOISE_KINDS])


def test_each_noise_kind_leaves_its_mark():
    base = simulate(Sample(), noise=NoiseSpec(10.0, {"poisson": 1}), seed=5, compute_binning=4)
    valid = ~nominal_mask(GEOMETRY)

    def frame(kind):
        return simulate(Sample(), noise=NoiseSpec(10.0, {"poisson": 1, kind: 1.0}), seed=5,
                        compute_binning=4).counts

    assert (frame("hot_pixels")[valid] > 1000).sum() > (base.counts[valid] > 1000).sum() + 100
    assert (frame("dead_pixels")[valid] == 0).sum() > (base.counts[valid] == 0).sum() + 1000
    assert frame("saturation").max() == 2**20 - 1
    readout = frame("readout")
    assert readout.dtype == np.float32 and (readout[valid] < 0).any()
    assert frame("zingers").sum() > base.counts.sum()
    assert np.median(frame("parasitic")[valid]) > 1.1 * np.median(base.counts[valid])


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Sample(radius_nm=-1.0), "radius_nm=-1.0"),
        (lambda: Sample("spheres_paracrystal", radius_nm=5.0, distance_nm=8.0), "distance_nm=8.0"),
        (lambda: Sample(structure="pyramids"), "structure='pyramids'"),
        (lambda: Geometry(wavelength_nm=0.0), "wavelength_nm=0.0"),
        (lambda: Geometry(wavelength_nm=-0.1), "wavelength_nm=-0.1"),
        (lambda: NoiseSpec(1.0, {"cosmic": 1.0}), "'cosmic'"),
        (lambda: NoiseSpec(-1.0, {}), "dose_counts=-1.0"),
        (lambda: NoiseSpec(1.0, {"poisson": 2.0}), "'poisson'"),
        (lambda: DatasetSpec(p_mask=1.5), "p_mask=1.5"),
    ],
)
def test_bad_input_names_field_and_value(make, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        make()


def test_misalignment_leaks_direct_beam_past_beamstop():
    clean = simulate(Sample(), noise=NoiseSpec(10.0, {}), seed=2, compute_binning=4)
    shifted = simulate(Sample(), noise=NoiseSpec(10.0, {"misalignment": 1.0}), seed=2,
                       compute_binning=4)
    assert shifted.expected.max() > 100 * clean.expected[~clean.mask].max()
    assert dataclasses.asdict(GEOMETRY) == dataclasses.asdict(Geometry())  # nominal untouched


def test_beamstop_off_its_place_shadows_the_halo_outside_the_mask():
    # in place, the stop hides the direct beam inside the nominal mask; its halo shows around
    # it. Moved, the shadow falls on the halo: pixels that are data go dark
    clean = simulate(Sample(), noise=NoiseSpec(10.0, {}), seed=2, compute_binning=4)
    moved = simulate(Sample(), noise=NoiseSpec(10.0, {"beamstop": 1.0}), seed=2,
                     compute_binning=4)
    data = ~clean.mask & (clean.expected > 0)
    r0, c0 = Geometry().beam_center_px
    rows, cols = np.indices(clean.expected.shape)
    near = data & (np.hypot(rows - r0, cols - c0) < 60)
    ratio = moved.expected[near] / clean.expected[near]
    assert (ratio < 0.01).sum() > 200  # a shadowed disc of the 12 px stop, outside the mask
    assert np.median(clean.expected[near]) > 10 * np.median(clean.expected[data])  # the halo


def test_reality_check_yoneda_row_on_measured_pilatus_frame():
    real = find_real_data()
    path = None if real is None else real / "galaxi_pilatus1m.tif.gz"
    if path is None or not path.is_file():
        pytest.skip("../shared/data/real/galaxi_pilatus1m.tif.gz not available")
    result = galaxi_yoneda_check(path)
    assert abs(result["difference_px"]) <= 3, result
