"""q-grid training aids: coverage dropout renormalised as q_inputs would, and the decoder's
pattern put on the frame's own level (shift-free reconstruction)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gisaxs_bluesky.config import ModelConfig
from gisaxs_bluesky.geometry import QGrid, remap, remap_table
from gisaxs_bluesky.models.dae import GisaxsDAE, level_offset, pooled_level
from gisaxs_bluesky.models.preprocess import coverage_masks, drop_coverage, q_inputs
from gisaxs_bluesky.sim import NoiseSpec, Sample, simulate
from gisaxs_bluesky.sim.instruments import HELD_OUT, at_wavelength


def _frames(name: str, n: int = 3):
    geometry = HELD_OUT[name]
    sample = at_wavelength(Sample(), geometry.wavelength_nm)
    frames = np.stack([simulate(sample, geometry, NoiseSpec(30.0, {"poisson": 1.0}), seed=s,
                                compute_binning=6).counts for s in range(n)])
    table = remap_table(geometry.instrument(), QGrid())
    return remap(table, frames), table


def test_dropped_coverage_is_what_q_inputs_gives_without_those_bins():
    stats, table = _frames("eiger4m_1.5m")
    x, _ = q_inputs(stats, table)
    good = x[:, 1] > 0
    drop = coverage_masks(good, 1.0, np.random.default_rng(3))
    kept = good & ~drop
    assert drop.any(axis=(1, 2)).all()
    assert (kept.sum(axis=(1, 2)) > 0.1 * good.sum(axis=(1, 2))).all()

    out = drop_coverage(torch.from_numpy(x), 1.0, np.random.default_rng(3)).numpy()
    # the same frames remapped by a detector that does not see those bins
    fewer = dataclasses.replace(stats, n_valid=np.where(drop, 0, stats.n_valid))
    expected, scales = q_inputs(fewer, table)
    assert (out[np.broadcast_to(drop[:, None], out.shape)] == 0).all()
    for ch in (0, 3):  # renormalised by the median of the bins still seen
        np.testing.assert_allclose(out[:, ch][kept], expected[:, ch][kept], rtol=2e-3, atol=2e-3)
    for ch in (1, 2, 4, 5, 6, 7):
        np.testing.assert_allclose(out[:, ch][kept], x[:, ch][kept])
    assert not np.allclose(out[:, 0][kept], x[:, 0][kept], atol=1e-2)  # the level did move


def test_coverage_dropout_leaves_frames_whole_at_p0_and_keeps_a_tenth():
    stats, table = _frames("p03_pilatus1m_2.4m", 2)
    x = torch.from_numpy(q_inputs(stats, table)[0])
    assert torch.equal(drop_coverage(x, 0.0, np.random.default_rng(0)), x)
    good = (x[:, 1] > 0).flatten(1).sum(1)
    for seed in range(20):
        kept = (drop_coverage(x, 1.0, np.random.default_rng(seed))[:, 1] > 0).flatten(1).sum(1)
        assert ((kept == good) | (kept >= 0.1 * good)).all()


def test_aligned_pattern_sits_on_the_frames_level_and_ignores_the_targets():
    torch.manual_seed(0)
    stats, table = _frames("lab_ccd1024_cu_1.2m", 2)
    x = torch.from_numpy(q_inputs(stats, table)[0])
    plain = GisaxsDAE(ModelConfig()).eval()
    aligned = GisaxsDAE(ModelConfig(align_recon=True)).eval()
    aligned.load_state_dict(plain.state_dict())
    with torch.no_grad():
        raw, out = plain(x)["recon"], aligned(x)["recon"]
    log_i, weight = pooled_level(x)
    assert weight.sum() > 100
    np.testing.assert_allclose(level_offset(out, log_i, weight).numpy(), 0, atol=1e-4)
    # only the level moved: the pattern is the plain decoder's plus one number per frame
    shift = (out - raw).flatten(1)
    np.testing.assert_allclose(shift.std(1).numpy(), 0, atol=1e-5)
    assert (shift[:, 0].abs() > 1e-3).all()
