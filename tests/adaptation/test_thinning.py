"""Binomial thinning: the halves' means and independence on Poisson fields; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from gisaxs_bluesky.adaptation.thinning import ThinningError, binomial_split


def _field(shape=(400, 500), seed=0):
    """A smooth, strongly varying Poisson mean (0.05 to ~60 counts) and one draw from it."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[: shape[0], : shape[1]]
    lam = 0.05 + 60 * np.exp(-((r - 150) ** 2 + (c - 300) ** 2) / (2 * 80.0**2))
    return lam, rng.poisson(lam).astype(np.int32)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_halves_are_independent_poisson_with_the_split_means(p):
    lam, k = _field()
    pair = binomial_split(k, p, rng=1)
    assert pair.a.dtype == k.dtype and pair.b.dtype == k.dtype
    np.testing.assert_array_equal(pair.a + pair.b, k)
    n = k.size
    total = lam.sum()
    # the sum of a half is Poisson(p * total): 5 standard deviations
    for half, frac in ((pair.a, p), (pair.b, 1 - p)):
        assert abs(half.sum() - frac * total) < 5 * np.sqrt(frac * total)
        # per pixel Var = mean (Poisson), pooled over pixels with the known mean
        resid = (half - frac * lam) / np.sqrt(frac * lam)
        assert abs(resid.mean()) < 5 / np.sqrt(n)
        assert abs(resid.var() - 1) < 5 * np.sqrt(2 / n) + 0.01  # var of chi2 / n (+kurtosis)
    # independence: standardised residuals of the halves uncorrelated, |r| < 5 / sqrt(n)
    ra = (pair.a - p * lam) / np.sqrt(p * lam)
    rb = (pair.b - (1 - p) * lam) / np.sqrt((1 - p) * lam)
    r = np.corrcoef(ra.ravel(), rb.ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(n), r
    # the same statistic catches a dependent split (k // 2 and the rest): it can fail
    da, db = k // 2, k - k // 2
    rd = np.corrcoef(((da - lam / 2) / np.sqrt(lam / 2)).ravel(),
                     ((db - lam / 2) / np.sqrt(lam / 2)).ravel())[0, 1]
    assert rd > 0.5


def test_same_seed_same_halves_and_float_counts_accepted():
    _, k = _field((50, 60))
    a1 = binomial_split(k, rng=3).a
    a2 = binomial_split(k.astype(np.float32), rng=3).a
    np.testing.assert_array_equal(a1, a2)
    assert binomial_split(k.astype(np.float32), rng=3).a.dtype == np.float32


def test_flags_and_mask_stay_in_both_halves():
    _, k = _field((60, 80))
    k[:, 10] = -1  # Pilatus gap
    k[5, 5] = -2  # bad pixel
    mask = np.zeros(k.shape, bool)
    mask[20:25, 30:40] = True
    k[20:25, 30:40] = -7  # anything under a mask is not data: no error
    f = k.astype(np.float64)
    f[40, 40] = np.nan
    for frame in (k, f):
        pair = binomial_split(frame, mask=mask, rng=0)
        for half in (pair.a, pair.b):
            assert (half[:, 10] == -1).all() and half[5, 5] == -2
            assert (half[20:25, 30:40] == -7).all()
        assert pair.excluded[:, 10].all() and pair.excluded[20:25, 30:40].all()
    assert np.isnan(binomial_split(f, mask=mask, rng=0).b[40, 40])


def test_bad_counts_give_clear_errors():
    frame = np.full((10, 10), 4.0, dtype=np.float32)
    frame[3, 7] = 2.5
    with pytest.raises(ThinningError, match=r"pixel \(3, 7\) = .*2\.5 is not an integer count"):
        binomial_split(frame, name="ccd.tif")
    frame = np.full((10, 10), 4, dtype=np.int32)
    frame[2, 1] = -5
    with pytest.raises(ThinningError, match=r"ccd.tif: pixel \(2, 1\) = -5 is a negative count"):
        binomial_split(frame, name="ccd.tif")
    with pytest.raises(ValueError, match="split fraction p=1.0"):
        binomial_split(np.ones((4, 4), np.int32), 1.0)
    with pytest.raises(ThinningError, match="2-D"):
        binomial_split(np.ones((2, 4, 4), np.int32))
