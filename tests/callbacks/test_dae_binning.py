"""DAEBinningCallback with a real RunEngine, real Tiled (SQLite + writable storage), real torch."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import bluesky.plans as bp
import numpy as np
import pytest
import torch
from bluesky_tiled_plugins import TiledWriter
from event_model import pack_event_page
from inline_detector import InlineDetector

from gisaxs_bluesky.binning import OnlineBinner
from gisaxs_bluesky.callbacks import (
    DAEBinningCallback,
    find_image_key,
    scanned_motors,
    serialized,
)
from gisaxs_bluesky.models import Encoder, GisaxsDAE, make_binner, pretrained_path
from gisaxs_bluesky.pipeline import UNPROCESSED_BIN
from gisaxs_bluesky.sim.detector import blob_frame_fn, make_gisaxs_detector, make_motors
from gisaxs_bluesky.store import DerivedStore

SHAPE = (160, 150)  # >= the model's 128 x 128 input; physics does not matter for plumbing


# ----------------------------------------------------------------------------- helpers
def untrained_encoder() -> Encoder:
    """Real torch model with fixed random weights (plumbing only, not identity)."""
    torch.manual_seed(0)
    return Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")


#: raw TiledWriter and derived writes share SQLite table storage: one writer at a time
WRITE_LOCK = threading.Lock()


def tiled_writer(client):
    return serialized(TiledWriter(client, batch_size=1), WRITE_LOCK)


def make_callback(client, tmp_path: Path, encoder=None, **kwargs) -> DAEBinningCallback:
    encoder = encoder or untrained_encoder()
    kwargs.setdefault("write_lock", WRITE_LOCK)
    kwargs.setdefault("binner", make_binner(encoder))
    kwargs.setdefault("batch_timeout", 0.2)
    return DAEBinningCallback(
        client,
        encoder=encoder,
        backup_dir=tmp_path / "backup",
        spill_dir=tmp_path / "spill",
        **kwargs,
    )


def derived_node(client, raw_uid: str, root: str = "gisaxs_derived"):
    key = DerivedStore.node_key(raw_uid, {"name": "untrained", "version": "0"})
    return client[root][key]


def blob_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    fn = blob_frame_fn(SHAPE, width_motor="x", seed=seed)
    return [fn({"x": 0.5 * i}) for i in range(n)]


def read_rows(node):
    return node["frames"].read().sort_values("seq_num").reset_index(drop=True)


# ------------------------------------------------------------------------------- tests
def test_image_key_and_motor_discovery():
    keys = {"x": {"shape": []}, "small": {"shape": [10, 10]}, "pil": {"shape": [1, 100, 90]},
            "line": {"shape": [100]}}
    assert find_image_key(keys) == "pil"
    assert find_image_key({"x": {"shape": []}}) is None
    assert scanned_motors({"motors": ("a", "b")}) == ["a", "b"]
    assert scanned_motors({"hints": {"dimensions": [(["th"], "primary")]}}) == ["th"]


def test_derived_node_beside_raw_run_one_row_per_frame(RE, tiled_client, detector_dir, tmp_path):
    """HDF5 stream_resource path: node outside the run, links to it, one row per frame."""
    (x,) = make_motors("x")
    det = make_gisaxs_detector(detector_dir, blob_frame_fn(SHAPE, width_motor="x"), [x],
                               shape=SHAPE, dtype=np.int32)
    cb = make_callback(tiled_client, tmp_path)
    RE.subscribe(tiled_writer(tiled_client))
    RE.subscribe(cb)
    (uid,) = RE(bp.scan([det], x, 0.0, 3.5, 8))
    assert cb.wait(60)

    raw = tiled_client[uid]
    assert "gisaxs_derived" not in raw  # not inside the BlueskyRun
    node = derived_node(tiled_client, uid)
    md = node.metadata
    assert md["raw_uid"] == uid and md["raw_path"] == f"/{uid}"
    assert md["status"] == "complete", md.get("errors")
    assert md["image_key"] == "pilatus" and md["stream"] == "primary"
    assert md["motors"] == ["x"] and md["n_frames"] == 8 and not md["errors"]
    assert md["model"]["name"] == "untrained"
    rows = read_rows(node)
    assert rows["seq_num"].tolist() == list(range(1, 9))
    np.testing.assert_allclose(rows["x"], np.linspace(0, 3.5, 8))
    assert (rows["bin_id"] >= 0).all()
    assert sum(md["bin_summary"]["counts"]) == 8


def _inline_docs(RE, frames, extra_cb=None) -> list[tuple[str, dict]]:
    (x,) = make_motors("x")
    docs: list[tuple[str, dict]] = []
    token = RE.subscribe(lambda n, d: docs.append((n, d)))
    if extra_cb is not None:
        token2 = RE.subscribe(extra_cb)
    RE(bp.scan([InlineDetector(frames)], x, 0.0, 1.0, len(frames)))
    RE.unsubscribe(token)
    if extra_cb is not None:
        RE.unsubscribe(token2)
    return docs


def test_event_and_event_page_paths_give_same_rows(RE, tiled_client, tmp_path):
    enc = untrained_encoder()
    # two fresh binners (OnlineBinner.copy() of an empty binner fails: binning.py from_state)
    cb_event = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root="by_event")
    docs = _inline_docs(RE, blob_frames(6), extra_cb=cb_event)  # live, event by event
    cb_page = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root="by_page")
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 6
    for name, doc in docs:
        if name == "event":
            if doc is events[0]:
                cb_page("event_page", pack_event_page(*events))
        else:
            cb_page(name, doc)
    assert cb_event.wait(60) and cb_page.wait(60)
    uid = docs[0][1]["uid"]
    a = read_rows(derived_node(tiled_client, uid, "by_event"))
    b = read_rows(derived_node(tiled_client, uid, "by_page"))
    assert len(a) == 6 and a["seq_num"].tolist() == list(range(1, 7))
    assert a.columns.tolist() == b.columns.tolist()
    for col in a.columns:
        if a[col].dtype.kind == "f":
            np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-6, err_msg=col)
        else:
            assert a[col].tolist() == b[col].tolist(), col


class FailingEncoder(Encoder):
    """Real encoder whose second model pass raises (one failing batch)."""

    calls = 0

    def encode_inputs(self, x, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated CUDA out of memory")
        return super().encode_inputs(x, **kwargs)


def test_inference_exception_does_not_abort_scan_and_is_recorded(RE, tiled_client, tmp_path):
    torch.manual_seed(0)
    enc = FailingEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    # slow frames so that batches are small and several batches happen
    cb = make_callback(tiled_client, tmp_path, enc, batch_size=3)
    RE.subscribe(cb)
    (x,) = make_motors("x")
    det = InlineDetector(blob_frames(9))
    (uid,) = RE(bp.scan([det], x, 0.0, 1.0, 9))  # completes, no exception
    assert cb.wait(60)
    node = derived_node(tiled_client, uid)
    rows = read_rows(node)
    assert rows["seq_num"].tolist() == list(range(1, 10))
    failed = rows[rows["bin_id"] == UNPROCESSED_BIN]
    assert 0 < len(failed) < 9
    errors = node.metadata["errors"]
    assert any("simulated CUDA out of memory" in e and "model error" in e for e in errors)
    assert node.metadata["n_unprocessed"] == len(failed)
    assert RE.state == "idle"


def test_bad_frames_recorded_and_scan_completes(RE, tiled_client, tmp_path):
    good = blob_frames(3)
    nan = np.full(SHAPE, np.nan, dtype=np.float32)
    complex_frame = good[0].astype(np.complex64)
    one_d = np.arange(10, dtype=np.int32)
    wrong_shape = np.zeros((140, 140), dtype=np.int32)
    frames = [good[0], nan, good[1], complex_frame, one_d, wrong_shape, good[2]]
    cb = make_callback(tiled_client, tmp_path)
    RE.subscribe(cb)
    (x,) = make_motors("x")
    (uid,) = RE(bp.scan([InlineDetector(frames)], x, 0.0, 1.0, len(frames)))
    assert cb.wait(60)
    node = derived_node(tiled_client, uid)
    rows = read_rows(node)
    assert rows["seq_num"].tolist() == list(range(1, 8))
    bad = rows.loc[rows["bin_id"] == UNPROCESSED_BIN, "seq_num"].tolist()
    assert bad == [2, 4, 5, 6]
    errors = " | ".join(node.metadata["errors"])
    assert "frame seq_num=2" in errors and "NaN" in errors
    assert "frame seq_num=4: wrong dtype complex64" in errors
    assert "frame seq_num=5: wrong ndim 1" in errors
    assert "frame seq_num=6: shape (140, 140) differs" in errors
    assert node.metadata["n_unprocessed"] == 4


def test_missing_image_key_is_recorded(RE, tiled_client, tmp_path):
    cb = make_callback(tiled_client, tmp_path, image_key="no_such_key")
    RE.subscribe(cb)
    (x,) = make_motors("x")
    (uid,) = RE(bp.scan([InlineDetector(blob_frames(2))], x, 0.0, 1.0, 2))
    assert cb.wait(30)
    md = derived_node(tiled_client, uid).metadata
    assert any("image_key 'no_such_key' not in data keys" in e for e in md["errors"])


def test_tiled_down_mid_scan_loses_no_rows(RE, tiled_server, tmp_path):
    client = tiled_server.client()
    cb = make_callback(client, tmp_path, batch_size=2, batch_timeout=0.05)
    RE.subscribe(cb)
    frames = blob_frames(10)
    backed_up: list[int] = []

    class Outage:
        """frame_fn: Tiled goes away after frame 3 and comes back before frame 8."""

        i = 0

        def __call__(self, positions):
            self.i += 1
            if self.i == 4:
                assert cb.wait(30)
                tiled_server.stop()
            if self.i == 8:
                assert cb.wait(30)
                backed_up.append(len(list((tmp_path / "backup").rglob("chunk-*.npz"))))
                tiled_server.start()
            return frames[self.i - 1]

    (x,) = make_motors("x")
    det = make_gisaxs_detector(tmp_path / "det", Outage(), [x], shape=SHAPE, dtype=np.int32)
    (uid,) = RE(bp.scan([det], x, 0.0, 1.0, 10))
    assert cb.wait(60)
    node = derived_node(client, uid)
    rows = read_rows(node)
    assert backed_up and backed_up[0] > 0  # rows of frames 4-7 waited in the local backup
    assert rows["seq_num"].tolist() == list(range(1, 11))  # nothing lost, nothing duplicated
    assert node.metadata["status"] == "complete"
    assert not list((tmp_path / "backup").rglob("chunk-*.npz"))  # backup drained


def test_queue_full_spills_to_disk_and_loses_nothing(RE, tiled_client, tmp_path):
    class SlowEncoder(Encoder):
        def encode_inputs(self, x, **kwargs):
            time.sleep(0.3)
            return super().encode_inputs(x, **kwargs)

    torch.manual_seed(0)
    enc = SlowEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    cb = make_callback(tiled_client, tmp_path, enc, max_queue=1, put_timeout=0.0, batch_size=2)
    RE.subscribe(cb)
    (x,) = make_motors("x")
    (uid,) = RE(bp.scan([InlineDetector(blob_frames(8))], x, 0.0, 1.0, 8))
    assert cb.wait(60)
    node = derived_node(tiled_client, uid)
    rows = read_rows(node)
    assert rows["seq_num"].tolist() == list(range(1, 9))
    assert (rows["bin_id"] >= 0).all()
    assert node.metadata["n_spilled"] > 0 and node.metadata["dropped_seq_nums"] == []
    assert not list((tmp_path / "spill").rglob("*.npy"))


class FirstCallSlowEncoder(Encoder):
    """Real encoder whose first batch takes 0.5 s, so that the rest of a fed scan queues up."""

    calls = 0

    def encode_inputs(self, x, **kwargs):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.5)
        return super().encode_inputs(x, **kwargs)


@pytest.fixture
def append_sizes(monkeypatch) -> list[int]:
    """Rows per Tiled append of every derived writer (a spy: the real append runs)."""
    from gisaxs_bluesky.store import DerivedRunWriter

    sizes: list[int] = []
    real_append = DerivedRunWriter.append

    def recording_append(self, rows):
        sizes.append(len(rows["seq_num"]))
        return real_append(self, rows)

    monkeypatch.setattr(DerivedRunWriter, "append", recording_append)
    return sizes


def test_at_scan_pace_rows_go_to_tiled_once_per_interval_and_wait_flushes(
        RE, tiled_client, tmp_path, append_sizes):
    """Frames arriving one by one (a batch each): the first batch is written at once, then at
    most one write per write_interval; wait() before the stop document writes the rest."""
    sizes = append_sizes
    docs = _inline_docs(RE, blob_frames(16))
    stop = docs.pop()
    assert stop[0] == "stop"
    cb = make_callback(tiled_client, tmp_path, batch_size=1, batch_timeout=0.01,
                       write_interval=0.6)
    t0 = time.monotonic()
    for name, doc in docs:
        cb(name, doc)
        if name == "event":
            time.sleep(0.1)  # the scan's pace: ~10 frames/s, each its own batch
    elapsed = time.monotonic() - t0
    assert cb.wait(60)  # mid-run: every row so far reaches Tiled
    assert sum(sizes) == 16 and sizes[0] == 1
    assert len(sizes) <= 2 + elapsed / 0.6  # not 16 writes
    node = derived_node(tiled_client, docs[0][1]["uid"])
    assert read_rows(node)["seq_num"].tolist() == list(range(1, 17))
    assert node.metadata["status"] == "running" and node.metadata["n_frames"] == 16
    cb(*stop)
    assert cb.wait(60)
    assert derived_node(tiled_client, docs[0][1]["uid"]).metadata["status"] == "complete"
    assert sum(sizes) == 16  # nothing written twice
    with pytest.raises(ValueError, match="write_interval"):
        make_callback(tiled_client, tmp_path, write_interval=-1)


@pytest.mark.parametrize("max_write_rows", [256, 8])
def test_writes_gather_behind_a_backlog(RE, tiled_client, tmp_path, append_sizes, max_write_rows):
    """A recorded scan fed at once: batches of 4 queue behind the first, and their rows go to
    Tiled in writes of up to max_write_rows (or at the run's end), not one write per batch."""
    sizes = append_sizes
    docs = _inline_docs(RE, blob_frames(24))
    torch.manual_seed(0)
    enc = FirstCallSlowEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    cb = make_callback(tiled_client, tmp_path, enc, batch_size=4, max_write_rows=max_write_rows,
                       write_interval=60)
    for name, doc in docs:
        cb(name, doc)
    assert cb.wait(60)
    assert enc.calls >= 6  # batches of at most 4 ...
    assert sum(sizes) == 24 and len(sizes) < enc.calls  # ... in fewer writes
    assert sizes[0] <= 4  # the first batch at once: the node appears with the first frames
    if max_write_rows == 256:
        assert len(sizes) <= 2
    else:  # a write once 8 rows wait (a batch may bring it to 11); the rest at the end
        assert all(8 <= s <= 11 for s in sizes[1:-1]) and sizes[-1] <= 11
    node = derived_node(tiled_client, docs[0][1]["uid"])
    assert read_rows(node)["seq_num"].tolist() == list(range(1, 25))
    assert node.metadata["n_frames"] == 24 and node.metadata["status"] == "complete"
    with pytest.raises(ValueError, match="max_write_rows"):
        make_callback(tiled_client, tmp_path, enc, max_write_rows=0)


def test_runengine_thread_is_not_blocked_by_inference(RE, tiled_client, tmp_path):
    """Documents are handled in milliseconds; encoding runs on the worker thread, frame
    preprocessing on the worker or its look-ahead thread, never on the RunEngine's."""
    seen: list[str] = []
    prepared_on: list[str] = []

    class RecordingEncoder(Encoder):
        def encode_inputs(self, x, **kwargs):
            seen.append(threading.current_thread().name)
            return super().encode_inputs(x, **kwargs)

        def preprocess(self, frames, mask=None):
            prepared_on.append(threading.current_thread().name)
            return super().preprocess(frames, mask)

    torch.manual_seed(0)
    enc = RecordingEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    cb = make_callback(tiled_client, tmp_path, enc)
    RE.subscribe(cb)
    (x,) = make_motors("x")
    RE(bp.scan([InlineDetector(blob_frames(3))], x, 0.0, 1.0, 3))
    assert cb.wait(30)
    assert seen and set(seen) == {"dae-binning"}
    assert prepared_on and set(prepared_on) <= {"dae-binning", "dae-binning-prepare_0"}


def test_binner_state_persists_across_scans(RE, tiled_client, tmp_path):
    enc = untrained_encoder()
    state = tmp_path / "binner.json"
    cb = DAEBinningCallback(tiled_client, encoder=enc, binner_state_path=state,
                            backup_dir=tmp_path / "b", spill_dir=tmp_path / "s", batch_timeout=0.2)
    (x,) = make_motors("x")
    RE.subscribe(cb)
    RE(bp.scan([InlineDetector(blob_frames(3))], x, 0.0, 1.0, 3))
    assert cb.wait(30)
    assert state.exists()
    saved = OnlineBinner.load(state)
    assert saved.n_bins == cb.binner.n_bins >= 1
    cb2 = DAEBinningCallback(tiled_client, encoder=enc, binner_state_path=state,
                             backup_dir=tmp_path / "b", spill_dir=tmp_path / "s")
    assert cb2.binner.ids.tolist() == saved.ids.tolist()


# ------------------------------------------------------------------ identity (pretrained)
@pytest.mark.skipif(
    not pretrained_path().is_file(),
    reason=f"pretrained weights {pretrained_path()} not present yet (identity needs them)",
)
def test_same_identity_shares_bin_and_defect_is_flagged(RE, tiled_client, detector_dir, tmp_path):
    from gisaxs_bluesky.models import load_pretrained
    from gisaxs_bluesky.sim.scene import default_scene

    scene = default_scene(seed=1)
    enc = load_pretrained("cpu")
    positions = [2.0, 6.0, 12.0, 17.0, 21.0, 23.0, 25.0, 25.5, 33.0, 37.0]
    (sx,) = make_motors("sample_x")
    det = make_gisaxs_detector(detector_dir, scene, [sx], shape=(1043, 981), dtype=np.int32)
    cb = DAEBinningCallback(tiled_client, encoder=enc, binner=make_binner(enc),
                            backup_dir=tmp_path / "b", spill_dir=tmp_path / "s",
                            write_lock=WRITE_LOCK)
    RE.subscribe(tiled_writer(tiled_client))
    RE.subscribe(cb)
    (uid,) = RE(bp.list_scan([det], sx, positions))
    assert cb.wait(120)
    key = DerivedStore.node_key(uid, enc.info())
    rows = read_rows(tiled_client["gisaxs_derived"][key])
    regions = [scene.region_at(x) for x in rows["sample_x"]]
    by_region: dict[str, set[int]] = {}
    for region, b, out in zip(regions, rows["bin_id"], rows["is_outlier"], strict=True):
        if region.is_defect:
            assert out, f"defect frame at bin {b} not flagged"
            continue
        first = region.name not in by_region  # may open a new bin: novelty can flag it
        by_region.setdefault(region.name, set()).add(int(b))
        assert first or not out, f"repeat frame of region {region.name} flagged as outlier"
    for name, bins in by_region.items():
        assert len(bins) == 1, f"region {name} split over bins {bins}"
    assert len(set().union(*by_region.values())) == len(by_region), "regions share a bin"


# ------------------------------------------------------------------ other frame sources
def test_frames_read_from_tiled_match_frames_read_from_file(RE, tiled_client, detector_dir,
                                                            tmp_path):
    enc = untrained_encoder()
    (x,) = make_motors("x")
    det = make_gisaxs_detector(detector_dir, blob_frame_fn(SHAPE, width_motor="x"), [x],
                               shape=SHAPE, dtype=np.int32)
    from_file = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root="f")
    from_tiled = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root="t",
                               read_from_tiled=True)
    RE.subscribe(tiled_writer(tiled_client))  # before the callback: Tiled has the frame first
    RE.subscribe(from_file)
    RE.subscribe(from_tiled)
    (uid,) = RE(bp.scan([det], x, 0.0, 2.0, 5))
    assert from_file.wait(60) and from_tiled.wait(60)
    a = read_rows(derived_node(tiled_client, uid, "f"))
    b = read_rows(derived_node(tiled_client, uid, "t"))
    assert len(a) == len(b) == 5 and (b["bin_id"] >= 0).all()
    latent = [c for c in a.columns if c.startswith("latent_")]
    np.testing.assert_allclose(a[latent].to_numpy(), b[latent].to_numpy(), rtol=1e-5, atol=1e-6)


class NpyHandler:
    """Legacy handler: resource = one .npy stack, datum_kwargs = {"index": i}."""

    def __init__(self, path, **kwargs):
        self.stack = np.load(path)

    def __call__(self, index):
        return self.stack[index]


def test_legacy_resource_datum_through_handler(tiled_client, tmp_path):
    from event_model import compose_run

    frames = np.stack(blob_frames(4))
    np.save(tmp_path / "stack.npy", frames)
    enc = untrained_encoder()
    cb = make_callback(tiled_client, tmp_path, enc, handler_registry={"NPY_STACK": NpyHandler})
    ref = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root="inline")
    run = compose_run(metadata={"motors": ["x"], "scan_id": 7})
    desc = run.compose_descriptor(name="primary", data_keys={
        "x": {"source": "sim", "dtype": "number", "shape": []},
        "img": {"source": "sim", "dtype": "array", "shape": list(SHAPE), "external": "FILESTORE:"},
    })
    res = run.compose_resource(spec="NPY_STACK", root=str(tmp_path), resource_path="stack.npy",
                               resource_kwargs={})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
            ("resource", res.resource_doc)]
    inline_docs = list(docs[:2])
    for i in range(4):
        datum = res.compose_datum(datum_kwargs={"index": i})
        docs.append(("datum", datum))
        ev = dict(data={"x": float(i), "img": datum["datum_id"]}, timestamps={"x": 0, "img": 0},
                  seq_num=i + 1, filled={"img": False}, time=float(i))
        docs.append(("event", desc.compose_event(**ev)))
        inline = dict(ev, data={"x": float(i), "img": frames[i]}, filled={})
        inline_docs.append(("event", desc.compose_event(**inline)))
    stop = run.compose_stop()
    for name, doc in docs + [("stop", stop)]:
        cb(name, doc)
    for name, doc in inline_docs + [("stop", stop)]:
        ref(name, doc)
    assert cb.wait(60) and ref.wait(60)
    uid = run.start_doc["uid"]
    a = read_rows(derived_node(tiled_client, uid))
    b = read_rows(derived_node(tiled_client, uid, "inline"))
    assert a["seq_num"].tolist() == [1, 2, 3, 4] and (a["bin_id"] >= 0).all()
    assert derived_node(tiled_client, uid).metadata["scan_id"] == 7
    latent = [c for c in a.columns if c.startswith("latent_")]
    np.testing.assert_allclose(a[latent].to_numpy(), b[latent].to_numpy(), rtol=1e-5, atol=1e-6)


def test_torch_threads_leave_a_core_to_the_runengine(tiled_client, tmp_path):
    before = torch.get_num_threads()
    try:
        make_callback(tiled_client, tmp_path, torch_threads=1).close()
        assert torch.get_num_threads() == 1
        make_callback(tiled_client, tmp_path).close()  # "auto": all cores but one
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 2) - 1)
        torch.set_num_threads(before)
        make_callback(tiled_client, tmp_path, torch_threads=None).close()
        assert torch.get_num_threads() == before
        with pytest.raises(ValueError, match="torch_threads=0"):
            make_callback(tiled_client, tmp_path, torch_threads=0)
    finally:
        torch.set_num_threads(before)
