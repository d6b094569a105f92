"""Simulated GISAXS detector: HDF5 + StreamResource round trip through TiledWriter and Tiled."""

from __future__ import annotations

import bluesky.plans as bp
import h5py
import numpy as np
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky.sim.detector import (
    DATA_PATH,
    PILATUS_SHAPE,
    blob_frame_fn,
    make_gisaxs_detector,
    make_motors,
)

SHAPE = (48, 40)


class Recorder:
    """frame_fn wrapper remembering (positions, frame) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, positions):
        frame = self.fn(positions)
        self.calls.append((dict(positions), frame))
        return frame


def test_scan_frames_round_trip_through_tiled(RE, tiled_client, detector_dir):
    x, th = make_motors("x", "th", th=0.15)
    rec = Recorder(blob_frame_fn(SHAPE, width_motor="x"))
    det = make_gisaxs_detector(detector_dir, rec, [x, th], name="pilatus")
    docs, live_shapes = [], []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE.subscribe(TiledWriter(tiled_client, batch_size=1))

    def read_live(name, doc):  # runs after TiledWriter: frames so far are served by Tiled
        if name == "stream_datum" and doc["stream_resource"] == pilatus_res[0]:
            run_uid = next(d for n, d in docs if n == "start")["uid"]
            live_shapes.append(tiled_client[run_uid]["primary"]["pilatus"].shape)
        elif name == "stream_resource" and doc["data_key"] == "pilatus":
            pilatus_res.append(doc["uid"])

    pilatus_res: list[str] = []
    RE.subscribe(read_live)

    (uid,) = RE(bp.scan([det], x, 0.0, 2.0, 3))

    descriptor = next(d for n, d in docs if n == "descriptor")
    key = descriptor["data_keys"]["pilatus"]
    assert key["shape"] == list(SHAPE) and key["dtype_numpy"] == "<i4"
    assert key["external"] == "STREAM:"
    resources = [d for n, d in docs if n == "stream_resource"]
    assert {r["mimetype"] for r in resources} == {"application/x-hdf5"}
    assert {r["data_key"] for r in resources} == {"pilatus", "pilatus-total"}
    assert sum(n == "stream_datum" for n, _ in docs) == 6
    assert live_shapes == [(k, *SHAPE) for k in (1, 2, 3)]

    frames_made = [f for _, f in rec.calls[-3:]]
    assert [p["x"] for p, _ in rec.calls[-3:]] == [0.0, 1.0, 2.0]
    assert all(p["th"] == 0.15 for p, _ in rec.calls[-3:])
    assert not np.array_equal(frames_made[0], frames_made[2])  # width follows x

    primary = tiled_client[uid]["primary"]
    frames = primary["pilatus"].read()
    assert frames.shape == (3, *SHAPE) and frames.dtype == np.int32
    np.testing.assert_array_equal(frames, np.stack(frames_made))
    np.testing.assert_allclose(primary["pilatus-total"].read(),
                               [f.sum() for f in frames_made])
    np.testing.assert_allclose(primary["x"].read(), [0.0, 1.0, 2.0])
    names = [n for n, _ in tiled_client[uid].documents()]
    assert names[0] == "start" and names[-1] == "stop" and "stream_resource" in names


def test_count_default_pilatus_frame_and_float_dtype(RE, tiled_client, detector_dir):
    det = make_gisaxs_detector(detector_dir, None, [], name="pilatus")
    RE.subscribe(TiledWriter(tiled_client, batch_size=1))
    (uid,) = RE(bp.count([det], 1))
    frame = tiled_client[uid]["primary"]["pilatus"].read()
    assert frame.shape == (1, *PILATUS_SHAPE) and frame.dtype == np.int32 and frame.max() > 0

    fdet = make_gisaxs_detector(detector_dir, lambda p: np.full((5, 7), 0.25, np.float32),
                                name="waxs")
    (uid,) = RE(bp.count([fdet], 2))
    frames = tiled_client[uid]["primary"]["waxs"].read()
    assert frames.shape == (2, 5, 7) and frames.dtype == np.float32
    np.testing.assert_array_equal(frames, 0.25)


def test_frames_readable_live_while_scanning(RE, detector_dir):
    """Another reader (SWMR) sees frame k in the file while the scan is still running."""
    (x,) = make_motors("x")
    seen = []
    files = sorted(detector_dir.glob("*.h5"))

    def fn(positions):
        h5s = sorted(detector_dir.glob("pilatus_*.h5"))
        if h5s and positions["x"] > 0:
            with h5py.File(h5s[-1], "r", swmr=True) as f:
                seen.append(f[DATA_PATH].shape[0])
        return np.full(SHAPE, int(positions["x"]) + 1, np.int32)

    det = make_gisaxs_detector(detector_dir, fn, [x])
    RE(bp.scan([det], x, 0, 3, 4))
    assert files == [] and seen == [1, 2, 3]
