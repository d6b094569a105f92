"""Adaptation frame sources: detector files via fabio / h5py, Tiled and databroker runs."""

from __future__ import annotations

import gzip
import shutil

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
import tifffile
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky.adaptation.detector_files import read_detector_file
from gisaxs_bluesky.adaptation.errors import AdaptationError
from gisaxs_bluesky.adaptation.sources import FileSource, RunSource, collect_frames
from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors

SHAPE = (96, 80)


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, SHAPE).astype(np.int32)


def test_every_file_format_and_folder(tmp_path):
    from fabio.cbfimage import CbfImage
    from fabio.edfimage import EdfImage

    folder = tmp_path / "beamtime"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _frame(0))
    with open(folder / "a.tif", "rb") as f, gzip.open(folder / "b.tif.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    header = {"_array_data.header_contents": "# Wavelength 1.3400 A\n# Detector_distance "
              "1.73000 m\n# Beam_xy (597.10, 719.60) pixels\n# Pixel_size 172e-6 m x 172e-6 m"}
    CbfImage(data=_frame(1), header=header).write(str(folder / "c.cbf"))
    EdfImage(data=_frame(2).astype(np.float32),
             header={"SampleDistance": "2.4", "WaveLength": "9.5e-11"}).write(str(folder / "d.edf"))
    with h5py.File(folder / "e.nxs", "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs["default"] = "data"
        data = entry.create_group("data")
        data.attrs["signal"] = "images"
        data["images"] = np.stack([_frame(3), _frame(4)])
        data["other"] = np.zeros((5, 200, 200))  # larger, but not the default signal
        d = entry.create_dataset("instrument/detector/distance", data=3.0)
        d.attrs["units"] = "m"
    np.save(folder / "f.npy", _frame(5))
    mask = np.zeros(SHAPE, np.uint8)
    mask[:4] = 1
    tifffile.imwrite(folder / "detector_mask.tif", mask)
    (folder / "notes.txt").write_text("not a frame")

    src = FileSource(folder)
    frames = collect_frames([src])
    assert [f.source.rsplit("/", 1)[1] for f in frames] == [
        "a.tif", "b.tif.gz", "c.cbf", "d.edf", "e.nxs#0", "e.nxs#1", "f.npy"]
    np.testing.assert_array_equal(frames[1].frame, _frame(0))  # gzip TIFF through fabio
    np.testing.assert_array_equal(frames[2].frame, _frame(1))
    np.testing.assert_array_equal(frames[5].frame, _frame(4))
    assert all(f.mask is not None and f.mask[:4].all() and not f.mask[4:].any() for f in frames)
    cbf, edf, nxs = frames[2].geometry, frames[3].geometry, frames[4].geometry
    assert cbf["wavelength_nm"] == pytest.approx(0.134)
    assert cbf["distance_mm"] == pytest.approx(1730.0)
    assert cbf["beam_center_px"] == [719.6, 597.1]  # (row, col) from CBF's (x, y)
    assert edf["distance_mm"] == pytest.approx(2400.0)
    assert edf["wavelength_nm"] == pytest.approx(0.095)
    assert nxs["distance_mm"] == pytest.approx(3000.0)
    assert frames[0].geometry == "unknown" and frames[6].geometry == "unknown"
    described = src.describe()["files"]
    assert [d["frames"] for d in described] == [1, 1, 1, 1, 2, 1]
    assert described[0]["mask"].endswith("detector_mask.tif")

    assert all(f.group is None for f in frames)  # group_by="frame": every frame alone
    by_file = collect_frames([FileSource(folder, group_by="file")])
    assert by_file[4].group == by_file[5].group == str(folder / "e.nxs") != by_file[0].group
    assert {f.group for f in collect_frames([FileSource(folder, group_by="folder")])} == {
        str(folder)}

    # an explicit geometry wins over headers; required geometry missing is an error
    src = FileSource(folder / "c.cbf", geometry={"distance_mm": 5000.0})
    assert collect_frames([src])[0].geometry == {"distance_mm": 5000.0}
    with pytest.raises(AdaptationError, match=r"a\.tif: no geometry"):
        collect_frames([FileSource(folder / "a.tif", require_geometry=True)])


def test_bad_and_empty_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdaptationError, match="adaptation set is empty"):
        collect_frames([FileSource(tmp_path / "empty")])
    with pytest.raises(AdaptationError, match="adaptation set is empty"):
        collect_frames([])
    with pytest.raises(AdaptationError, match="does not exist"):
        FileSource(tmp_path / "nowhere")
    (tmp_path / "broken.cbf").write_bytes(b"garbage")
    with pytest.raises(AdaptationError, match="cannot read detector file .*broken.cbf"):
        read_detector_file(tmp_path / "broken.cbf")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 3, 4)))
    with pytest.raises(AdaptationError, match="not a frame or a stack"):
        read_detector_file(tmp_path / "cube.npy")


def _scan(RE, client, directory, n, **md):
    x, = make_motors("x")
    det = make_gisaxs_detector(directory, lambda pos: _frame(int(pos["x"])), [x], shape=SHAPE,
                               dtype=np.int32)
    token = RE.subscribe(TiledWriter(client, batch_size=1))
    try:
        uid, = RE(bp.list_scan([det], x, list(range(n))), **md)
    finally:
        RE.unsubscribe(token)
    return uid


def test_tiled_runs_by_uid_and_query(RE, tiled_client, detector_dir):
    from gisaxs_bluesky.replay import build_queries

    a = _scan(RE, tiled_client, detector_dir, 3, sample="S1",
              geometry={"distance_mm": 1730.0, "wavelength_nm": 0.134})
    b = _scan(RE, tiled_client, detector_dir, 2, sample="S2")
    frames = collect_frames([RunSource(tiled_client, [b])])
    assert [f.source for f in frames] == [f"run:{b}#1", f"run:{b}#2"]
    np.testing.assert_array_equal(frames[1].frame, _frame(1))
    assert frames[0].geometry == "unknown"
    src = RunSource(tiled_client, queries=build_queries(metadata={"sample": "S1"}))
    frames = collect_frames([src])
    assert len(frames) == 3 and frames[0].geometry["distance_mm"] == 1730.0
    assert src.describe()["runs"][0]["uid"] == a and src.describe()["runs"][0]["frames"] == 3
    assert len(collect_frames([RunSource(tiled_client, [a], max_frames_per_run=2)])) == 2
    assert {f.group for f in collect_frames([RunSource(tiled_client, [a, b], group_by="run")])
            } == {a, b}
    assert {f.group for f in collect_frames([RunSource(tiled_client, [a, b], group_by="sample")])
            } == {"sample=S1", "sample=S2"}
    with pytest.raises(AdaptationError, match="run 'nope' is not in the catalog"):
        collect_frames([RunSource(tiled_client, ["nope"])])
    with pytest.raises(AdaptationError, match="adaptation set is empty"):
        collect_frames([RunSource(tiled_client, queries=build_queries(metadata={"sample": "S9"}))])


def test_databroker_mongo_catalog(RE):
    from databroker.mongo_normalized import MongoAdapter
    from ophyd.sim import SynAxis, SynSignal
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    motor = SynAxis(name="x")
    det = SynSignal(name="pilatus", func=lambda: _frame(int(motor.position)))
    adapter = MongoAdapter.from_mongomock()
    token = RE.subscribe(adapter.get_serializer())
    (uid,) = RE(bp.list_scan([det], motor, [0, 1, 2]))
    RE.unsubscribe(token)
    with Context.from_app(build_app(adapter)) as ctx:
        frames = collect_frames([RunSource(from_context(ctx), [uid])])
    assert [f.source for f in frames] == [f"run:{uid}#{i}" for i in (1, 2, 3)]
    np.testing.assert_array_equal(frames[2].frame, _frame(2))
