"""FrameGeometry: the frame layer's geometry per run / event, never raising into the router."""

from __future__ import annotations

import argparse
import json

import pytest

from gisaxs_bluesky.frames import FrameGeometry, GeometryUnavailable, geometry_summary
from gisaxs_bluesky.frames import geometry as frame_geometry
from gisaxs_bluesky.geometry import START_KEY, GeometryError, InstrumentGeometry

FULL = {"detector_shape": [100, 90], "pixel_size_mm": 0.172, "distance_mm": 2000.0,
        "wavelength_nm": 0.1, "beam_center_px": [90.0, 45.0]}
DESC = {"uid": "d1", "data_keys": {"cam": {"shape": [100, 90]}, "th": {"shape": [],
                                                                    "units": "deg"}}}


def test_per_event_incidence_and_readings_columns():
    fg = FrameGeometry()
    start = {"uid": "r1", START_KEY: {**FULL, "incidence_key": "th"}}
    assert fg.incidence_key(start, DESC) == "th"
    a = fg(start, DESC, {"data": {"th": 0.2}})
    b = fg(start, DESC, {"data": {"th": 0.5}})
    assert a.geometry.incidence_deg == 0.2 and b.geometry.incidence_deg == 0.5
    assert a.sources["incidence_deg"] == "event th"
    assert fg.resolver(start, DESC) is fg.resolver(start, DESC)  # built once per run
    column = fg.for_readings(start, DESC, {"th": [0.1, 0.3]}, 2)
    assert [g.geometry.incidence_deg for g in column] == [0.1, 0.3]
    missing = fg.for_readings(start, DESC, {}, 1)[0]
    assert isinstance(missing, GeometryUnavailable) and "'th'" in missing.reason
    assert geometry_summary(a)["record"]["incidence_deg"] == 0.2


def test_malformed_or_missing_geometry_is_a_value_never_an_exception():
    fg = FrameGeometry()
    bad = fg({"uid": "r2", START_KEY: 5}, DESC, {"data": {}})
    assert isinstance(bad, GeometryUnavailable) and "must be a mapping" in bad.reason
    none = fg({"uid": "r3"}, DESC, {"data": {}})
    assert "distance_mm missing" in none.reason
    assert geometry_summary(none) == {"unavailable": none.reason}
    # the fallback fills what the run lacks, and says so
    filled = FrameGeometry(fallback={**FULL, "incidence_deg": 0.3})({"uid": "r3"}, DESC, None)
    assert filled.geometry.distance_mm == 2000.0 and filled.sources["distance_mm"] == "fallback"
    assert filled.sources["detector_shape"] == "descriptor"


def test_user_geometry_forms_and_command_line(tmp_path):
    record = InstrumentGeometry((100, 90), 0.172, 2000.0, 0.1, (90.0, 45.0), 0.4)
    assert frame_geometry.user_geometry(record) is record
    path = tmp_path / "g.json"
    path.write_text(json.dumps(FULL))
    assert frame_geometry.user_geometry(path) == FULL
    with pytest.raises(GeometryError, match="no such PONI file"):
        frame_geometry.user_geometry(tmp_path / "missing.poni")
    parser = argparse.ArgumentParser()
    frame_geometry.add_geometry_arguments(parser)
    explicit, fallback = frame_geometry.geometry_from_args(parser.parse_args(
        ["--geometry", json.dumps({"distance_mm": 3000.0}), "--geometry-fallback", str(path)]))
    assert explicit == {"distance_mm": 3000.0} and fallback == FULL
    with pytest.raises(GeometryError, match="--geometry: not valid JSON"):
        frame_geometry.geometry_from_args(parser.parse_args(["--geometry", "{bad"]))
    with pytest.raises(GeometryError, match="--poni .*no such file"):
        frame_geometry.geometry_from_args(parser.parse_args(["--poni", str(tmp_path / "x.poni")]))
    with pytest.raises(GeometryError, match="unknown key"):  # refused at start-up
        frame_geometry.geometry_from_args(parser.parse_args(["--geometry", '{"distanse_mm": 1}']))
    descriptor = frame_geometry.stream_descriptor("primary", {"uid": "u", "data_keys": {}})
    assert descriptor == {"uid": "u", "data_keys": {}, "name": "primary"}
