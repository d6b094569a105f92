"""A bin's representative frame: the medoid denoised by the run's model, on (q_par, q_z) axes
in 1/nm when the run's start document carries ``gisaxs_geometry``; pixel axes and why without.

Real parts: a RunEngine writing a simulated detector through TiledWriter into an in-process
Tiled, the shipped pretrained DAE, pyFAI through the geometry package.
"""

from __future__ import annotations

import bluesky.plans as bp
import httpx
import numpy as np
import pytest
import torch
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky.geometry import geometry_for_frame, pixel_q, remap, remap_table
from gisaxs_bluesky.models import Encoder, GisaxsDAE, load_model
from gisaxs_bluesky.models.inference import to_detector_resolution
from gisaxs_bluesky.models.preprocess import preprocess_q
from gisaxs_bluesky.models.qmodel import grid_from_card
from gisaxs_bluesky.sim.detector import blob_frame_fn, make_gisaxs_detector, make_motors
from gisaxs_bluesky.store import DerivedStore
from gisaxs_bluesky.view import BackgroundServer, ViewState, build_view_app
from gisaxs_bluesky.view.medoid import MedoidFrames, q_grid_for

SHAPE = (300, 280)  # >= the denoiser's 256 x 256; a Gaussian blob at the centre
GEOMETRY = {"detector_shape": list(SHAPE), "pixel_size_mm": 0.172, "distance_mm": 3000.0,
            "energy_kev": 12.0, "beam_center_px": [280, 140], "incidence_deg": 0.3}
BLOB_PX = (149.5, 139.5)  # the blob's centre (row, col)


@pytest.fixture(scope="module")
def encoder():
    return load_model("pretrained", "cpu")


def _scan(RE, client, directory, **md) -> str:
    (x,) = make_motors("x")
    det = make_gisaxs_detector(directory, blob_frame_fn(SHAPE, width_motor="x"), [x],
                               shape=SHAPE, dtype=np.int32)
    token = RE.subscribe(TiledWriter(client, batch_size=1))
    (uid,) = RE(bp.scan([det], x, 0.0, 0.5, 3), **md)
    RE.unsubscribe(token)
    return uid


def _md(uid: str, encoder) -> dict:
    return {"raw_uid": uid, "stream": "primary", "image_key": "pilatus",
            "model": encoder.info(), "model_id": f"{encoder.name}-{encoder.version}"}


def _z(payload) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in payload["z"]])


def test_medoid_frame_is_the_denoised_frame_on_q_axes(RE, tiled_client, detector_dir, encoder):
    uid = _scan(RE, tiled_client, detector_dir, gisaxs_geometry=GEOMETRY)
    frames = MedoidFrames(tiled_client)
    p = frames.render(_md(uid, encoder), 2)
    assert p["image"] == "denoised" and p["coords"] == "q" and p["notes"] == []
    assert p["x_title"] == "q_par (nm⁻¹)" and p["y_title"] == "q_z (nm⁻¹)"
    assert p["geometry_source"] == "the run's documents"
    assert p["model_id"] == f"{encoder.name}-{encoder.version}"

    # the axes are the geometry's q: both sides of the beam, q_z from the horizon up
    geometry = geometry_for_frame(tiled_client[uid].metadata["start"])
    q_par, q_z, alpha_f = pixel_q(geometry)
    x, y, z = np.array(p["x"]), np.array(p["y"]), _z(p)
    assert z.shape == (len(y), len(x))
    assert (np.diff(x) > 0).all() and (np.diff(y) < 0).all()
    step = x[1] - x[0]
    above = alpha_f >= 0
    assert abs(x[0] - q_par[above].min()) < 1.5 * step
    assert abs(x[-1] - q_par[above].max()) < 1.5 * step
    assert abs(y[0] - q_z[above].max()) < 1.5 * step
    assert abs(y[-1] - q_z[above].min()) < 1.5 * step
    # the blob sits where its pixels' q is
    r, c = np.unravel_index(np.nanargmax(z), z.shape)
    peak_q = q_par[int(BLOB_PX[0]), int(BLOB_PX[1])], q_z[int(BLOB_PX[0]), int(BLOB_PX[1])]
    assert abs(x[c] - peak_q[0]) < 3 * step and abs(y[r] - peak_q[1]) < 3 * step

    # the image is the model's denoiser output of that frame, remapped
    frame = np.asarray(tiled_client[uid]["primary"]["pilatus"][1])
    xin, fine = encoder.preprocess_with_fine([frame])
    d = encoder.encode_preprocessed(xin, fine=fine, return_denoised=True)["denoised"][0]
    np.testing.assert_allclose(d, encoder.encode(frame, return_denoised=True).denoised[0],
                               atol=1e-5)
    rel = np.expm1(to_detector_resolution(d, fine[0, 1] > 0, frame.shape))
    stats = remap(remap_table(geometry, q_grid_for(geometry)), rel.astype(np.float32))
    expected = np.where(stats.n_valid[0] > 0, np.log1p(stats.mean[0]), np.nan)
    rows = np.flatnonzero(np.isfinite(expected).any(axis=1))
    cols = np.flatnonzero(np.isfinite(expected).any(axis=0))
    expected = expected[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    np.testing.assert_allclose(z, expected, atol=2e-4)

    # ... and not the raw frame: the same frame without the model is noisier
    raw = MedoidFrames(tiled_client).render({**_md(uid, encoder), "model": {
        "name": "gone", "version": "1", "sha256": "f" * 64}}, 2)
    assert raw["image"] == "raw" and raw["coords"] == "q"
    assert "not available to the view" in raw["notes"][0]
    zr = _z(raw)
    assert zr.shape == z.shape

    def roughness(a):
        return np.nanmedian(np.abs(np.diff(a, axis=1)))

    assert roughness(z) < 0.8 * roughness(zr)  # 0.65 measured
    ok = np.isfinite(z) & np.isfinite(zr)
    assert np.corrcoef(z[ok], zr[ok])[0, 1] > 0.8  # the same pattern


def test_without_geometry_pixel_axes_and_the_reason(RE, tiled_client, detector_dir, encoder):
    uid = _scan(RE, tiled_client, detector_dir)
    p = MedoidFrames(tiled_client).render(_md(uid, encoder), 1)
    assert p["image"] == "denoised" and p["coords"] == "pixels"
    assert p["x_title"] == "detector column (pixels)"
    assert p["notes"] == ["detector pixels: the run records no instrument geometry (no "
                          "gisaxs_geometry in its start document)"]
    assert _z(p).shape == (100, 93)  # 3 x 3 blocks of 300 x 280
    assert p["x"][0] == 1.5 and p["y"][-1] == 298.5


def test_view_serves_the_denoised_medoid_of_a_bin(RE, tiled_client, detector_dir, encoder,
                                                  tmp_path):
    uid = _scan(RE, tiled_client, detector_dir, gisaxs_geometry=GEOMETRY)
    writer = DerivedStore(tiled_client, backup_dir=tmp_path / "backup").open(
        uid, scan_id=1, model=encoder.info(), binner={"recon_threshold": 1.0}, latent_dim=4,
        noise_kinds=["hot_pixels"], motors=["x"])
    n = 3
    writer.append({"seq_num": np.arange(1, n + 1), "time": np.zeros(n), "bin_id": np.zeros(n, int),
                   "outlier_score": np.zeros(n, "f4"), "is_outlier": np.zeros(n, bool),
                   "recon_error": np.zeros(n, "f4"),
                   "latent": np.array([[0, 0, 0, 0], [1, 1, 1, 1], [3, 3, 3, 3.0]]),
                   "noise_prob": np.zeros((n, 1), "f4"), "structure": np.array(["lamellar"] * n),
                   "radius_nm": np.full(n, 5.0), "distance_nm": np.full(n, 20.0),
                   "x": np.array([0.0, 0.25, 0.5])})
    writer.flush()
    state = ViewState(tiled_client, tiled_label="test", mode="polling")
    server = BackgroundServer(build_view_app(state)).start()
    try:
        run = httpx.get(f"{server.url}/api/run/{writer.key}", timeout=60).json()
        (b,) = run["bins"]
        assert b["medoid_seq"] == 2  # latent mean 1.33: seq 2 is nearest
        r = httpx.get(f"{server.url}/api/run/{writer.key}/frame/2", timeout=120)
        assert r.status_code == 200, r.text
        f = r.json()
        assert f["image"] == "denoised" and f["coords"] == "q" and f["units"] == "nm⁻¹"
        assert f["z"] == MedoidFrames(tiled_client).render(dict(state.watcher.follow(
            writer.key).metadata), 2)["z"]
    finally:
        state.close()
        server.stop()


def test_a_qgrid_model_shows_its_own_clean_pattern_on_its_grid(RE, tiled_client, detector_dir):
    torch.manual_seed(0)
    card = {"name": "q-untrained", "version": "0", "input": "qgrid",
            "qgrid": {"q_z_max_nm": 1.2, "q_par_max_nm": 0.6}}
    qenc = Encoder(GisaxsDAE(), card, "cpu")
    uid = _scan(RE, tiled_client, detector_dir, gisaxs_geometry=GEOMETRY)
    p = MedoidFrames(tiled_client, model=qenc).render(_md(uid, qenc), 1)
    assert p["image"] == "denoised" and p["coords"] == "q"
    assert p["x_title"] == "|q_par| (nm⁻¹)" and p["y_title"] == "q_z (nm⁻¹)"
    grid = grid_from_card(card)
    assert len(p["x"]) == len(p["y"]) == 64  # the decoder's 64 x 64 of the 128 x 128 grid
    assert p["x"][0] == pytest.approx(2 * grid.q_par_step / 2, abs=1e-4)
    assert p["y"][0] == pytest.approx(grid.q_z_max_nm - grid.q_z_step, abs=1e-4)
    frame = np.asarray(tiled_client[uid]["primary"]["pilatus"][0])
    x = preprocess_q(frame, geometry_for_frame(tiled_client[uid].metadata["start"]), grid=grid)
    recon = qenc.encode_preprocessed(x, return_denoised=True)["denoised"][0]
    z = _z(p)
    ok = np.isfinite(z)
    assert ok.sum() > 100 and (~ok).sum() > 100  # seen bins and blank ones
    np.testing.assert_allclose(z[ok], recon[ok], atol=2e-4)
