"""Geometry from each source, in order of precedence, and clear errors for what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
from bluesky import plans as bp
from event_model import compose_run
from ophyd_async.core import StandardReadable, StandardReadableFormat, soft_signal_rw

from gisaxs_bluesky.geometry import (
    START_KEY,
    GeometryError,
    GeometryResolver,
    InstrumentGeometry,
    geometry_for_frame,
    pixel_q,
)
from gisaxs_bluesky.sim.detector import make_motors

FULL = {
    "detector": "Pilatus 1M",
    "distance_mm": 1730.0,
    "wavelength_nm": 0.134,
    "beam_center_px": [719.6, 597.1],
    "incidence_deg": 0.463,
}


def _poni(tmp_path, *, tilt_deg=0.0):
    """A PONI file as pyFAI writes one after a calibration (Pilatus 1M, 2.4 m, 13 keV)."""
    import pyFAI
    from pyFAI.geometry import Geometry

    geo = Geometry(detector=pyFAI.detector_factory("Pilatus1M"), wavelength=0.0954e-9)
    geo.setFit2D(2400.0, 400.5, 900.5, tilt=tilt_deg, tiltPlanRotation=30.0)
    path = tmp_path / "calib.poni"
    geo.save(str(path))
    return path


def test_explicit_record_is_used_whole():
    explicit = InstrumentGeometry((1043, 981), 0.172, 1000.0, 0.1, (500.0, 400.0), 0.3)
    start = {START_KEY: dict(FULL)}
    assert geometry_for_frame(start, explicit=explicit) is explicit


def test_start_document_keys_give_the_geometry_and_energy_converts():
    start = {START_KEY: {**{k: v for k, v in FULL.items() if k != "wavelength_nm"},
                         "energy_kev": 9.25}}
    resolved = GeometryResolver(start).for_event()
    g = resolved.geometry
    assert g.shape == (1043, 981) and g.pixel_size_mm == (0.172, 0.172)
    assert g.wavelength_nm == pytest.approx(1.239841984 / 9.25)
    assert g.beam_center_px == (719.6, 597.1) and g.incidence_deg == 0.463
    assert resolved.sources["distance_mm"] == f"start {START_KEY}"
    assert resolved.sources["pixel_size_mm"] == f"start {START_KEY}"  # from the detector name
    # the record round-trips through its dict (what travels with a frame)
    assert InstrumentGeometry.from_dict(g.to_dict()) == g


def test_poni_file_gives_distance_centre_wavelength_tilt(tmp_path):
    path = _poni(tmp_path, tilt_deg=1.5)
    start = {START_KEY: {"poni": str(path), "incidence_deg": 0.4, "distance_mm": 999.0}}
    resolved = GeometryResolver(start).for_event()
    g = resolved.geometry
    # the PONI outranks the start document's own keys
    assert g.distance_mm == pytest.approx(2400.0)
    assert resolved.sources["distance_mm"] == f"start {START_KEY}.poni"
    assert g.beam_center_px == pytest.approx((900.0, 400.0))
    assert g.wavelength_nm == pytest.approx(0.0954)
    assert g.tilt_deg == pytest.approx(1.5) and g.tilt_plane_deg == pytest.approx(30.0)
    assert g.detector == "Pilatus 1M" and g.shape == (1043, 981)
    # pixel -> q agrees with pyFAI's own grazing-incidence units on the tilted detector
    import pyFAI.units

    fi = g.pyfai_geometry()
    kw = {"incident_angle": np.deg2rad(0.4), "tilt_angle": 0.0, "sample_orientation": 4}
    qip = fi.array_from_unit(unit=pyFAI.units.get_unit_fiber("qip_nm^-1", **kw))
    qoop = fi.array_from_unit(unit=pyFAI.units.get_unit_fiber("qoop_nm^-1", **kw))
    q_par, q_z, _ = pixel_q(g)
    np.testing.assert_allclose(q_par, qip, atol=2e-3)
    np.testing.assert_allclose(q_z, qoop, atol=2e-3)


def test_explicit_mapping_outranks_poni(tmp_path):
    path = _poni(tmp_path)
    g = geometry_for_frame(None, explicit={"poni": str(path), "distance_mm": 2000.0,
                                           "incidence_deg": 0.2})
    assert g.distance_mm == 2000.0 and g.wavelength_nm == pytest.approx(0.0954)


def _descriptor(configuration, data_keys=None):
    run = compose_run(metadata={START_KEY: {"detector": "Eiger 4M",
                                            "beam_center_px": [2000.0, 1000.0],
                                            "incidence_deg": 0.2}})
    data_keys = data_keys or {"eiger": {"source": "sim", "dtype": "array",
                                        "shape": [2167, 2070]}}
    bundle = run.compose_descriptor(data_keys=data_keys, name="primary",
                                    configuration=configuration)
    return run.start_doc, bundle.descriptor_doc


def test_descriptor_configuration_gives_energy_and_distance_with_their_units():
    configuration = {"dcm": {"data": {"dcm-energy": 12400.0},
                             "timestamps": {"dcm-energy": 0.0},
                             "data_keys": {"dcm-energy": {"source": "sim", "dtype": "number",
                                                          "shape": [], "units": "eV"}}},
                     "eiger": {"data": {"eiger-det_distance": 3.5},
                               "timestamps": {"eiger-det_distance": 0.0},
                               "data_keys": {"eiger-det_distance": {
                                   "source": "sim", "dtype": "number", "shape": [],
                                   "units": "m"}}}}
    start, descriptor = _descriptor(configuration)
    resolved = GeometryResolver(start, descriptor).for_event({})
    assert resolved.geometry.wavelength_nm == pytest.approx(1.239841984 / 12.4)
    assert resolved.geometry.distance_mm == pytest.approx(3500.0)
    assert resolved.sources["wavelength_nm"] == "descriptor"
    assert resolved.geometry.shape == (2167, 2070)


def test_configuration_without_units_is_an_error_naming_the_key():
    configuration = {"dcm": {"data": {"dcm-energy": 12.4}, "timestamps": {"dcm-energy": 0.0},
                             "data_keys": {"dcm-energy": {"source": "sim", "dtype": "number",
                                                          "shape": []}}}}
    start, descriptor = _descriptor(configuration)
    with pytest.raises(GeometryError, match="dcm-energy: units None"):
        GeometryResolver(start, descriptor)


def test_theta_scan_changes_the_geometry_frame_by_frame(RE):
    """Real RunEngine documents: a scan of the incidence motor, read in every event."""

    class Mono(StandardReadable):
        def __init__(self, name=""):
            with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
                self.energy = soft_signal_rw(float, 9.25, units="keV")
            super().__init__(name=name)

    (th,) = make_motors("th", units="deg")
    mono = Mono(name="mono")
    docs = []
    md = {START_KEY: {k: v for k, v in FULL.items() if k not in ("incidence_deg",
                                                                   "wavelength_nm")}
          | {"incidence_key": "th"}}
    RE(bp.scan([th, mono], th, 0.1, 0.5, 5, md=md), lambda name, doc: docs.append((name, doc)))
    start = next(d for n, d in docs if n == "start")
    descriptor = next(d for n, d in docs if n == "descriptor")
    events = [d for n, d in docs if n == "event"]
    resolver = GeometryResolver(start, descriptor)
    geometries = [resolver.for_event(e["data"]) for e in events]
    np.testing.assert_allclose([g.geometry.incidence_deg for g in geometries],
                               [0.1, 0.2, 0.3, 0.4, 0.5])
    assert all(g.sources["incidence_deg"] == "event th" for g in geometries)
    assert geometries[0].geometry.wavelength_nm == pytest.approx(1.239841984 / 9.25)
    assert geometries[0].sources["wavelength_nm"] == "descriptor"


def test_incidence_motor_in_mrad_and_motor_in_mm_is_refused():
    run = compose_run(metadata={START_KEY: {**{k: v for k, v in FULL.items()
                                               if k != "incidence_deg"},
                                            "incidence_key": "th"}})
    data_keys = {"th": {"source": "sim", "dtype": "number", "shape": [], "units": "mrad"}}
    descriptor = run.compose_descriptor(data_keys=data_keys, name="primary").descriptor_doc
    g = geometry_for_frame(run.start_doc, descriptor, {"th": 8.0})
    assert g.incidence_deg == pytest.approx(np.rad2deg(8e-3))
    data_keys["th"]["units"] = "mm"
    descriptor = run.compose_descriptor(data_keys=data_keys, name="other").descriptor_doc
    with pytest.raises(GeometryError, match="incidence_key='th': units 'mm'"):
        geometry_for_frame(run.start_doc, descriptor, {"th": 8.0})


@pytest.mark.parametrize(
    "meta, event, message",
    [
        ({k: v for k, v in FULL.items() if k != "distance_mm"}, None, "distance_mm missing"),
        ({k: v for k, v in FULL.items() if k != "incidence_deg"}, None, "incidence_deg missing"),
        ({**FULL, "energy_kev": -3.0}, None, "energy_kev=-3.0"),
        ({**FULL, "distance_mm": "far"}, None, "distance_mm='far'"),
        ({**FULL, "beam_centre_px": [1, 2]}, None, "unknown key.*beam_centre_px"),
        ({**FULL, "detector": "Pilatus 6M"}, None, "detector='Pilatus 6M'"),
        ({**FULL, "incidence_deg": 12.0}, None, "incidence_deg=12.0"),
        ({**FULL, "incidence_key": "th", "incidence_units": "deg"}, None,
         "both incidence_deg .* and incidence_key='th'"),
        ({**{k: v for k, v in FULL.items() if k != "incidence_deg"}, "incidence_key": "th",
          "incidence_units": "deg"}, {"x": 1.0}, "incidence_key='th': the event has no"),
        ({**FULL, "poni": "/nonexistent/calib.poni"}, None, "no such file"),
    ],
)
def test_missing_or_invalid_geometry_names_the_key(meta, event, message):
    with pytest.raises(GeometryError, match=message):
        geometry_for_frame({START_KEY: meta}, None, event)


def test_fallback_only_where_nothing_else_gives_a_field():
    meta = {k: v for k, v in FULL.items() if k != "distance_mm"}
    resolved = GeometryResolver({START_KEY: meta}, fallback={"distance_mm": 1500.0,
                                                             "incidence_deg": 0.9}).for_event()
    assert resolved.geometry.distance_mm == 1500.0
    assert resolved.sources["distance_mm"] == "fallback"
    assert resolved.geometry.incidence_deg == 0.463  # the start document's, not the fallback
