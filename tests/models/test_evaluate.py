"""`gisaxs-bluesky evaluate` with the shipped model: held-out simulation and measured frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gisaxs_bluesky.cli import main
from gisaxs_bluesky.models import load_pretrained
from gisaxs_bluesky.models.evaluate import evaluate_real, evaluate_simulated

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def encoder():
    return load_pretrained("cpu")


def test_shipped_model_on_held_out_simulation(encoder):
    m = evaluate_simulated(encoder, n_identities=10, frames_per_dose=4, n_clean=10, n_psnr=2)
    assert m["frames"] == 20 and set(m["noise_f1"]) == set(encoder.noise_kinds)
    # small samples: loose floors well below the full evaluation's figures (README)
    assert m["noise_macro_f1"] > 0.6
    assert min(m["bins_ari_vs_structure"].values()) > 0.6
    assert m["radius_rel_rmse"] < 0.25
    # the denoiser beats both the raw frame and plain block means at 1 count / pixel
    assert m["psnr_gain_db_at_1_count"] > m["psnr_gain_db_at_1_count_block_means_only"] > 3


def test_evaluate_real_reports_and_survives_bad_files(encoder, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    cube = tmp_path / "cube.npy"
    np.save(cube, np.zeros((2, 3, 4)))
    frame = tmp_path / "frame.npy"
    np.save(frame, np.random.default_rng(0).poisson(5, (619, 487)).astype(">i4"))
    reports = evaluate_real(encoder, [bad, cube, frame], reference_errors=np.linspace(0, 1, 11))
    assert "cannot read detector frame" in reports[0]["error"]
    assert "broken.tif" in reports[0]["error"]
    assert "not a 2-D frame" in reports[1]["error"]
    assert reports[2]["shape"] == [619, 487]
    assert 0 <= reports[2]["recon_error_percentile_vs_sim"] <= 100
    assert set(reports[2]["noise_prob"]) == set(encoder.noise_kinds)


@pytest.mark.skipif(not (REAL / "galaxi_pilatus1m.tif.gz").exists(),
                    reason="../shared/data/real is not present")
def test_evaluate_cli_on_measured_frames(capsys):
    assert main(["evaluate", "--real", str(REAL), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_name = {r["file"]: r for r in out["real"]}
    galaxi = by_name["galaxi_pilatus1m.tif.gz"]
    assert galaxi["shape"] == [1043, 981] and galaxi["mask"] == "pilatus1m_mask.tif"
    assert galaxi["dtype"] == "int32" and galaxi["flagged_pixels"] == 7301  # pixels at -1
    assert "poisson" in galaxi["noise_kinds_detected"]
    assert 0 <= galaxi["recon_error_percentile_vs_sim"] <= 100
    assert by_name["pspb05_180.tif"]["dtype"] == "uint16"
