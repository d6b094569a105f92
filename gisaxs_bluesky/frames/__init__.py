"""Frame sources: from Bluesky documents or catalogued runs to frames with their metadata.

One path for every consumer (the live callback, replay, ``serve``, the adaptive live
encoder): :class:`RunFrames` routes one run's documents (inline event data, HDF5
``stream_resource``/``stream_datum`` read live with SWMR, legacy ``resource``/``datum``
through :class:`event_model.Filler`'s handler registry, or the frames TiledWriter stored) and
hands each frame to its consumer as a :class:`FrameRef`: the pixels (copied) or a loader, the
seq_num, time, motor positions and a per-frame metadata record (stream, image key, source, and
the frame's geometry: :class:`FrameGeometry` resolves it per run and event).
"""

from .errors import FrameSourceError
from .geometry import (
    FrameGeometry,
    GeometryUnavailable,
    add_geometry_arguments,
    geometry_from_args,
    geometry_summary,
    stream_descriptor,
    user_geometry,
)
from .readers import FrameReaders, TiledFrameLoader
from .record import FrameRef, as_float, find_image_key, image_shape, scanned_motors
from .router import RunFrames, RunFramesOptions
from .uri import uri_to_path

__all__ = [
    "FrameGeometry",
    "FrameReaders",
    "FrameRef",
    "FrameSourceError",
    "GeometryUnavailable",
    "RunFrames",
    "RunFramesOptions",
    "TiledFrameLoader",
    "add_geometry_arguments",
    "as_float",
    "find_image_key",
    "geometry_from_args",
    "geometry_summary",
    "image_shape",
    "scanned_motors",
    "stream_descriptor",
    "uri_to_path",
    "user_geometry",
]
