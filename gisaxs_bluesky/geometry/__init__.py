"""Instrument geometry as data: the record, where it comes from, and the reciprocal-space map.

``InstrumentGeometry`` travels with every frame; ``geometry_for_frame`` / ``GeometryResolver``
build it from an explicit argument, a pyFAI PONI file, the start document, the descriptor's
configuration and per-event incidence readings; ``remap_table`` + ``remap`` put a frame on one
fixed (q_z, q_par) grid whatever the instrument.
"""

from .detectors import DETECTORS, DetectorSpec, GeometryError, detector_spec
from .gather import RemapStats, remap, remap_torch
from .mapping import START_KEY, START_KEYS
from .qgrid import QGrid
from .reciprocal import RemapTable, pixel_q, remap_table
from .record import InstrumentGeometry, geometry_from_mapping, geometry_from_poni
from .sources import GeometryResolver, GeometryUnavailable, ResolvedGeometry, geometry_for_frame
from .user import user_geometry, user_geometry_flags, user_geometry_text

__all__ = [
    "DETECTORS",
    "START_KEY",
    "START_KEYS",
    "DetectorSpec",
    "GeometryError",
    "GeometryResolver",
    "GeometryUnavailable",
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
    "user_geometry",
    "user_geometry_flags",
    "user_geometry_text",
]
