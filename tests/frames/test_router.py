"""RunFrames: real event-model documents -> frames (inline, HDF5, legacy handler, Tiled)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from event_model import compose_run

from gisaxs_bluesky.frames import (
    FrameReaders,
    FrameSourceError,
    RunFrames,
    RunFramesOptions,
    find_image_key,
    image_shape,
    uri_to_path,
)

SHAPE = (12, 10)


def collect(start, **kw):
    frames, notes = [], []
    router = RunFrames(start, emit=frames.append, note=notes.append,
                       readers=kw.pop("readers", FrameReaders()), **kw)
    return router, frames, notes


def data_keys(shape=SHAPE, external=False):
    img = {"source": "sim", "dtype": "array", "shape": list(shape)}
    if external:
        img["external"] = "STREAM:"
    return {"x": {"source": "sim", "dtype": "number", "shape": []}, "img": img}


def feed(router, docs):
    for name, doc in docs:
        router(name, doc)


def test_uri_and_image_key_helpers():
    assert uri_to_path("file://localhost/tmp/a%20b.h5") == Path("/tmp/a b.h5")
    assert uri_to_path("/data/x.h5") == Path("/data/x.h5")
    with pytest.raises(FrameSourceError, match="scheme 's3'"):
        uri_to_path("s3://bucket/x.h5")
    assert image_shape({"shape": [1, 5, 6]}) == (5, 6)
    assert image_shape({"shape": [-1, -1]}) is None
    keys = {"x": {"shape": []}, "var": {"shape": [-1, -1]}, "pil": {"shape": [1, 100, 90]}}
    assert find_image_key(keys) == "pil"
    assert find_image_key({"x": {"shape": []}, "var": {"shape": [-1, -1]}}) == "var"


def test_inline_frames_are_copied_with_positions_and_metadata():
    run = compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys=data_keys())
    router, frames, notes = collect(run.start_doc)
    router("start", run.start_doc)
    router("descriptor", desc.descriptor_doc)
    buffer = np.zeros(SHAPE, np.int32)  # a detector reusing one buffer
    for i in range(3):
        buffer[:] = i + 1
        router("event", desc.compose_event(data={"x": 0.5 * i, "img": buffer},
                                           timestamps={"x": 0, "img": 0}, seq_num=i + 1,
                                           time=10.0 + i))
    assert notes == []
    assert [f.seq_num for f in frames] == [1, 2, 3]
    assert [int(f.load()[0, 0]) for f in frames] == [1, 2, 3]  # not the reused buffer
    assert [f.positions["x"] for f in frames] == [0.0, 0.5, 1.0]
    assert [f.time for f in frames] == [10.0, 11.0, 12.0]
    assert frames[0].metadata == {"stream": "primary", "image_key": "img",
                                  "descriptor": desc.descriptor_doc["uid"], "geometry": None}
    assert router.expected_shape == SHAPE


def test_hdf5_stream_datum_pairs_in_either_order_and_releases_files(tmp_path):
    path = tmp_path / "det.h5"
    stack = np.arange(4 * SHAPE[0] * SHAPE[1], dtype=np.int32).reshape(4, *SHAPE)
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=stack)
    run = compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys=data_keys(external=True))
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                      data_key="img", parameters={"dataset": "/entry/data/data"})
    readers = FrameReaders(frame_timeout=1.0)
    router, frames, notes = collect(run.start_doc, readers=readers)
    feed(router, [("descriptor", desc.descriptor_doc), ("stream_resource", res.stream_resource_doc)])
    ev = lambda i: desc.compose_event(data={"x": float(i)}, timestamps={"x": 0}, seq_num=i + 1)
    # events 1-2 before their datum, 3-4 after it
    router("event", ev(0))
    router("event", ev(1))
    assert frames == []
    router("stream_datum", res.compose_stream_datum(indices={"start": 0, "stop": 4},
                                                    seq_nums={"start": 1, "stop": 5},
                                                    descriptor=desc.descriptor_doc))
    router("event", ev(2))
    router("event", ev(3))
    router("stop", run.compose_stop())
    assert notes == []
    assert [f.seq_num for f in frames] == [1, 2, 3, 4]
    for f in frames:
        np.testing.assert_array_equal(f.load(), stack[f.seq_num - 1])
    assert frames[0].source.endswith("/entry/data/data[0]")
    assert router.paths == {str(path)}
    router.release()
    assert str(path) not in readers._h5._files


class NpyHandler:
    def __init__(self, path, **kwargs):
        self.stack = np.load(path)

    def __call__(self, index):
        return self.stack[index]


def test_legacy_resource_datum_through_event_model_filler(tmp_path):
    stack = np.stack([np.full(SHAPE, i, np.int32) for i in range(3)])
    np.save(tmp_path / "stack.npy", stack)
    run = compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys=data_keys(external=True))
    res = run.compose_resource(spec="NPY_STACK", root=str(tmp_path), resource_path="stack.npy",
                               resource_kwargs={})
    readers = FrameReaders(handler_registry={"NPY_STACK": NpyHandler})
    router, frames, notes = collect(run.start_doc, readers=readers)
    feed(router, [("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)])
    for i in range(3):
        datum = res.compose_datum(datum_kwargs={"index": i})
        router("datum", datum)
        router("event", desc.compose_event(data={"x": float(i), "img": datum["datum_id"]},
                                           timestamps={"x": 0, "img": 0}, seq_num=i + 1,
                                           filled={"img": False}))
    assert notes == []
    assert [int(f.load()[0, 0]) for f in frames] == [0, 1, 2]
    assert frames[0].source.startswith("NPY_STACK stack.npy")
    # without a handler the frame is read from Tiled (and says why)
    router2, frames2, _ = collect(run.start_doc)
    feed(router2, [("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)])
    datum = res.compose_datum(datum_kwargs={"index": 0})
    router2("datum", datum)
    router2("event", desc.compose_event(data={"x": 0.0, "img": datum["datum_id"]},
                                        timestamps={"x": 0, "img": 0}, seq_num=1,
                                        filled={"img": False}))
    assert frames2[0].source == "tiled (no handler for spec 'NPY_STACK')"
    with pytest.raises(ValueError, match="no Tiled client"):
        frames2[0].load()


def test_malformed_streams_are_named_not_silent():
    run = compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys=data_keys(shape=[-1, -1]))
    other = run.compose_descriptor(name="baseline", data_keys={"x": data_keys()["x"]})
    router, frames, notes = collect(run.start_doc)
    orphan = desc.compose_event(data={"x": 0.0, "img": np.ones(SHAPE)}, timestamps={"x": 0, "img": 0},
                                seq_num=1)
    router("event", orphan)  # before its descriptor
    assert frames == [] and "has not seen" in notes[-1] and "[1]" in notes[-1]
    feed(router, [("start", run.start_doc), ("start", run.start_doc),
                  ("descriptor", desc.descriptor_doc),
                  ("descriptor", other.descriptor_doc)])
    assert "start document received twice" in notes[-1]
    assert router.expected_shape is None  # [-1, -1]: size unknown, no shape check
    ev = lambda seq, img: desc.compose_event(data={"x": 1.0, "img": img},
                                             timestamps={"x": 0, "img": 0}, seq_num=seq)
    router("event", ev(2, np.ones(SHAPE)))
    router("event", ev(2, np.zeros(SHAPE)))  # duplicate seq_num
    assert "event seq_num=2 repeated" in notes[-1]
    router("event", ev(3, None))
    router("event", other.compose_event(data={"x": 1.0}, timestamps={"x": 0}, seq_num=1))
    assert [f.seq_num for f in frames] == [2, 3]
    assert float(frames[0].load()[0, 0]) == 1.0
    assert frames[1].error == "frame seq_num=3: image 'img' is None in the event"
    assert len(notes) == 3  # the baseline event is not a problem


def test_geometry_resolver_travels_with_each_frame_and_errors_are_named():
    run = compose_run(metadata={"motors": ["th"], "geometry": {"wavelength_nm": 0.1}})
    desc = run.compose_descriptor(name="primary", data_keys={
        "th": {"source": "sim", "dtype": "number", "shape": []}, "img": data_keys()["img"]})

    def resolve(start, descriptor, event):
        th = event["data"].get("th")
        if th is None:
            raise KeyError("incidence motor 'th' not in the event")
        return {**start["geometry"], "incidence_deg": th}

    router, frames, _ = collect(run.start_doc, options=RunFramesOptions(geometry=resolve))
    router("descriptor", desc.descriptor_doc)
    router("event", desc.compose_event(data={"th": 0.2, "img": np.ones(SHAPE)},
                                       timestamps={"th": 0, "img": 0}, seq_num=1))
    page = {"descriptor": desc.descriptor_doc["uid"], "seq_num": [2], "time": [0.0],
            "uid": ["u2"], "data": {"img": [np.ones(SHAPE)]}, "timestamps": {"img": [0]},
            "filled": {}}
    router("event_page", page)  # no 'th' reading in this event
    assert frames[0].metadata["geometry"] == {"wavelength_nm": 0.1, "incidence_deg": 0.2}
    assert frames[1].error is not None and "incidence motor 'th'" in frames[1].error


def test_stop_emits_unpaired_frames_with_reasons(tmp_path):
    path = tmp_path / "det.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.ones((2, *SHAPE), np.int32))
    run = compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys=data_keys(external=True))
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=str(path),
                                      data_key="img", parameters={"dataset": "/entry/data/data"})
    router, frames, _ = collect(run.start_doc)
    feed(router, [("descriptor", desc.descriptor_doc), ("stream_resource", res.stream_resource_doc)])
    router("event", desc.compose_event(data={"x": 1.0}, timestamps={"x": 0}, seq_num=3))
    router("stream_datum", res.compose_stream_datum(indices={"start": 0, "stop": 2},
                                                    seq_nums={"start": 1, "stop": 3},
                                                    descriptor=desc.descriptor_doc))
    router("stop", run.compose_stop())
    assert [f.seq_num for f in frames] == [1, 2, 3]
    assert np.isnan(frames[0].positions["x"]) and frames[0].error is None
    assert frames[2].error == ("frame seq_num=3: no frame data arrived for image key 'img' by "
                               "the stop document")
