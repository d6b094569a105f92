"""Instrument invariance figures: latent distances within / across instruments, retrieval,
and the q-grid template baseline."""

from __future__ import annotations

import numpy as np
import pytest

from gisaxs_bluesky.models.invariance import latent_invariance, qgrid_template_distances


def _labels(n_samples=12, per=4):
    identity = np.repeat(np.arange(n_samples), per)
    instrument = identity * 2 + np.tile([0, 1], n_samples * per // 2)  # two set-ups a sample
    structure = identity % 3
    return identity, instrument, structure


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_latent_invariance_tells_an_invariant_latent_from_one_that_holds_the_instrument(shift):
    rng = np.random.default_rng(0)
    identity, instrument, structure = _labels()
    centres = rng.normal(size=(12, 8)) * 2
    offsets = rng.normal(size=(24, 8))  # each set-up moves its frames its own way
    z = centres[identity] + shift * offsets[instrument] + 0.05 * rng.normal(size=(48, 8))
    r = latent_invariance(z, identity, instrument, structure)
    if shift == 0:
        assert r["across_over_same_instrument"] == pytest.approx(1, abs=0.2)
        assert r["nearest_across_same_sample"] == 1.0
        assert r["other_over_across"] > 10
    else:
        assert r["across_over_same_instrument"] > 20
        assert r["nearest_across_same_sample"] < 0.5
    assert r["frames_compared"] == 48


def test_latent_invariance_needs_a_sample_on_two_instruments():
    identity = np.repeat(np.arange(4), 2)
    with pytest.raises(ValueError, match="instruments-per-identity"):
        latent_invariance(np.zeros((8, 2)), identity, identity, identity)


def test_template_distance_is_level_free_and_compares_what_both_frames_see():
    rng = np.random.default_rng(1)
    pattern = rng.uniform(0, 3, size=(128, 128)).astype(np.float32)
    x = np.zeros((3, 8, 128, 128), dtype=np.float32)
    x[:, 1] = 1
    x[0, 0] = pattern
    x[1, 0] = pattern + 0.7  # another dose: only the level moves
    x[1, :, :, 64:] = 0  # and a detector that sees half of the grid
    x[2, 0] = rng.uniform(0, 3, size=(128, 128))  # another sample
    d = qgrid_template_distances(x)
    assert d[0, 1] == pytest.approx(0, abs=1e-9) and d[1, 0] == pytest.approx(0, abs=1e-9)
    assert d[0, 2] > 0.01
    x[1, 1, :, :] = 0  # sees nothing at all: nothing to compare
    assert np.isinf(qgrid_template_distances(x)[0, 1])
