"""The run's geometry travels with every frame to the model: real RunEngine, real Tiled, a
q-grid model (tiny, random weights: plumbing, with outputs checked against the model itself).

Start document ``gisaxs_geometry`` -> rows and the node's metadata; a theta scan changes the
geometry frame by frame; a frame without geometry gets a row naming the missing key (the scan
goes on); a geometry outside the card's ranges is flagged, encoded, not binned; replay reads
the same geometry; the pixel model records it and is otherwise unchanged.
"""

from __future__ import annotations

import threading

import bluesky.plans as bp
import numpy as np
import pyFAI.detectors
import pytest
import torch
from bluesky_tiled_plugins import TiledWriter
from inline_detector import InlineDetector
from ophyd.sim import SynAxis
from pyFAI.geometry import Geometry

from gisaxs_bluesky import query
from gisaxs_bluesky.adaptive.live import LiveEncoder
from gisaxs_bluesky.callbacks import DAEBinningCallback, serialized
from gisaxs_bluesky.cli import main
from gisaxs_bluesky.config import ModelConfig
from gisaxs_bluesky.derived import UNBINNED_BIN, UNPROCESSED_BIN
from gisaxs_bluesky.geometry import START_KEY, GeometryError, InstrumentGeometry, QGrid
from gisaxs_bluesky.models import Encoder, GisaxsDAE, load_encoder, make_binner, save_checkpoint
from gisaxs_bluesky.models.qmodel import QEncoder
from gisaxs_bluesky.pipeline import BinningPipeline
from gisaxs_bluesky.replay import ReplayOptions, replay_run
from gisaxs_bluesky.sim.detector import blob_frame_fn
from gisaxs_bluesky.store import DerivedStore
from gisaxs_bluesky.tiled_stream import TiledStreamConsumer

SHAPE = (160, 150)
GEOMETRY = {"detector_shape": list(SHAPE), "pixel_size_mm": 0.172, "distance_mm": 2000.0,
            "wavelength_nm": 0.1, "beam_center_px": [150.0, 75.0], "incidence_deg": 0.4}
RANGES = {"wavelength_nm": [0.07, 0.16], "distance_mm": [1000.0, 8000.0],
          "incidence_deg": [0.05, 0.8]}
WRITE_LOCK = threading.Lock()


@pytest.fixture(scope="module")
def q_path(tmp_path_factory):
    """A tiny q-grid checkpoint with random weights, its card as training writes one."""
    torch.manual_seed(0)
    model = GisaxsDAE(ModelConfig(base_channels=4, identity_dim=4, noise_dim=4,
                                  noise_hidden=16, refine_channels=4))
    grid = QGrid(n_q_z=128, n_q_par=128, q_z_max_nm=1.2, q_par_max_nm=0.4)
    path = tmp_path_factory.mktemp("qmodel") / "tiny-q.pt"
    save_checkpoint(path, model, {"name": "tiny-q", "version": "0", "input": "qgrid",
                                  "qgrid": grid.to_dict(), "instruments": dict(RANGES)})
    return path


@pytest.fixture
def q_encoder(q_path):
    return load_encoder(q_path, "cpu")


def frames(n: int) -> list[np.ndarray]:
    fn = blob_frame_fn(SHAPE, width_motor="x", seed=1)
    return [fn({"x": 0.5 * i}) for i in range(n)]


def scan(RE, client, tmp_path, encoder, plan, **kwargs):
    """Run ``plan`` with TiledWriter and the callback; returns (uid, node, rows)."""
    cb = DAEBinningCallback(client, encoder=encoder, binner=make_binner(encoder),
                            write_lock=WRITE_LOCK, batch_timeout=0.2, persist_binner=False,
                            backup_dir=tmp_path / "backup", spill_dir=tmp_path / "spill",
                            **kwargs)
    RE.subscribe(serialized(TiledWriter(client, batch_size=1), WRITE_LOCK))
    RE.subscribe(cb)
    (uid,) = RE(plan)
    assert cb.wait(120)
    cb.close()
    node = client["gisaxs_derived"][DerivedStore.node_key(uid, encoder.info())]
    rows = node["frames"].read().sort_values("seq_num").reset_index(drop=True)
    return uid, node, rows


def latents(rows, dim: int) -> np.ndarray:
    return np.stack([rows[f"latent_{i}"].to_numpy() for i in range(dim)], 1)


def test_start_document_geometry_reaches_a_q_grid_model_and_the_node(RE, tiled_client,
                                                                    tmp_path, q_encoder):
    images = frames(3)
    uid, node, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                           bp.count([InlineDetector(images)], 3, md={START_KEY: GEOMETRY}))
    md = node.metadata
    assert md["status"] == "complete" and md["schema_version"] == "1.2"
    assert md["model_input"] == "qgrid"
    assert md["geometry"]["record"]["distance_mm"] == 2000.0
    assert md["geometry"]["record"]["detector_shape"] == list(SHAPE)
    assert md["geometry"]["sources"]["distance_mm"] == f"start {START_KEY}"
    assert rows["seq_num"].tolist() == [1, 2, 3]
    assert (rows["bin_id"] >= 0).all() and (rows["flag"] == "").all()
    # what the model itself gives for these frames remapped with this geometry
    geometry = InstrumentGeometry.from_dict(GEOMETRY)
    direct = QEncoder(q_encoder).encode(np.stack(images), geometry)
    np.testing.assert_allclose(latents(rows, q_encoder.latent_dim), direct.latent,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows["recon_error"], direct.recon_error, rtol=1e-4, atol=1e-5)

    # replay of the stored run reads the same geometry (arrays from Tiled) and agrees
    store = DerivedStore(tiled_client, root="replayed", backup_dir=tmp_path / "rb")
    summary = replay_run(tiled_client, uid, encoder=q_encoder, store=store,
                         options=ReplayOptions(root="replayed", method="arrays"))
    assert summary.status == "complete", summary.errors
    replayed = tiled_client["replayed"][summary.node_key]
    again = replayed["frames"].read().sort_values("seq_num")
    np.testing.assert_allclose(latents(again, q_encoder.latent_dim), direct.latent,
                               rtol=1e-4, atol=1e-4)
    assert replayed.metadata["geometry"]["record"] == md["geometry"]["record"]


def test_theta_scan_changes_the_geometry_frame_by_frame(RE, tiled_client, tmp_path,
                                                        q_encoder):
    th = SynAxis(name="th")
    image = frames(1)[0]
    angles = [0.2, 0.4, 0.6]
    md = {START_KEY: {**{k: v for k, v in GEOMETRY.items() if k != "incidence_deg"},
                      "incidence_key": "th", "incidence_units": "deg"}}
    uid, node, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                           bp.list_scan([InlineDetector([image])], th, angles, md=md))
    assert node.metadata["geometry"]["sources"]["incidence_deg"] == "event th"
    assert rows["th"].tolist() == pytest.approx(angles)
    got = latents(rows, q_encoder.latent_dim)
    q = QEncoder(q_encoder)
    base = InstrumentGeometry.from_dict(GEOMETRY)
    for k, angle in enumerate(angles):  # one image, each frame at its own incidence
        direct = q.encode(image, base.with_incidence(angle))
        np.testing.assert_allclose(got[k], direct.latent[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(got[0], got[2], atol=1e-3)
    # replay reads the incidence per frame too: from the stream's column, or the documents
    for method in ("arrays", "documents"):
        store = DerivedStore(tiled_client, root=f"re_{method}", backup_dir=tmp_path / method)
        summary = replay_run(tiled_client, uid, encoder=q_encoder, store=store,
                             options=ReplayOptions(root=f"re_{method}", method=method))
        assert summary.status == "complete", (method, summary.errors)
        replayed = tiled_client[f"re_{method}"][summary.node_key]
        again = replayed["frames"].read().sort_values("seq_num")
        np.testing.assert_allclose(latents(again, q_encoder.latent_dim), got, rtol=1e-4,
                                   atol=1e-4, err_msg=method)
        assert replayed.metadata["geometry"]["sources"]["incidence_deg"] == "event th"


def test_missing_geometry_gives_rows_naming_the_key_and_the_scan_completes(
        RE, tiled_client, tmp_path, q_encoder):
    partial = {k: v for k, v in GEOMETRY.items() if k != "distance_mm"}
    uid, node, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                           bp.count([InlineDetector(frames(2))], 2, md={START_KEY: partial}))
    assert tiled_client[uid].metadata["stop"]["exit_status"] == "success"
    assert rows["seq_num"].tolist() == [1, 2]
    assert (rows["bin_id"] == UNPROCESSED_BIN).all()
    assert rows["latent_0"].isna().all()
    for flag in rows["flag"]:
        assert "distance_mm missing" in flag and "gisaxs_geometry.distance_mm" in flag
    md = node.metadata
    assert md["status"] == "failed"  # nothing could be binned: said, not hidden
    assert any("distance_mm missing" in e for e in md["errors"])
    assert "distance_mm missing" in md["geometry"]["unavailable"]


def test_no_geometry_at_all_is_refused_by_name(RE, tiled_client, tmp_path, q_encoder):
    _, _, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                      bp.count([InlineDetector(frames(1))], 1))
    assert rows["bin_id"].tolist() == [UNPROCESSED_BIN]
    assert "pixel_size_mm missing" in rows["flag"][0]
    assert "incidence_deg missing" in rows["flag"][0]


def test_a_fallback_is_the_users_explicit_choice_and_recorded_as_such(RE, tiled_client,
                                                                      tmp_path, q_encoder):
    _, node, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                         bp.count([InlineDetector(frames(1))], 1),
                         geometry_fallback=GEOMETRY)
    assert rows["bin_id"].tolist() != [UNPROCESSED_BIN] and rows["flag"][0] == ""
    sources = node.metadata["geometry"]["sources"]
    assert sources["distance_mm"] == "fallback" and sources["incidence_deg"] == "fallback"
    assert sources["detector_shape"] == "descriptor"  # what the run says comes first


def test_explicit_poni_geometry_argument_with_start_document_incidence(RE, tiled_client,
                                                                       tmp_path, q_encoder):
    geo = Geometry(detector=pyFAI.detectors.Detector(172e-6, 172e-6, max_shape=SHAPE),
                   wavelength=0.1e-9)
    geo.setFit2D(2000.0, 75.0, 150.0)
    poni = tmp_path / "calib.poni"
    geo.save(str(poni))
    _, node, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                         bp.count([InlineDetector(frames(2))], 2,
                                  md={START_KEY: {"incidence_deg": 0.4}}),
                         geometry=str(poni))
    sources = node.metadata["geometry"]["sources"]
    assert sources["distance_mm"] == "explicit poni"
    assert sources["incidence_deg"] == f"start {START_KEY}"
    assert node.metadata["geometry"]["record"]["distance_mm"] == pytest.approx(2000.0)
    assert (rows["bin_id"] >= 0).all() and (rows["flag"] == "").all()
    with pytest.raises(GeometryError, match="no such PONI file"):
        DAEBinningCallback(tiled_client, encoder=q_encoder, geometry=str(tmp_path / "x.poni"))


def test_geometry_outside_the_card_is_flagged_encoded_not_binned(RE, tiled_client, tmp_path,
                                                                 q_encoder):
    hard = {**GEOMETRY, "wavelength_nm": 0.05}
    images = frames(2)
    uid, node, rows = scan(RE, tiled_client, tmp_path, q_encoder,
                           bp.count([InlineDetector(images)], 2, md={START_KEY: hard}))
    assert (rows["bin_id"] == UNBINNED_BIN).all() and rows["is_outlier"].all()
    for flag in rows["flag"]:
        assert flag.startswith("geometry outside the model card: ")
        assert "wavelength_nm=0.05 outside the trained range [0.07, 0.16]" in flag
    direct = QEncoder(q_encoder).encode(np.stack(images), InstrumentGeometry.from_dict(hard))
    np.testing.assert_allclose(latents(rows, q_encoder.latent_dim), direct.latent,
                               rtol=1e-4, atol=1e-4)
    md = node.metadata
    assert md["bin_ids"] == [] or all(b < 0 for b in md["bin_ids"])  # no bin opened
    assert any("wavelength_nm=0.05" in e and "not binned" in e for e in md["errors"])
    ds = query.derived_for_run(tiled_client, uid)["tiny-q-0"]  # the Dataset has it too
    assert [str(f) for f in ds["flag"].values] == rows["flag"].tolist()


def test_pixel_model_records_the_geometry_and_ignores_it(RE, tiled_client, tmp_path):
    torch.manual_seed(0)
    encoder = Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    images = frames(2)
    _, node, rows = scan(RE, tiled_client, tmp_path, encoder,
                         bp.count([InlineDetector(images)], 2,
                                  md={START_KEY: {"distance_mm": 2000.0}}))  # incomplete
    md = node.metadata
    assert md["model_input"] == "pixels" and md["status"] == "complete"
    assert "pixel_size_mm missing" in md["geometry"]["unavailable"]
    assert (rows["bin_id"] >= 0).all() and (rows["flag"] == "").all()
    direct = encoder.encode(np.stack(images))
    np.testing.assert_allclose(latents(rows, encoder.latent_dim), direct.latent,
                               rtol=1e-4, atol=1e-4)


def test_tiled_stream_consumer_reads_the_incidence_per_frame(RE, tiled_server, tmp_path,
                                                              q_encoder):
    """``serve --tiled-stream``: frames read from TiledWriter's arrays, the geometry from the
    run's start document and the stream's incidence column."""
    th = SynAxis(name="th")
    image = frames(1)[0]
    angles = [0.3, 0.5]
    md = {START_KEY: {**{k: v for k, v in GEOMETRY.items() if k != "incidence_deg"},
                      "incidence_key": "th", "incidence_units": "deg"}}
    RE.subscribe(TiledWriter(tiled_server.client(), batch_size=1))
    (uid,) = RE(bp.list_scan([InlineDetector([image])], th, angles, md=md))
    consumer = TiledStreamConsumer(tiled_server.client(), q_encoder, mode="polling",
                                   existing=True, poll_interval_s=0.2,
                                   backup_dir=tmp_path / "backup").start()
    try:
        assert consumer.wait_idle(uid, timeout=60), consumer.errors
    finally:
        consumer.stop()
    client = tiled_server.client()
    node = client["gisaxs_derived"][DerivedStore.node_key(uid, q_encoder.info())]
    rows = node["frames"].read().sort_values("seq_num")
    assert node.metadata["geometry"]["sources"]["incidence_deg"] == "event th"
    base = InstrumentGeometry.from_dict(GEOMETRY)
    expected = np.concatenate([QEncoder(q_encoder).encode(image, base.with_incidence(a)).latent
                               for a in angles])
    np.testing.assert_allclose(latents(rows, q_encoder.latent_dim), expected, rtol=1e-4,
                               atol=1e-4)


def test_adaptive_live_encoder_hands_each_frame_its_geometry(RE, q_encoder):
    th = SynAxis(name="th")
    image = frames(1)[0]
    md = {START_KEY: {**{k: v for k, v in GEOMETRY.items() if k != "incidence_deg"},
                      "incidence_key": "th", "incidence_units": "deg"}}
    live = LiveEncoder(q_encoder, detector="cam_image", motors=["th"])
    RE.subscribe(live)
    try:
        (uid,) = RE(bp.list_scan([InlineDetector([image])], th, [0.3, 0.7], md=md))
        assert live.wait(60)
        rows = live.rows(uid)
    finally:
        live.close()
    assert [r["flag"] for r in rows] == ["", ""] and live.errors == []
    base = InstrumentGeometry.from_dict(GEOMETRY)
    for row, angle in zip(rows, [0.3, 0.7], strict=True):
        direct = QEncoder(q_encoder).encode(image, base.with_incidence(angle))
        np.testing.assert_allclose(row["latent"], direct.latent[0], rtol=1e-4, atol=1e-4)


def _mixed_batch(encoder):
    """One batch: two geometries interleaved, one frame without any."""
    base = InstrumentGeometry.from_dict(GEOMETRY)
    geometries = [base, base.with_incidence(0.6), base, None]
    pipeline = BinningPipeline(encoder, make_binner(encoder))
    result = pipeline.process(frames(4), [1, 2, 3, 4], [0.0] * 4, geometries=geometries)
    return result, geometries


def test_a_batch_of_mixed_geometries_keeps_frame_order(q_encoder):
    result, geometries = _mixed_batch(q_encoder)
    q = QEncoder(q_encoder)
    images = frames(4)
    for k in range(3):  # regrouped per geometry for the remap, back in frame order after
        direct = q.encode(images[k], geometries[k])
        np.testing.assert_allclose(result.rows["latent"][k], direct.latent[0], rtol=1e-4,
                                   atol=1e-4)
    assert result.rows["bin_id"][3] == UNPROCESSED_BIN
    assert result.rows["flag"][3].startswith("geometry: no geometry given")
    assert any(e.startswith("frame seq_num=4: geometry: no geometry given")
               for e in result.errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_q_grid_pipeline_on_the_gpu_agrees_with_the_cpu(q_path):
    cpu, _ = _mixed_batch(load_encoder(q_path, "cpu"))
    gpu, _ = _mixed_batch(load_encoder(q_path, "cuda"))  # remap in torch, fp16 autocast
    assert gpu.rows["bin_id"][3] == UNPROCESSED_BIN
    np.testing.assert_allclose(gpu.rows["latent"][:3], cpu.rows["latent"][:3], atol=2e-2)


@pytest.mark.parametrize("argv, message", [
    (["replay", "--tiled-uri", "http://127.0.0.1:9", "--geometry", "{bad", "uid"],
     "--geometry: not valid JSON"),
    (["replay", "--tiled-uri", "http://127.0.0.1:9", "--geometry", '{"distanse_mm": 1}', "u"],
     "unknown key(s) ['distanse_mm']"),
    (["serve", "--zmq", "127.0.0.1:9", "--tiled-uri", "http://127.0.0.1:9", "--poni",
      "/nonexistent/calib.poni"], "--poni '/nonexistent/calib.poni': no such file"),
    (["serve", "--tiled-stream", "http://127.0.0.1:9", "--geometry-fallback", "nope.json"],
     "geometry file nope.json"),
])
def test_command_line_geometry_flags_are_checked_at_start_up(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
