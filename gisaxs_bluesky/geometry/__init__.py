"""Instrument geometry as data: the record, where it comes from, and the reciprocal-space map.

``InstrumentGeometry`` travels with every frame; ``geometry_for_frame`` / ``GeometryResolver``
build it from an explicit argument, a pyFAI PONI file, the start document, the descriptor's
configuration and per-event incidence readings; ``remap_table`` + ``remap`` put a frame on one
fixed (q_z, q_par) grid whatever the instrument.
"""

from .reciprocal import QGrid, RemapStats, RemapTable, pixel_q, remap, remap_table, remap_torch
from .record import (
    DETECTORS,
    DetectorSpec,
    GeometryError,
    InstrumentGeometry,
    detector_spec,
    geometry_from_poni,
)
from .sources import (
    START_KEY,
    START_KEYS,
    GeometryResolver,
    ResolvedGeometry,
    geometry_for_frame,
    geometry_from_mapping,
)

__all__ = [
    "DETECTORS",
    "START_KEY",
    "START_KEYS",
    "DetectorSpec",
    "GeometryError",
    "GeometryResolver",
    "InstrumentGeometry",
    "QGrid",
    "RemapStats",
    "RemapTable",
    "ResolvedGeometry",
    "detector_spec",
    "geometry_for_frame",
    "geometry_from_mapping",
    "geometry_from_poni",
    "pixel_q",
    "remap",
    "remap_table",
    "remap_torch",
]
