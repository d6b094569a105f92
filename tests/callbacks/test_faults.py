"""DAEBinningCallback under the faults of issue 12, provoked with real parts: a loopback Tiled
server stopped and restarted (and restarted with another API key), two callbacks at once, a
detector reusing one buffer, a slow model behind a full queue, malformed document streams."""

from __future__ import annotations

import copy
import os
import time

import bluesky.plans as bp
import numpy as np
import pytest
import torch
from event_model import compose_run
from test_dae_binning import (
    SHAPE,
    InlineDetector,
    _inline_docs,
    blob_frames,
    derived_node,
    make_callback,
    read_rows,
    untrained_encoder,
)

from gisaxs_bluesky.models import Encoder, GisaxsDAE, make_binner
from gisaxs_bluesky.pipeline import UNPROCESSED_BIN
from gisaxs_bluesky.sim.detector import blob_frame_fn, make_gisaxs_detector, make_motors
from gisaxs_bluesky.store import DerivedStore


class SlowEncoder(Encoder):
    """Real encoder whose every model pass takes ``delay`` s longer (a slow GPU, a busy host)."""

    delay = 0.3

    def encode_inputs(self, x, **kwargs):
        time.sleep(self.delay)
        return super().encode_inputs(x, **kwargs)


def slow_encoder(delay: float) -> SlowEncoder:
    torch.manual_seed(0)
    enc = SlowEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    enc.delay = delay
    return enc


def assert_complete(node, n: int) -> None:
    """n rows 1..n, no duplicate, final status and bin summary on the node."""
    rows = read_rows(node)
    assert rows["seq_num"].tolist() == list(range(1, n + 1))
    md = node.metadata
    assert md["status"] == "complete", md.get("errors")
    assert md["n_frames"] == n and sum(md["bin_summary"]["counts"]) == n
    assert "binner_summary" in md and md["finished"] > 0


# ------------------------------------------------------------------ 1. run ends, Tiled down
def test_run_ending_while_tiled_is_down_is_delivered_after_restart(RE, tiled_server, tmp_path):
    docs = _inline_docs(RE, blob_frames(12))
    client = tiled_server.client()
    cb = make_callback(client, tmp_path, write_lock=None, write_interval=60, retry_interval=0.5)
    *body, stop = docs
    for name, doc in body[:8]:  # the node exists with the first rows ...
        cb(name, doc)
    assert cb.wait(60)
    for name, doc in body[8:]:
        cb(name, doc)
    tiled_server.stop()  # ... Tiled goes away just before the stop document
    cb(*stop)
    assert cb.wait(60)  # True: every row is in Tiled or in the local backup
    key = DerivedStore.node_key(docs[0][1]["uid"], {"name": "untrained", "version": "0"})
    assert key in cb.pending and "unreachable" in cb.pending[key]
    backup = tmp_path / "backup" / key
    assert list(backup.glob("chunk-*.npz")) and (backup / "metadata.json").exists()
    tiled_server.start()
    deadline = time.monotonic() + 30
    while cb.pending and time.monotonic() < deadline:  # re-sent by the worker on its own
        time.sleep(0.2)
    assert cb.pending == {}
    assert_complete(tiled_server.client()["gisaxs_derived"][key], 12)
    assert not backup.exists()
    cb.close()


def test_backup_left_at_close_is_delivered_by_flush_backups(RE, tiled_server, tmp_path):
    docs = _inline_docs(RE, blob_frames(6))
    cb = make_callback(tiled_server.client(), tmp_path, write_lock=None, write_interval=60)
    *body, stop = docs
    for name, doc in body[:6]:  # start, descriptor, 4 events
        cb(name, doc)
    assert cb.wait(60)
    tiled_server.stop()
    for name, doc in body[6:] + [stop]:
        cb(name, doc)
    assert cb.wait(60) and cb.pending
    cb.close()  # the session ends while Tiled is still down
    tiled_server.start()
    store = DerivedStore(tiled_server.client(), backup_dir=tmp_path / "backup")
    assert store.flush_backups() == 2  # the last 2 rows, and the final status with them
    assert store.flush_backups() == 0
    key = DerivedStore.node_key(docs[0][1]["uid"], {"name": "untrained", "version": "0"})
    assert_complete(tiled_server.client()["gisaxs_derived"][key], 6)
    assert not list((tmp_path / "backup").glob("*/open.json"))


# ------------------------------------------------------------- 5. API key revoked mid-scan
def test_revoked_api_key_keeps_rows_with_the_reason_and_delivers_them_later(
        RE, tiled_server, tmp_path):
    docs = _inline_docs(RE, blob_frames(10))
    client = tiled_server.client()
    cb = make_callback(client, tmp_path, write_lock=None, write_interval=0, retry_interval=0.5)
    *body, stop = docs
    for name, doc in body[:6]:
        cb(name, doc)
    assert cb.wait(60)
    good_key = tiled_server.api_key
    tiled_server.stop()
    tiled_server.api_key = "rotated0" + good_key  # the client's key is refused from now on
    tiled_server.start()
    for name, doc in body[6:] + [stop]:
        cb(name, doc)
    assert cb.wait(60)
    key = DerivedStore.node_key(docs[0][1]["uid"], {"name": "untrained", "version": "0"})
    assert "401" in cb.pending[key] and "API key" in cb.pending[key]
    backup = tmp_path / "backup" / key
    assert "refused the API key" in (backup / "fault.txt").read_text()
    assert sum(len(np.load(p)["seq_num"]) for p in backup.glob("chunk-*.npz")) == 6
    tiled_server.stop()
    tiled_server.api_key = good_key  # the key is valid again
    tiled_server.start()
    assert cb.wait(60)  # re-sent at wait()
    assert cb.pending == {}
    node = tiled_server.client()["gisaxs_derived"][key]
    assert_complete(node, 10)
    assert any("refused the API key" in e and "local backup" in e for e in node.metadata["errors"])
    cb.close()


def test_no_write_permission_from_the_start_says_why_in_the_backup(RE, tiled_server, tmp_path):
    docs = _inline_docs(RE, blob_frames(4))
    client = tiled_server.client()
    good_key = tiled_server.api_key
    tiled_server.stop()
    tiled_server.api_key = "other0" + good_key
    tiled_server.start()
    cb = make_callback(client, tmp_path, write_lock=None)
    for name, doc in docs:
        cb(name, doc)  # never raises into the scan
    assert cb.wait(60)
    key = DerivedStore.node_key(docs[0][1]["uid"], {"name": "untrained", "version": "0"})
    assert "refused the API key" in cb.pending[key]
    backup = tmp_path / "backup" / key
    assert "HTTP 401" in (backup / "fault.txt").read_text()
    assert sorted(s for p in backup.glob("chunk-*.npz") for s in np.load(p)["seq_num"]) == [
        1, 2, 3, 4]
    cb.close()
    tiled_server.stop()
    tiled_server.api_key = good_key
    tiled_server.start()
    assert DerivedStore(tiled_server.client(), backup_dir=tmp_path / "backup").flush_backups() == 4
    assert_complete(tiled_server.client()["gisaxs_derived"][key], 4)


# --------------------------------------------------------- 2. two callbacks, one spill folder
def test_two_callbacks_sharing_the_spill_folder_lose_nothing(RE, tiled_client, tmp_path):
    fast, slow = slow_encoder(0.02), slow_encoder(0.25)
    cbs = [make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root=root,
                         max_queue=1, batch_size=2)
           for enc, root in ((fast, "fast"), (slow, "slow"))]  # same spill_dir, same run
    for cb in cbs:
        RE.subscribe(cb)
    (x,) = make_motors("x")
    (uid,) = RE(bp.scan([InlineDetector(blob_frames(16))], x, 0.0, 1.0, 16))
    for cb, root in zip(cbs, ("fast", "slow"), strict=True):
        assert cb.wait(120)
        node = derived_node(tiled_client, uid, root)
        rows = read_rows(node)
        assert rows["seq_num"].tolist() == list(range(1, 17))
        assert (rows["bin_id"] >= 0).all(), node.metadata["errors"]
        assert node.metadata["n_unprocessed"] == 0 and node.metadata["status"] == "complete"
    assert derived_node(tiled_client, uid, "slow").metadata["n_spilled"] > 0
    assert not list((tmp_path / "spill").rglob("*.npy"))


# ------------------------------------------------------------ 4. a full queue, a slow model
def test_full_queue_does_not_hold_the_runengine(RE, tiled_client, tmp_path):
    """With the defaults (put_timeout=0) a frame that finds the queue full is spilled at once:
    the callback's time on the RunEngine thread stays far below put_timeout per frame (the
    worst wait is measured in benchmarks/bench_faults.py)."""
    cb = make_callback(tiled_client, tmp_path, slow_encoder(0.3), max_queue=2, batch_size=2)
    spent: list[float] = []

    def timed(name, doc):
        t0 = time.perf_counter()
        cb(name, doc)
        spent.append(time.perf_counter() - t0)

    RE.subscribe(timed)
    (x,) = make_motors("x")
    (uid,) = RE(bp.scan([InlineDetector(blob_frames(20))], x, 0.0, 1.0, 20))
    assert cb.config.put_timeout == 0.0
    assert sum(spent) < 2.0  # was >= 0.2 s per spilled frame: > 3 s here
    assert cb.wait(120)
    node = derived_node(tiled_client, uid)
    assert node.metadata["n_spilled"] > 5
    assert read_rows(node)["seq_num"].tolist() == list(range(1, 21))


# ---------------------------------------------------------------- 6. a reused frame buffer
class ReusedBufferDetector(InlineDetector):
    """Writes every frame into one array, as a detector driver with a single buffer does."""

    def read(self):
        frame = self.frames[self.i % len(self.frames)]
        self.i += 1
        if not hasattr(self, "buffer"):
            self.buffer = np.empty_like(frame)
        self.buffer[...] = frame
        return {f"{self.name}_image": {"value": self.buffer, "timestamp": time.time()}}


def test_reused_detector_buffer_gives_each_frame_its_own_row(RE, tiled_client, tmp_path):
    enc = untrained_encoder()
    frames = blob_frames(12)
    cb = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), batch_size=4)
    copies: list[tuple[str, dict]] = []
    RE.subscribe(cb)
    RE.subscribe(lambda name, doc: copies.append((name, copy.deepcopy(doc))))
    (x,) = make_motors("x")
    (uid,) = RE(bp.scan([ReusedBufferDetector(frames)], x, 0.0, 1.0, 12))
    ref = make_callback(tiled_client, tmp_path, enc, binner=make_binner(enc), root="ref")
    for name, doc in copies:  # the same frames, each in an array of its own
        ref(name, doc)
    assert cb.wait(60) and ref.wait(60)
    a = read_rows(derived_node(tiled_client, uid))
    b = read_rows(derived_node(tiled_client, uid, "ref"))
    latent = [c for c in a.columns if c.startswith("latent_")]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(a[latent].to_numpy(), b[latent].to_numpy(), rtol=1e-5, atol=1e-6)
    assert a["bin_id"].tolist() == b["bin_id"].tolist()


# ---------------------------------------------------- 7. many short runs, HDF5 read handles
def _open_h5_files() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").endswith(".h5")
        except OSError:
            pass
    return n


def test_short_runs_leave_no_state_and_no_open_files(RE, tiled_client, detector_dir, tmp_path):
    (x,) = make_motors("x")
    det = make_gisaxs_detector(detector_dir, blob_frame_fn(SHAPE, width_motor="x"), [x],
                               shape=SHAPE, dtype=np.int32)
    cb = make_callback(tiled_client, tmp_path)
    RE.subscribe(cb)
    before = _open_h5_files()
    uids = [RE(bp.count([det], 1))[0] for _ in range(6)]
    assert cb.wait(60)
    assert _open_h5_files() == before  # each run's file closed at its finish
    assert not cb.writes._live and not cb.writes._unsettled and not cb._open
    for uid in uids:
        assert read_rows(derived_node(tiled_client, uid))["seq_num"].tolist() == [1]


# ------------------------------------------------------------ 8. malformed document streams
def _run_docs(frames, *, shape=SHAPE):
    """start, descriptor, one event per frame, stop (real event-model documents)."""
    run = compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys={
        "x": {"source": "sim", "dtype": "number", "shape": []},
        "img": {"source": "sim", "dtype": "array", "shape": list(shape)}})
    events = [desc.compose_event(data={"x": float(i), "img": f}, timestamps={"x": 0, "img": 0},
                                 seq_num=i + 1) for i, f in enumerate(frames)]
    return run, ("start", run.start_doc), ("descriptor", desc.descriptor_doc), \
        [("event", e) for e in events], ("stop", run.compose_stop())


def _feed(cb, docs) -> str:
    for name, doc in docs:
        cb(name, doc)
    return docs[0][1]["uid"]


def test_malformed_document_streams_are_named_on_the_node(tiled_client, tmp_path):
    frames = blob_frames(4)
    cb = make_callback(tiled_client, tmp_path)

    # an event before its descriptor: kept, binned once the descriptor comes
    _, start, desc, events, stop = _run_docs(frames)
    early = _feed(cb, [start, events[0], desc, *events[1:], stop])
    # an event whose descriptor never comes: named, the run is not "complete"
    _, start, desc, events, stop = _run_docs(frames)
    ghost = copy.deepcopy(events[3])
    ghost[1]["descriptor"] = "no-such-descriptor"
    lost = _feed(cb, [start, desc, *events[:3], ghost, stop])
    # a repeated seq_num: the first frame is binned, the repeat named
    _, start, desc, events, stop = _run_docs(frames)
    again = copy.deepcopy(events[1])
    again[1]["data"]["img"] = frames[3]
    again[1]["uid"] = "another-event-uid"
    dup = _feed(cb, [start, desc, events[0], events[1], again, *events[2:], stop])
    # an inline None image
    _, start, desc, events, stop = _run_docs([frames[0], None, frames[2]])
    none = _feed(cb, [start, desc, *events, stop])
    # a repeated start document in the middle of the run
    _, start, desc, events, stop = _run_docs(frames)
    restart = _feed(cb, [start, desc, *events[:2], start, *events[2:], stop])
    # a descriptor shape of [-1, -1] (size not known up front)
    _, start, desc, events, stop = _run_docs(frames, shape=[-1, -1])
    unknown = _feed(cb, [start, desc, *events, stop])
    # not a document at all
    assert cb("start", None) == ("start", None)
    assert cb.wait(60)

    def md_rows(uid):
        node = derived_node(tiled_client, uid)
        return node.metadata, read_rows(node)

    md, rows = md_rows(early)
    assert rows["seq_num"].tolist() == [1, 2, 3, 4] and (rows["bin_id"] >= 0).all()
    assert md["status"] == "complete"
    md, rows = md_rows(lost)
    assert rows["seq_num"].tolist() == [1, 2, 3] and md["status"] == "failed"
    assert any("descriptor 'no-such-descriptor', which never arrived" in e and "[4]" in e
               for e in md["errors"])
    md, rows = md_rows(dup)
    assert rows["seq_num"].tolist() == [1, 2, 3, 4]
    assert any("event seq_num=2 repeated" in e for e in md["errors"])
    ref = make_callback(tiled_client, tmp_path, root="ref")
    _, start, desc, events, stop = _run_docs(frames)
    ref_uid = _feed(ref, [start, desc, *events, stop])
    assert ref.wait(60)
    ref_rows = read_rows(derived_node(tiled_client, ref_uid, "ref"))
    latent = [c for c in rows.columns if c.startswith("latent_")]
    np.testing.assert_allclose(rows[latent].to_numpy(), ref_rows[latent].to_numpy(), rtol=1e-5,
                               atol=1e-6)  # the first frame of seq_num 2 was kept
    md, rows = md_rows(none)
    assert rows["seq_num"].tolist() == [1, 2, 3]
    assert rows["bin_id"].tolist()[1] == UNPROCESSED_BIN
    assert any("frame seq_num=2: image 'img' is None in the event" in e for e in md["errors"])
    md, rows = md_rows(restart)
    assert rows["seq_num"].tolist() == [1, 2, 3, 4] and md["status"] == "complete"
    assert any("start document of run" in e and "repeated" in e for e in md["errors"])
    md, rows = md_rows(unknown)
    assert rows["seq_num"].tolist() == [1, 2, 3, 4] and (rows["bin_id"] >= 0).all()
    assert md["status"] == "complete" and not md["errors"]


# ------------------------------------------------- 13. a run whose stop document never comes
def test_run_without_stop_is_closed_failed_with_the_reason(tiled_client, tmp_path):
    cb = make_callback(tiled_client, tmp_path)
    _, start, desc, events, _stop = _run_docs(blob_frames(3))
    uid = _feed(cb, [start, desc, *events])  # TiledWriter raised: the stop never got here
    assert cb.wait(60)
    assert derived_node(tiled_client, uid).metadata["status"] == "running"
    cb.close()
    md = derived_node(tiled_client, uid).metadata
    assert md["status"] == "failed" and md["raw_exit_status"] == "abort"
    assert "no stop document reached DAEBinningCallback" in md["raw_reason"]
    assert md["n_frames"] == 3 and sum(md["bin_summary"]["counts"]) == 3


def test_spill_folders_are_per_callback(tiled_client, tmp_path):
    a, b = make_callback(tiled_client, tmp_path), make_callback(tiled_client, tmp_path)
    assert a.spill_dir == b.spill_dir and a.worker.spill_tag != b.worker.spill_tag
    with pytest.raises(ValueError, match="retry_interval"):
        make_callback(tiled_client, tmp_path, retry_interval=0)


class OutageDetector(InlineDetector):
    """Inline detector; ``at_read(i)`` is called before the i-th frame (1-based) is read."""

    def __init__(self, frames, at_read) -> None:
        super().__init__(frames)
        self.at_read = at_read

    def read(self):
        self.at_read(self.i + 1)
        return super().read()


@pytest.mark.parametrize("tiled_writer_backup", [False, True])
def test_tiled_outage_with_tiledwriter(RE, tiled_server, tmp_path, monkeypatch,
                                       tiled_writer_backup):
    """Tiled goes down mid-scan with TiledWriter subscribed (after the callback, as the README
    says). Without a backup directory TiledWriter aborts the scan: the callback still gets the
    stop document and closes its node "failed" with the RunEngine's reason. With
    ``backup_directory`` the scan completes, TiledWriter keeps the raw documents in JSONL, and
    the node is "complete". Either way every frame sent gets its row once Tiled is back."""
    import tiled.client.utils
    from bluesky_tiled_plugins import TiledWriter

    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)  # give up in seconds
    client = tiled_server.client()
    cb = make_callback(client, tmp_path, write_lock=None, retry_interval=0.5)
    sent: list[int] = []
    RE.subscribe(cb)
    RE.subscribe(lambda name, doc: sent.append(doc["seq_num"]) if name == "event" else None)
    backup = tmp_path / "tiledwriter_backup"
    RE.subscribe(TiledWriter(tiled_server.client(), batch_size=1,
                             backup_directory=str(backup) if tiled_writer_backup else None))

    def outage(i):
        if i == 4:
            assert cb.wait(60)
            tiled_server.stop()

    (x,) = make_motors("x")
    det = OutageDetector(blob_frames(8), outage)
    uids: list[str] = []
    RE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
    if tiled_writer_backup:
        RE(bp.scan([det], x, 0.0, 1.0, 8))
        assert sent == list(range(1, 9)) and list(backup.glob("*.jsonl"))
    else:
        with pytest.raises(Exception):  # noqa: B017 - whatever TiledWriter raised
            RE(bp.scan([det], x, 0.0, 1.0, 8))
        assert 4 <= len(sent) < 8
    tiled_server.start()
    assert cb.wait(60)
    deadline = time.monotonic() + 30
    while cb.pending and time.monotonic() < deadline:
        time.sleep(0.2)
    node = derived_node(tiled_server.client(), uids[0])
    rows = read_rows(node)
    assert rows["seq_num"].tolist() == sent
    md = node.metadata
    assert md["n_frames"] == len(sent) and sum(md["bin_summary"]["counts"]) == len(sent)
    if tiled_writer_backup:
        assert md["status"] == "complete", md["errors"]
    else:
        assert md["status"] == "failed" and md["raw_exit_status"] in ("fail", "abort")
        assert md["raw_reason"]
    cb.close()
