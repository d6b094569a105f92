"""A q-grid model end to end: simulated across instruments, trained, loaded, encoding frames of
instruments it has not seen with their geometry; the pixel model is not touched."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gisaxs_bluesky.models import make_binner
from gisaxs_bluesky.models.dataset import DatasetSpec, generate
from gisaxs_bluesky.models.qmodel import QEncoder, is_qgrid_card, load_qencoder
from gisaxs_bluesky.models.train import train
from gisaxs_bluesky.models.train_config import TrainConfig
from gisaxs_bluesky.sim import NoiseSpec, Sample, simulate
from gisaxs_bluesky.sim.instruments import HELD_OUT, at_wavelength


@pytest.fixture(scope="module")
def q_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("qgrid")
    data = generate(d / "train.h5", DatasetSpec(n_identities=10, frames_per_identity=2, seed=5,
                                                instruments="train", input_mode="qgrid"),
                    workers=1, progress=False)
    val = generate(d / "val.h5", DatasetSpec(n_identities=5, frames_per_identity=2, seed=6,
                                             instruments="train", input_mode="qgrid"),
                   workers=1, progress=False)
    out = d / "q.pt"
    card = train(data, out, val_path=val, config=TrainConfig(epochs=1, batch_identities=5,
                                                             noise_refit_epochs=0),
                 device="cpu", progress=False, name="gisaxs-dae-qgrid-test")
    return out, card


def test_card_records_grid_and_instrument_ranges(q_model):
    out, card = q_model
    assert is_qgrid_card(card)
    assert card["qgrid"]["n_q_z"] == 128 and card["qgrid"]["fold"] is True
    assert card["instruments"]["drawn"] == "train"
    assert "Eiger 4M" not in card["instruments"]["detectors"]
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored["input"] == "qgrid"


def test_encodes_frames_of_held_out_instruments_with_their_geometry(q_model):
    encoder = load_qencoder(q_model[0], "cpu")
    for name in ("p03_pilatus1m_2.4m", "lab_ccd1024_cu_1.2m"):
        geometry = HELD_OUT[name]
        sample = at_wavelength(Sample(), geometry.wavelength_nm)
        frames = np.stack([simulate(sample, geometry, NoiseSpec(3.0, {"poisson": 1.0}), seed=s,
                                    compute_binning=6).counts for s in range(2)])
        result = encoder.encode(frames, geometry.instrument())
        assert result.latent.shape == (2, encoder.encoder.latent_dim)
        assert np.isfinite(result.latent).all() and (result.radius_nm > 0).all()
        # a theta scan: each frame with its own geometry
        per_frame = encoder.encode_frames(list(frames), [geometry.instrument(),
                                                         geometry.instrument().with_incidence(
                                                             geometry.incidence_deg * 1.5)])
        np.testing.assert_allclose(per_frame.latent[0], result.latent[0], rtol=1e-4, atol=1e-4)
        assert not np.allclose(per_frame.latent[1], result.latent[1], atol=1e-4)


def test_pixel_model_is_refused_as_a_q_model():
    from gisaxs_bluesky.models import load_pretrained

    with pytest.raises(ValueError, match="not a q-grid model"):
        QEncoder(load_pretrained("cpu"))


def test_held_out_instrument_report_with_the_baseline_alongside(q_model):
    from gisaxs_bluesky.models.evaluate import evaluate_instruments

    encoder = load_qencoder(q_model[0], "cpu")
    report = evaluate_instruments(encoder, instruments=("lab_ccd1024_cu_1.2m",), n_identities=5,
                                  frames_per_identity=2, dose_levels=(3.0,))
    row = report["lab_ccd1024_cu_1.2m"]["3"]
    assert row["frames"] == 10
    for key in ("ari_vs_identity", "baseline_ari_vs_identity"):
        assert -1.0 <= row[key] <= 1.0
    for key in ("homogeneity_structure", "baseline_homogeneity_structure",
                "outlier_fraction_clean", "structure_accuracy"):
        assert 0.0 <= row[key] <= 1.0
    assert row["radius_rel_rmse"] >= 0
    assert row["latent_same_sample_q95"] >= 0 and row["latent_other_samples_q05"] >= 0
    binner = make_binner(encoder.encoder)
    assert row["binner_join_distance"] == pytest.approx(binner.config.join_radius * binner.spread)


def test_latent_separation_on_known_latents():
    from gisaxs_bluesky.binning import OnlineBinner
    from gisaxs_bluesky.models.evaluate import latent_separation

    z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    row = latent_separation(z, np.array([0, 0, 1, 1]), OnlineBinner(spread=3.0))
    assert row["latent_same_sample_q95"] == pytest.approx(1.0)
    assert row["latent_other_samples_q05"] == pytest.approx(10.0)
    assert row["binner_join_distance"] == pytest.approx(3.0 * OnlineBinner().config.join_radius)


def test_cross_instrument_report(q_model):
    """The same samples on two held-out set-ups (same seed, same samples; each set-up's
    geometry), one binner: pair fractions are consistent with the bins."""
    from gisaxs_bluesky.models.evaluate import _held_out_frames, evaluate_cross_instrument

    a = _held_out_frames("p03_pilatus1m_2.4m", 3, 1, 3.0, seed=7)
    b = _held_out_frames("lab_ccd1024_cu_1.2m", 3, 1, 3.0, seed=7)
    np.testing.assert_array_equal(a[4], b[4])  # radii: the same samples
    assert a[0][0].shape != b[0][0].shape  # on other detectors
    encoder = load_qencoder(q_model[0], "cpu")
    row = evaluate_cross_instrument(encoder, n_identities=3, frames_per_identity=2, seed=7)
    assert row["frames"] == 12 and row["instruments"] == ["p03_pilatus1m_2.4m",
                                                         "lab_ccd1024_cu_1.2m"]
    assert row["chance"] == pytest.approx(1 / 3)
    for key in ("pairs_same_sample_in_one_bin", "pairs_other_samples_in_one_bin",
                "baseline_pairs_same_sample_in_one_bin", "outlier_fraction_clean",
                "nearest_across_same_sample", "baseline_nearest_across_same_sample",
                "qgrid_baseline_nearest_across_same_sample"):
        assert 0.0 <= row[key] <= 1.0, key
    if row["bins"] == 1:  # one bin holds every pair
        assert row["pairs_same_sample_in_one_bin"] == row["pairs_other_samples_in_one_bin"] == 1
    # the baseline has as many clusters as samples: some pair shares one, not all do
    assert row["baseline_pairs_other_samples_in_one_bin"] < 1.0
    assert len(row["per_setup"]) == 2
    for side in row["per_setup"]:
        assert 0.0 <= side["structure_accuracy"] <= 1.0 and side["radius_rel_rmse"] >= 0
    # each set-up has 6 of the 12 frames: the flagged fractions average to the whole
    assert np.mean([s["outlier_fraction_clean"] for s in row["per_setup"]]) == pytest.approx(
        row["outlier_fraction_clean"])


def test_cross_setup_figures_take_a_pixel_model_as_it_is():
    """The shipped pixel model on the same two sets (its pixels, no remap): the same figures,
    without the q-grid template baseline, which needs q-grid input."""
    from gisaxs_bluesky.models import load_pretrained
    from gisaxs_bluesky.models.evaluate import _held_out_frames, cross_setup_figures

    sets = [_held_out_frames(name, 3, 2, 3.0, seed=7)
            for name in ("p03_pilatus1m_2.4m", "lab_ccd1024_cu_1.2m")]
    row = cross_setup_figures(load_pretrained("cpu"), sets, seed=7)
    assert row["frames"] == 12 and row["chance"] == pytest.approx(1 / 3)
    assert "qgrid_baseline_nearest_across_same_sample" not in row
    assert 1 <= row["bins"] <= 12 and -1.0 <= row["ari_vs_identity"] <= 1.0
    assert [len(s) for s in row["per_setup"]] == [4, 4]


def test_homogeneity_and_baseline_on_separable_frames():
    from gisaxs_bluesky.models.evaluate import baseline_bins, homogeneity

    assert homogeneity([0, 0, 1, 1], [5, 5, 6, 6]) == 1.0
    assert homogeneity([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5
    rng = np.random.default_rng(0)
    frames = [rng.poisson(lam, (256, 256)).astype(np.int32)
              for lam in (1.0, 1.0, 50.0, 50.0) for _ in range(3)]
    for f in frames[6:]:
        f[:128] = 0  # the second kind: dark top half
    labels = baseline_bins(frames, [None] * len(frames), 2)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]


def test_geometry_outside_the_trained_ranges_is_named(q_model):
    from gisaxs_bluesky.models.qmodel import geometry_outside_card

    card = q_model[1]
    inside = HELD_OUT["p03_pilatus1m_2.4m"].instrument()
    assert geometry_outside_card(inside, card) == []
    hard_x_rays = inside.__class__(**{**inside.__dict__, "wavelength_nm": 0.05})
    assert any("wavelength_nm=0.05" in r for r in geometry_outside_card(hard_x_rays, card))
    far = inside.__class__(**{**inside.__dict__, "distance_mm": 20000.0})
    reasons = geometry_outside_card(far, card)
    assert any("distance_mm=20000" in r for r in reasons)
    assert any("sees q up to" in r for r in reasons)


def test_invariance_report_on_samples_measured_on_two_instruments(q_model, tmp_path):
    from gisaxs_bluesky.models.invariance import evaluate_invariance

    data = generate(tmp_path / "x.h5", DatasetSpec(
        n_identities=3, frames_per_identity=4, seed=31, instruments="train", input_mode="qgrid",
        instruments_per_identity=2), workers=1, progress=False)
    encoder = load_qencoder(q_model[0], "cpu")
    r = evaluate_invariance(encoder, data)
    assert (r["frames"], r["samples"], r["instruments_per_identity"]) == (12, 3, 2)
    for key in ("same_sample_same_instrument", "same_sample_across_instruments", "other_samples"):
        assert np.isfinite(r[key]) and r[key] > 0
    assert 0 <= r["nearest_across_same_sample"] <= 1 and r["frames_compared"] == 12
    assert 0 <= r["baseline_nearest_across_same_sample"] <= 1
    one = generate(tmp_path / "one.h5", DatasetSpec(n_identities=2, frames_per_identity=2,
                                                    seed=32, instruments="train",
                                                    input_mode="qgrid"),
                   workers=1, progress=False)
    with pytest.raises(ValueError, match="instruments-per-identity"):
        evaluate_invariance(encoder, one)


def test_real_frame_report_remaps_with_the_geometry_given(q_model, tmp_path):
    """`evaluate --real` with a q-grid model: the frame is remapped with the user's geometry
    (the frame's own shape filling ``detector_shape``); without one, or with a detector of
    another shape, the frame's report says what is wrong and the others still come."""
    from gisaxs_bluesky.models.evaluate import evaluate_real

    encoder = load_qencoder(q_model[0], "cpu")
    p03 = HELD_OUT["p03_pilatus1m_2.4m"]
    frame = simulate(at_wavelength(Sample(), p03.wavelength_nm), p03,
                     NoiseSpec(3.0, {"poisson": 1.0}), seed=1, compute_binning=6).counts
    path = tmp_path / "p03.npy"
    np.save(path, frame)
    record = p03.instrument()
    ref = np.linspace(0.0, 1.0, 11)

    (report,) = evaluate_real(encoder, [path], reference_errors=ref, geometry=record)
    direct = encoder.encode(frame, record)
    assert report["model_input"] == "qgrid" and report["geometry_outside_card"] == []
    assert report["geometry"] == record.to_dict()
    assert report["structure"] == str(direct.structure[0])
    assert report["radius_nm"] == round(float(direct.radius_nm[0]), 2)
    assert report["recon_error"] == round(float(direct.recon_error[0]), 4)
    assert np.isfinite(report["outlier_score"]) and report["outlier_score"] >= 0
    assert sum(report["structure_prob"].values()) == pytest.approx(1.0, abs=0.01)

    # keys as a beamline writes them, no detector named: the frame gives the shape
    keys = {"pixel_size_mm": list(record.pixel_size_mm), "distance_mm": record.distance_mm,
            "wavelength_nm": record.wavelength_nm,
            "beam_center_px": list(record.beam_center_px), "incidence_deg": record.incidence_deg}
    (from_keys,) = evaluate_real(encoder, [path], reference_errors=ref, geometry=keys)
    assert from_keys["geometry"]["detector_shape"] == list(frame.shape)
    assert np.isfinite(from_keys["radius_nm"])

    ccd = tmp_path / "ccd.npy"
    np.save(ccd, np.ones((1024, 1024), np.int32))
    (none,) = evaluate_real(encoder, [path], reference_errors=ref)
    wrong, ok = evaluate_real(encoder, [ccd, path], reference_errors=ref,
                              geometry={**keys, "detector": "Pilatus 1M"})
    assert "--geometry" in none["error"] and "q-grid model" in none["error"]
    assert "1024" in wrong["error"] and "error" not in ok
