"""Gain estimation on simulated CCD frames of known gain / readout noise (photon transfer)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gisaxs_bluesky.adaptation.gain import (
    GainError,
    counting_by_gain,
    estimate_gain,
    looks_counting,
    to_photon_counts,
)
from gisaxs_bluesky.adaptation.thinning import binomial_split
from gisaxs_bluesky.sim import Geometry, NoiseSpec, Sample, nominal_mask, simulate

SAMPLE = Sample("spheres_paracrystal", radius_nm=5, distance_nm=30)


@pytest.fixture(scope="module")
def expected():
    """Expected photons per pixel of one simulated frame (median ~5) and its mask."""
    geo = Geometry()
    r = simulate(SAMPLE, geo, NoiseSpec(dose_counts=5.0, kinds={"poisson": 1}), seed=1,
                 compute_binning=4)
    return r.expected, nominal_mask(geo)


def _ccd(expected, gain, read, rng, offset=0.0):
    photons = rng.poisson(expected)
    return photons * gain + offset + rng.normal(0, read, expected.shape), photons


@pytest.mark.parametrize("gain,read", [(0.6, 0.5), (1.7, 4.5), (3.0, 2.0)])
def test_single_frame_and_repeated_frames_recover_gain_and_read_noise(expected, gain, read):
    lam, mask = expected
    rng = np.random.default_rng(0)
    one = estimate_gain(_ccd(lam, gain, read, rng)[0], mask)
    assert one.method == "single-frame-patches"
    stack = np.stack([_ccd(lam, gain, read, rng)[0] for _ in range(4)])
    rep = estimate_gain(stack, mask)
    assert rep.method == "repeated-frames"
    for est in (one, rep):
        assert est.gain_adu_per_photon == pytest.approx(gain, rel=0.05), est
        assert est.read_noise_adu == pytest.approx(read, rel=0.1), est
        assert est.offset_source.startswith("assumed 0")
    assert rep.gain_stderr < 0.05 * gain


def test_simulator_readout_kind(expected):
    """The simulator's `readout` kind: sigma = 0.5 + 4 severity, gain drawn in [1 - s/2, 1 + s]."""
    geo = Geometry()
    sev = 0.75
    r = simulate(SAMPLE, geo, NoiseSpec(dose_counts=5.0, kinds={"poisson": 1, "readout": sev}),
                 seed=3, compute_binning=4)
    assert r.counts.dtype == np.float32 and (r.counts < 0).any()
    est = estimate_gain(r.counts, nominal_mask(geo))
    assert 1 - sev / 2 - 0.05 <= est.gain_adu_per_photon <= 1 + sev + 0.05
    assert est.read_noise_adu == pytest.approx(0.5 + 4 * sev, rel=0.1)
    assert not looks_counting(r.counts, nominal_mask(geo))


def test_offset_from_dark_frames_and_conversion_to_counts(expected):
    lam, mask = expected
    rng = np.random.default_rng(5)
    gain, read, offset = 2.0, 1.5, 100.0
    adu, photons = _ccd(lam, gain, read, rng, offset)
    dark = np.stack([offset + rng.normal(0, read, lam.shape) for _ in range(3)])
    est = estimate_gain(adu, mask, dark=dark)
    assert est.offset_source == "dark frames"
    assert est.offset_adu == pytest.approx(offset, abs=0.1)
    assert est.read_noise_adu == pytest.approx(read, rel=0.05)
    assert est.gain_adu_per_photon == pytest.approx(gain, rel=0.05)
    # dark pixels instead of dark frames: the first 100 rows see no photons
    shaded = adu.copy()
    shaded[:100] = offset + rng.normal(0, read, (100, lam.shape[1]))
    dark_px = np.zeros(lam.shape, bool)
    dark_px[:100] = True
    est2 = estimate_gain(shaded, mask, dark=dark_px)
    assert est2.offset_source == "dark pixels"
    assert est2.offset_adu == pytest.approx(offset, abs=0.1)
    assert est2.read_noise_adu == pytest.approx(read, rel=0.05)
    counts = to_photon_counts(adu, est)
    assert counts.dtype == np.int32 and counts.min() >= 0
    valid = ~mask
    # the conversion itself is unbiased where counts are low but not ~0 (at ~0 clipping at 0
    # lifts a read noise of 0.75 photons by up to ~0.3 photons); with the estimated gain, a
    # 1 % gain error is 1 % of each pixel (the estimate's accuracy is asserted above)
    exact = to_photon_counts(adu, dataclasses.replace(est, gain_adu_per_photon=gain,
                                                      offset_adu=offset))
    low = valid & (lam > 2) & (lam < 50)
    assert abs((exact[low] - photons[low]).mean()) < 0.05
    zero = valid & (lam < 0.1)
    assert 0 <= (exact[zero] - photons[zero]).mean() < 0.35
    rel = (counts[low] - photons[low]).mean() / photons[low].mean()
    assert abs(rel) < 0.05
    assert counts[valid].sum() == pytest.approx(photons[valid].sum(), rel=0.05)
    assert looks_counting(counts, mask)
    pair = binomial_split(counts, mask=mask, rng=0)  # now a counting frame: thinning works
    np.testing.assert_array_equal(pair.a[valid] + pair.b[valid], counts[valid])


def test_counting_detector_reads_gain_one(expected):
    lam, mask = expected
    frame = np.random.default_rng(2).poisson(lam).astype(np.int32)
    frame[:, 487:494] = -1
    assert looks_counting(frame)
    est = estimate_gain(frame, mask)
    assert est.gain_adu_per_photon == pytest.approx(1.0, rel=0.05)
    assert est.read_noise_adu < 0.3


def test_counting_rule_one_for_adapt_and_noise_fit(expected):
    """A counting frame with a 12 % flat-field response at ~200 counts (single-frame gain
    estimate ~1.4, which adapt's old 0.8-1.25 band called a CCD), integer CCD ADU at gain 2
    and a frame too flat for an estimate: adapt's pairs and the noise fit decide alike."""
    from gisaxs_bluesky.adaptation import AdaptConfig, ArraySource
    from gisaxs_bluesky.adaptation.halves import counts_converter
    from gisaxs_bluesky.adaptation.noise_model import _Detector

    lam, mask = expected
    rng = np.random.default_rng(5)
    flat_field = np.clip(rng.normal(1.0, 0.12, lam.shape), 0.6, 1.4)
    sharp = rng.poisson(lam * 40 * flat_field).astype(np.int32)
    assert 1.3 < estimate_gain(sharp, mask).gain_adu_per_photon < 1.5
    ccd = np.round(_ccd(lam * 6, 2.0, 0.0, rng)[0]).astype(np.int32)
    flat = np.full((64, 64), 3, dtype=np.int32)
    for frame, want in ((sharp, True), (ccd, False), (flat, True)):
        m = mask if frame.shape == mask.shape else None
        answer, est = counting_by_gain(frame, m)
        assert answer is want, est
        items = list(ArraySource([frame, frame.copy()], label="x", mask=m))
        converters, _ = counts_converter(items, AdaptConfig(), None)
        assert (converters[frame.shape] is None) is want
        det = _Detector(frame.shape)
        det.decide(items, "auto", None, 2)
        assert (det.kind == "counting") is want


def test_gain_errors():
    with pytest.raises(GainError, match="range of intensities|variance does not grow"):
        estimate_gain(np.random.default_rng(0).normal(50, 2, (256, 256)))
    with pytest.raises(GainError, match="patches"):
        estimate_gain(np.ones((20, 20)))
    with pytest.raises(GainError, match="shape"):
        estimate_gain(np.ones((2, 3, 4, 5)))
    with pytest.raises(GainError, match="dark frames shape"):
        estimate_gain(np.random.default_rng(0).poisson(5, (64, 64)), dark=np.ones((3, 3)))
