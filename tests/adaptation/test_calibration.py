"""Binner calibration from groups of halves (no labels): spread, thresholds, reference split."""

from __future__ import annotations

import numpy as np
import pytest

from gisaxs_bluesky.adaptation.calibration import CalibrationConfig, calibrate_from_groups
from gisaxs_bluesky.binning import OnlineBinner


def _latents(n_frames=40, draws=2, frame_sd=1.0, noise_sd=0.1, seed=0):
    """Frames of 4 samples: sample centres far apart, frames of one sample 1.0 apart, halves of
    one frame 0.1 apart; two halves per draw."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, (4, 16))
    sample = np.arange(n_frames) % 4
    frame_z = centres[sample] + rng.normal(0, frame_sd, (n_frames, 16))
    rows = [(f, d) for d in range(draws) for f in range(n_frames) for _ in range(2)]
    frame = np.array([r[0] for r in rows])
    draw = np.array([r[1] for r in rows])
    z = frame_z[frame] + rng.normal(0, noise_sd, (len(rows), 16))
    err = rng.gamma(4.0, 0.1, len(rows))
    return z, err, frame, draw, sample[frame]


def test_spread_from_halves_or_from_repeat_groups():
    z, err, frame, draw, sample = _latents()
    halves, s1 = calibrate_from_groups(z, err, frame, draw)
    repeats, s2 = calibrate_from_groups(z, err, frame, draw, identity=sample)
    # halves: sqrt(16) * 0.1 * sqrt(3/4) ~ 0.35 typical distance; repeats: ~4 (frame_sd 1.0)
    assert 0.3 < s1["median_distance_within_frame"] < 0.45
    assert halves.spread < 1.0 < 3.0 < repeats.spread
    assert s2["identities"] == 4 and s1["identities"] == 40
    assert halves.recon_threshold == pytest.approx(np.quantile(err, 0.99))
    assert s1["reference_split"] == "by frame"
    # ordinary new frames of these samples: about 1 % over the reference threshold
    # (seed 0 again: the same sample centres; 400 frames, most of them new)
    new, *_ = _latents(n_frames=400, draws=1, seed=0)
    flagged = repeats.reference_score(new[::2]) > 1
    assert flagged.mean() < 0.05
    # a latent far from every sample stands out
    assert repeats.reference_score(z[:1] + 60.0)[0] > 1


def test_few_frames_split_by_thinning_and_errors():
    z, err, frame, draw, _ = _latents(n_frames=2, draws=2)
    binner, summary = calibrate_from_groups(z, err, frame, draw)
    assert summary["reference_split"].startswith("by thinning")
    assert np.isfinite(binner.reference_threshold)
    z, err, frame, draw, _ = _latents(n_frames=2, draws=1)
    with pytest.raises(ValueError, match="2 thinnings per frame"):
        calibrate_from_groups(z, err, frame, draw)
    with pytest.raises(ValueError, match=">= 4 latents"):
        calibrate_from_groups(z[:2], err[:2], frame[:2], draw[:2])
    cfg = CalibrationConfig(recon_quantile=0.5)
    b, _ = calibrate_from_groups(*_latents()[:4], config=cfg)
    assert b.config.recon_quantile == 0.5


def test_whole_frames_set_the_thresholds_and_join_the_spread():
    z, err, frame, draw, sample = _latents()
    rng = np.random.default_rng(3)
    n = frame.max() + 1
    # whole frames: at their frame's latent (shifted off the halves a little), errors lower
    zf = np.stack([z[frame == f].mean(0) for f in range(n)]) + 0.05
    ef = rng.gamma(4.0, 0.05, n)
    binner, summary = calibrate_from_groups(z, err, frame, draw, frame_latent=zf,
                                            frame_recon_error=ef)
    assert summary["thresholds_from"] == "whole frames"
    # the 99 % quantile, widened by the joint factor (either test flags at most 1 %)
    assert summary["joint_factor"] >= 1.0
    assert binner.recon_threshold == pytest.approx(
        np.quantile(ef, 0.99) * summary["joint_factor"])
    assert summary["recon_error_median"] == pytest.approx(np.median(ef))
    halves, _ = calibrate_from_groups(z, err, frame, draw)
    assert binner.spread >= halves.spread * 0.9
    with pytest.raises(ValueError, match="one per frame"):
        calibrate_from_groups(z, err, frame, draw, frame_latent=zf[:3], frame_recon_error=ef[:3])


def test_frames_held_out_of_the_fine_tuning_set_the_thresholds():
    """Frames trained on reconstruct better than the next ones: held-out frames' quantiles
    are the thresholds, so new frames like them are flagged at about 1 - quantile."""
    z, err, frame, draw, sample = _latents(n_frames=100)
    rng = np.random.default_rng(4)
    n = frame.max() + 1
    zf = np.stack([z[frame == f].mean(0) for f in range(n)])
    held = np.zeros(n, bool)
    held[rng.choice(n, 20, replace=False)] = True
    # trained-on frames reconstruct at half the error of the held-out (and of new) frames
    ef = np.where(held, 1.0, 0.5) * rng.gamma(4.0, 0.1, n)
    binner, summary = calibrate_from_groups(z, err, frame, draw, frame_latent=zf,
                                            frame_recon_error=ef, held_out=held)
    assert summary["thresholds_from"] == "20 whole frames held out of the fine-tuning"
    assert binner.recon_threshold >= np.quantile(ef[held], 0.99)
    trained_only, _ = calibrate_from_groups(z, err, frame, draw, frame_latent=zf,
                                            frame_recon_error=ef)
    new_err = rng.gamma(4.0, 0.1, 2000)  # new frames: as the held-out ones
    assert (new_err > binner.recon_threshold).mean() < 0.03
    assert (new_err > trained_only.recon_threshold).mean() > 0.1  # 14.5 % here
    with pytest.raises(ValueError, match="held_out has 3 entries"):
        calibrate_from_groups(z, err, frame, draw, frame_latent=zf, frame_recon_error=ef,
                              held_out=np.ones(3, bool) & [True, True, False])


def test_reference_cross_fitted_on_whole_frames_flags_about_one_percent():
    """Whole frames: reference centres from all of them, threshold from 5-fold cross-fitted
    distances. New ordinary frames of the same samples cross it about 1 - 0.99 of the time
    (mean over 5 beamtimes of 100 frames: 1.4 % here), a far latent stands out."""
    rates = []
    for seed in range(5):
        z, err, frame, draw, sample = _latents(n_frames=100, seed=seed)
        n = frame.max() + 1
        zf = np.stack([z[frame == f].mean(0) for f in range(n)])
        ef = np.random.default_rng(seed).gamma(4.0, 0.05, n)
        binner, summary = calibrate_from_groups(z, err, frame, draw, identity=sample,
                                                frame_latent=zf, frame_recon_error=ef)
        assert summary["reference_split"] == ("centres of all 100 frames, threshold 5-fold "
                                              "cross-fitted")
        assert len(binner.reference) == 64
        new = _latents(n_frames=4000, draws=1, seed=seed)[0][200::2]  # frames 100..3999
        rates.append((binner.reference_score(new) > 1).mean())
        assert binner.reference_score(zf[:1] + 60.0)[0] > 3
    assert 0.003 < np.mean(rates) < 0.025, rates
    # too few whole frames for 5 folds: centres from half of them, as before
    z, err, frame, draw, _ = _latents(n_frames=8)
    zf = np.stack([z[frame == f].mean(0) for f in range(8)])
    _, summary = calibrate_from_groups(z, err, frame, draw, frame_latent=zf,
                                       frame_recon_error=np.ones(8))
    assert summary["reference_split"] == "by frame"


def test_joint_quantile_bounds_the_union_of_both_flags():
    """Reconstruction and reference flags that disagree: each threshold at its 99 % quantile
    flags about 2 % of new ordinary frames together; widened to the joint 99 % quantile, about
    1 % (means over 4 beamtimes of 400 frames: one beamtime's 99 % quantile is itself uncertain
    by about 0.5 %). Frames far off on either test still stand out."""
    union = {0.99: [], None: []}
    factors = []
    for seed in range(4):
        rng = np.random.default_rng(11 + seed)
        z, err, frame, draw, sample = _latents(n_frames=400, seed=seed)
        zf = np.stack([z[frame == f].mean(0) for f in range(400)])
        ef = rng.gamma(4.0, 0.05, 400)  # independent of the latent: the tests disagree
        new_z = _latents(n_frames=4000, draws=1, seed=seed)[0][800::2]  # frames 400..3999
        new_e = rng.gamma(4.0, 0.05, len(new_z))
        for q in union:  # None: no widening (the factor stays 1)
            binner, summary = calibrate_from_groups(
                z, err, frame, draw, identity=sample, frame_latent=zf, frame_recon_error=ef,
                config=CalibrationConfig(joint_quantile=q))
            assert summary["reference_split"].endswith("5-fold cross-fitted")
            flagged = (new_e > binner.recon_threshold) | (binner.reference_score(new_z) > 1)
            union[q].append(flagged.mean())
            if q is None:
                assert summary["joint_factor"] == 1.0
            else:
                factors.append(summary["joint_factor"])
                assert binner.reference_score(zf[:1] + 60.0)[0] > 3
                assert binner.assign(zf[:1], [10.0]).is_outlier[0]  # 50x the median error
    assert all(1.0 < f < 1.3 for f in factors), factors
    assert 0.014 < np.mean(union[None]) < 0.03, union
    assert 0.005 < np.mean(union[0.99]) < 0.016, union
    assert np.mean(union[0.99]) < np.mean(union[None]) - 0.004, union


def test_widen_to_joint_quantile_checks_its_input():
    binner = OnlineBinner(recon_threshold=1.0, reference=np.zeros((1, 2)),
                          reference_threshold=1.0)
    with pytest.raises(ValueError, match="3 reconstruction errors and 2 reference"):
        binner.widen_to_joint_quantile(np.ones(3), np.ones(2), 0.99)
    with pytest.raises(ValueError, match="quantile=0"):
        binner.widen_to_joint_quantile(np.ones(2), np.ones(2), 0.0)
    # already within: the thresholds never shrink
    assert binner.widen_to_joint_quantile(np.full(5, 0.5), np.full(5, 0.5), 0.99) == 1.0
    assert binner.recon_threshold == 1.0 and binner.reference_threshold == 1.0
