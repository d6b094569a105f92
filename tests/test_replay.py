"""Replay of catalogued runs: real Tiled (SQLite catalog, loopback server), real RunEngine,
TiledWriter, the simulated HDF5 detector, databroker's mongomock-backed catalog, real torch."""

from __future__ import annotations

import threading

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
import torch
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky import replay
from gisaxs_bluesky.callbacks import DAEBinningCallback
from gisaxs_bluesky.models import GisaxsDAE, make_binner, save_checkpoint
from gisaxs_bluesky.replay import ReplayOptions, replay_runs
from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors
from gisaxs_bluesky.sim.scene import default_scene
from gisaxs_bluesky.store import read_derived

# positions (mm) across the demo sample's regions: A, A, B, C, D, D
XS = [2.0, 6.0, 14.0, 22.0, 33.0, 37.0]


def make_checkpoint(path, *, seed: int = 0, version: str = "test1"):
    """A small random DAE whose identity head separates the scene's regions (a test model)."""
    torch.manual_seed(seed)
    model = GisaxsDAE()
    for p in model.to_identity.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_checkpoint(path, model, {"name": "dae-test", "version": version})
    return str(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "dae-test.pt")


@pytest.fixture(scope="module")
def encoder(model_path):
    return replay.load_model(model_path, "cpu")


@pytest.fixture(scope="module")
def frames() -> dict[float, np.ndarray]:
    """Pre-simulated frames at XS (Pilatus shape), re-used by the detector's frame_fn."""
    scene = default_scene()
    return {x: scene.frame({"sample_x": x}) for x in XS}


@pytest.fixture(scope="module")
def binner_state(encoder, frames, tmp_path_factory) -> str:
    """Initial binner whose spread puts frames of one region together, others apart."""
    z = encoder.encode(np.stack([frames[x] for x in XS])).identity_latent.astype(float)
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    binner = make_binner(encoder)
    binner.spread = float(max(d[0, 1], d[4, 5]) * 1.5 + 1e-6)
    path = tmp_path_factory.mktemp("binner") / "binner.json"
    binner.save(path)
    return str(path)


def fresh_binner(binner_state):
    return replay.load_binner_state(binner_state)


def frame_fn_for(frames, *, bad_at: float | None = None):
    def frame_fn(pos):
        x = float(pos["x"])
        if bad_at is not None and abs(x - bad_at) < 1e-9:
            return np.full_like(frames[XS[0]], np.nan, dtype=np.float32)
        return frames[min(frames, key=lambda k: abs(k - x))].astype(np.float32)
    return frame_fn


def scan(RE, client, directory, frames, xs=XS, *, live=None, bad_at=None, **md):
    """A TiledWriter-recorded list_scan over ``xs`` (optionally with a live callback)."""
    x, = make_motors("x")
    det = make_gisaxs_detector(directory, frame_fn_for(frames, bad_at=bad_at), [x],
                               shape=frames[XS[0]].shape, dtype=np.float32)
    docs: list = []
    tokens = [RE.subscribe(TiledWriter(client, batch_size=1)),
              RE.subscribe(lambda name, doc: docs.append((name, doc)))]
    try:
        uid, = RE(bp.list_scan([det], x, list(xs)), **md)
    finally:
        for t in tokens:
            RE.unsubscribe(t)
    if live is not None:
        # the same documents, fed after the scan: the callback and TiledWriter writing at
        # once into one in-process SQLite catalog can hit "database is locked"
        for name, doc in docs:
            live(name, doc)
    return uid, det


def options(tmp_path, model_path, binner_state, **kw) -> ReplayOptions:
    return ReplayOptions(model=model_path, backup_dir=str(tmp_path / "backup"),
                         binner_state=binner_state, **kw)


def derived(client, uid, encoder, root="gisaxs_derived"):
    return read_derived(client[root][f"{uid}-{encoder.name}-{encoder.version}"])


# ------------------------------------------------------------------------------------ tests
def test_replay_matches_live_callback(RE, tiled_client, detector_dir, tmp_path, encoder,
                                      model_path, frames, binner_state):
    live = DAEBinningCallback(tiled_client, encoder=encoder, binner=fresh_binner(binner_state),
                              root="live", backup_dir=tmp_path / "b1", spill_dir=tmp_path / "s")
    uid, _ = scan(RE, tiled_client, detector_dir, frames, live=live, sample="S1")
    assert live.wait(60)
    ref = derived(tiled_client, uid, encoder, "live")
    assert len(set(ref.bin_id.values.tolist())) >= 3  # the test model separates regions

    summaries = replay_runs(tiled_client, [uid], encoder=encoder, show_progress=False,
                            options=options(tmp_path, model_path, binner_state))
    (s,) = summaries
    assert (s.status, s.frames_written, s.frames_skipped, s.errors) == ("complete", 6, 0, [])
    out = derived(tiled_client, uid, encoder)
    np.testing.assert_array_equal(out.seq_num.values, ref.seq_num.values)
    np.testing.assert_array_equal(out.bin_id.values, ref.bin_id.values)
    np.testing.assert_array_equal(out.is_outlier.values, ref.is_outlier.values)
    np.testing.assert_array_equal(out.x.values, ref.x.values)
    np.testing.assert_allclose(out.latent.values, ref.latent.values, atol=1e-4)
    np.testing.assert_allclose(out.time.values, ref.time.values)
    for key in ("raw_uid", "scan_id", "model_id", "motors", "image_key", "latent_dim",
                "noise_kinds", "bin_counts", "status"):
        assert out.attrs[key] == ref.attrs[key], key
    assert out.attrs["producer"] == "gisaxs_bluesky.replay"


def test_replay_is_idempotent_and_models_side_by_side(RE, tiled_client, detector_dir,
                                                       tmp_path, encoder, model_path, frames,
                                                       binner_state):
    uid, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:4])
    opts = options(tmp_path, model_path, binner_state)
    first = replay_runs(tiled_client, [uid], show_progress=False, options=opts)[0]
    second = replay_runs(tiled_client, [uid], show_progress=False, options=opts)[0]
    assert (first.status, first.frames_written) == ("complete", 4)
    assert (second.status, second.frames_written, second.frames_skipped) == ("up-to-date", 0, 4)
    ds = derived(tiled_client, uid, encoder)
    assert ds.sizes["frame"] == 4 and ds.attrs["n_frames"] == 4
    assert sorted(ds.seq_num.values.tolist()) == [1, 2, 3, 4]

    other_path = make_checkpoint(tmp_path / "v2.pt", seed=1, version="test2")
    other = replay_runs(tiled_client, [uid], show_progress=False,
                        options=ReplayOptions(model=other_path, backup_dir=str(tmp_path / "b")))
    assert other[0].status == "complete"
    keys = sorted(k for k in tiled_client["gisaxs_derived"] if k.startswith(uid))
    assert keys == [f"{uid}-dae-test-test1", f"{uid}-dae-test-test2"]
    assert derived(tiled_client, uid, encoder).sizes["frame"] == 4  # first node untouched


def test_interrupted_replay_resumes(RE, tiled_client, detector_dir, tmp_path, encoder,
                                    model_path, frames, binner_state):
    uid, _ = scan(RE, tiled_client, detector_dir, frames)
    opts = options(tmp_path, model_path, binner_state, chunk_size=2)
    done = []

    def interrupt_after_first_chunk(n):
        done.append(n)
        if len(done) == 2:
            raise KeyboardInterrupt

    s = replay_runs(tiled_client, [uid], show_progress=False, options=opts,
                    progress=interrupt_after_first_chunk)[0]
    assert s.status == "interrupted" and s.frames_written == 4
    partial = derived(tiled_client, uid, encoder)
    assert partial.seq_num.values.tolist() == [1, 2, 3, 4]
    assert partial.attrs["status"] == "running"

    s2 = replay_runs(tiled_client, [uid], show_progress=False, options=opts)[0]
    assert (s2.status, s2.frames_written, s2.frames_skipped) == ("complete", 2, 4)
    resumed = derived(tiled_client, uid, encoder)
    # the same as one uninterrupted replay (binner re-seeded from the stored rows)
    full = replay_runs(tiled_client, [uid], show_progress=False,
                       options=options(tmp_path, model_path, binner_state, root="full"))[0]
    assert full.status == "complete"
    ref = derived(tiled_client, uid, encoder, "full")
    np.testing.assert_array_equal(resumed.seq_num.values, ref.seq_num.values)
    np.testing.assert_array_equal(resumed.bin_id.values, ref.bin_id.values)
    assert resumed.attrs["status"] == "complete"


def test_bad_inputs_reported_per_run(RE, tiled_client, detector_dir, tmp_path, encoder,
                                     model_path, frames, binner_state):
    from ophyd.sim import det as scalar_det

    good, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:3])
    nan_frame, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:3], bad_at=XS[1])
    lost, det = scan(RE, tiled_client, detector_dir, frames, xs=XS[:3])
    # the detector file of `lost` (the newest) is damaged after the scan
    h5 = sorted(det.directory.glob("*.h5"), key=lambda p: p.stat().st_mtime)[-1]
    with h5py.File(h5, "r+") as f:
        del f["entry/data/data"]
    tokens = RE.subscribe(TiledWriter(tiled_client, batch_size=1))
    (no_image,) = RE(bp.count([scalar_det], 2))
    RE.unsubscribe(tokens)

    opts = options(tmp_path, model_path, binner_state)
    first = replay_runs(tiled_client, [good], show_progress=False, options=opts)[0]
    assert first.status == "complete"
    before = derived(tiled_client, good, encoder)

    batch = [nan_frame, "no-such-uid", no_image, lost, good]
    by_uid = {s.uid: s for s in replay_runs(tiled_client, batch, show_progress=False,
                                            options=opts)}
    assert [by_uid[u].uid for u in batch] == batch  # every run reported, in order

    s = by_uid[nan_frame]  # corrupt frame: row with bin -2, error names run, field, seq_num
    assert s.status == "complete" and s.frames_written == 3
    assert any(nan_frame in e and "'pilatus'" in e and "seq_num=2" in e and "non-finite" in e
               for e in s.errors), s.errors
    assert derived(tiled_client, nan_frame, encoder).bin_id.values[1] == -2

    assert by_uid["no-such-uid"].status == "missing"
    assert "no-such-uid" in by_uid["no-such-uid"].errors[0]

    s = by_uid[no_image]
    assert s.status == "no-image" and "2-D image" in s.errors[0] and no_image in s.errors[0]

    s = by_uid[lost]  # unreadable frames: no rows, named field, retried by the next replay
    assert s.status in ("partial", "failed") and s.frames_written == 0
    assert any(lost in e and "'pilatus'" in e for e in s.errors), s.errors

    assert by_uid[good].status == "up-to-date"
    after = derived(tiled_client, good, encoder)
    np.testing.assert_array_equal(after.bin_id.values, before.bin_id.values)


def test_selection_by_query(RE, tiled_client, detector_dir, frames):
    a, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:1], sample="S1")
    b, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:1], sample="S2")
    c, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:1], sample="S1")
    ids = {u: tiled_client[u].metadata["start"]["scan_id"] for u in (a, b, c)}
    q = replay.build_queries(metadata={"sample": "S1"})
    assert replay.select_runs(tiled_client, *q) == [a, c]
    q = replay.build_queries(scan_ids=(ids[b], ids[c]), plan_name="list_scan")
    assert replay.select_runs(tiled_client, *q) == [b, c]
    t_b = tiled_client[b].metadata["start"]["time"]
    assert replay.select_runs(tiled_client, *replay.build_queries(since=t_b)) == [b, c]
    assert replay.select_runs(tiled_client, uids=[c, "zzz"]) == [c, "zzz"]


def test_mongo_databroker_run_replays(RE, tiled_client, tmp_path, encoder, model_path, frames,
                                      binner_state):
    from databroker.mongo_normalized import MongoAdapter
    from ophyd.sim import SynAxis, SynSignal
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    small = {x: f[::4, ::4].astype(np.int32) for x, f in frames.items()}  # inline, JSON-sized
    motor = SynAxis(name="x")
    pil = SynSignal(name="pilatus",
                    func=lambda: small[min(small, key=lambda k: abs(k - motor.position))])
    adapter = MongoAdapter.from_mongomock()
    live = DAEBinningCallback(tiled_client, encoder=encoder, binner=fresh_binner(binner_state),
                              root="live", backup_dir=tmp_path / "b1", spill_dir=tmp_path / "s")
    tokens = [RE.subscribe(adapter.get_serializer()), RE.subscribe(live)]
    (uid,) = RE(bp.list_scan([pil], motor, XS[:4]))
    for t in tokens:
        RE.unsubscribe(t)
    assert live.wait(60)

    with Context.from_app(build_app(adapter)) as ctx:
        mongo = from_context(ctx)
        assert uid in mongo
        summaries = replay_runs(mongo, [uid, "missing-uid"], target=tiled_client,
                                show_progress=False,
                                options=options(tmp_path, model_path, binner_state))
    s = summaries[0]
    assert (s.status, s.frames_written, s.errors) == ("complete", 4, []), s
    assert summaries[1].status == "missing"
    out, ref = derived(tiled_client, uid, encoder), derived(tiled_client, uid, encoder, "live")
    np.testing.assert_array_equal(out.seq_num.values, [1, 2, 3, 4])
    np.testing.assert_array_equal(out.bin_id.values, ref.bin_id.values)
    np.testing.assert_allclose(out.x.values, XS[:4])


def test_unreachable_server(tiled_server, RE, tmp_path, model_path, frames, binner_state):
    client = tiled_server.client()
    uid, _ = scan(RE, client, tmp_path / "tiled_server" / "det", frames, xs=XS[:2])
    tiled_server.stop()
    try:
        with pytest.raises(replay.ReplayError, match="cannot reach Tiled at"):
            replay.connect("http://127.0.0.1:1/api/v1")
        summaries = replay_runs(client, [uid, "other"], show_progress=False,
                                options=options(tmp_path, model_path, binner_state))
        assert [s.status for s in summaries] == ["failed", "failed"]
        assert all("Tiled unreachable" in s.errors[0] for s in summaries), summaries
    finally:
        tiled_server.start()
    from gisaxs_bluesky.cli import main

    assert main(["replay", "--tiled-uri", "http://127.0.0.1:1/api/v1", "x"]) == 2


def test_cli_and_distributed_replay(tiled_server, RE, tmp_path, model_path, encoder, frames,
                                    binner_state, capsys):
    client = tiled_server.client()
    det_dir = tmp_path / "tiled_server" / "det"
    uids = [scan(RE, client, det_dir, frames, xs=XS[i:i + 2], sample="dask")[0]
            for i in (0, 2)]
    opts = options(tmp_path, model_path, binner_state)
    summaries = replay.replay_distributed(tiled_server.uri, uids, options=opts, n_workers=2,
                                          show_progress=False)
    assert [(s.uid, s.status, s.frames_written) for s in summaries] == \
        [(u, "complete", 2) for u in uids]
    for u in uids:
        assert derived(client, u, encoder).sizes["frame"] == 2

    from gisaxs_bluesky.cli import main

    rc = main(["replay", "--tiled-uri", tiled_server.uri, "--where", "sample=dask",
               "--model", model_path, "--binner-state", binner_state, "--json",
               "--no-progress", "--backup-dir", str(tmp_path / "bk")])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count('"up-to-date"') == 2


def test_callback_method_feeds_documents(RE, tiled_client, detector_dir, tmp_path, encoder,
                                         model_path, frames, binner_state):
    """method='callback': run.documents() (json_seq_exporter) into DAEBinningCallback."""
    uid, _ = scan(RE, tiled_client, detector_dir, frames, xs=XS[:3])
    opts = options(tmp_path, model_path, None, method="callback", root="viacb")
    opts.binner_state = None
    s = replay_runs(tiled_client, [uid], encoder=encoder, show_progress=False, options=opts)[0]
    assert (s.status, s.frames_written) == ("complete", 3), s
    assert derived(tiled_client, uid, encoder, "viacb").sizes["frame"] == 3



# ------------------------------------------------------------------- faults (issue 12)
def test_two_replays_at_once_write_each_row_once(RE, tiled_client, detector_dir, tmp_path,
                                                 encoder, model_path, frames, binner_state):
    """A second replay of the same run, started while the first is half-way, writes nothing
    and says who holds the node; the first finishes; no row is stored twice."""
    uid, _ = scan(RE, tiled_client, detector_dir, frames)
    opts = options(tmp_path, model_path, binner_state, chunk_size=2)
    second: list = []

    def start_second(n):
        if not second:
            second.append(None)
            t = threading.Thread(target=lambda: second.append(replay_runs(
                tiled_client, [uid], show_progress=False, options=opts)[0]))
            t.start()
            t.join(120)

    first = replay_runs(tiled_client, [uid], show_progress=False, options=opts,
                        progress=start_second)[0]
    other = second[-1]
    assert (first.status, first.frames_written) == ("complete", 6), first
    assert (other.status, other.frames_written) == ("busy", 0), other
    assert "is being written by pid" in other.errors[0]
    node = tiled_client["gisaxs_derived"][f"{uid}-{encoder.name}-{encoder.version}"]
    stored = node["frames"].read()["seq_num"].tolist()
    assert sorted(stored) == [1, 2, 3, 4, 5, 6]  # each once
    assert node.metadata["n_frames"] == 6
    again = replay_runs(tiled_client, [uid], show_progress=False, options=opts)[0]
    assert (again.status, again.errors) == ("up-to-date", [])


def test_replay_of_a_run_still_being_written_is_partial(RE, tiled_client, detector_dir,
                                                        tmp_path, encoder, model_path, frames,
                                                        binner_state):
    x, = make_motors("x")
    det = make_gisaxs_detector(detector_dir, frame_fn_for(frames), [x],
                               shape=frames[XS[0]].shape, dtype=np.float32)
    docs: list = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(bp.list_scan([det], x, XS[:2]))
    RE.unsubscribe(token)
    writer = TiledWriter(tiled_client, batch_size=1)
    for name, doc in docs[:-1]:  # the stop document has not come yet
        writer(name, doc)
    uid = docs[0][1]["uid"]
    opts = options(tmp_path, model_path, binner_state)
    s = replay_runs(tiled_client, [uid], show_progress=False, options=opts)[0]
    assert (s.status, s.frames_written) == ("partial", 2), s
    assert any("no stop document yet" in e for e in s.errors)
    key = f"{uid}-{encoder.name}-{encoder.version}"
    assert tiled_client["gisaxs_derived"][key].metadata["status"] == "running"
    writer(*docs[-1])
    s = replay_runs(tiled_client, [uid], show_progress=False, options=opts)[0]
    assert (s.status, s.frames_skipped) == ("up-to-date", 2), s
    assert tiled_client["gisaxs_derived"][key].metadata["status"] == "complete"


def test_connect_messages_name_the_fault_never_the_key(tiled_server):
    with pytest.raises(replay.ReplayError) as err:
        replay.connect("http://127.0.0.1:1/api/v1?api_key=SECRET0123")
    assert "cannot reach Tiled" in str(err.value) and "SECRET0123" not in str(err.value)
    with pytest.raises(replay.ReplayError) as err:
        replay.connect(f"{tiled_server.base_url}/api/v1?api_key=WRONG0123")
    text = str(err.value)
    assert "refused the API key (HTTP 401" in text and "WRONG0123" not in text
    assert "cannot reach" not in text
    with pytest.raises(replay.ReplayError) as err:
        replay.connect(f"{tiled_server.base_url}/api/v1", api_key="WRONG4567")
    assert "refused the API key" in str(err.value) and "WRONG4567" not in str(err.value)
    assert replay.connect(tiled_server.uri) is not None
