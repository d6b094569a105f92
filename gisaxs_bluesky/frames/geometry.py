"""The geometry of every frame, as the frame layer hands it on (``FrameRef.metadata["geometry"]``).

:class:`FrameGeometry` is the resolver a consumer puts in
:attr:`~gisaxs_bluesky.frames.RunFramesOptions.geometry`: per run and descriptor one
:class:`~gisaxs_bluesky.geometry.GeometryResolver` (explicit argument, PONI, the start
document's ``gisaxs_geometry``, the descriptor's configuration, the user's fallback), then per
event the incidence motor's reading. A frame whose geometry cannot be had carries a
:class:`GeometryUnavailable` with the reason (naming the key), never a silent default: the
pixel model does not need a geometry, a q-grid model refuses the frame with that reason.
"""

from __future__ import annotations

import argparse
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..geometry import (
    START_KEY,
    GeometryError,
    GeometryResolver,
    GeometryUnavailable,
    InstrumentGeometry,
    ResolvedGeometry,
    geometry_from_poni,
)
from ..geometry.mapping import check_mapping
from ..geometry.user import user_geometry, user_geometry_flags, user_geometry_text

__all__ = ["FrameGeometry", "GeometryUnavailable", "add_geometry_arguments", "geometry_from_args",
           "geometry_summary", "stream_descriptor", "user_geometry"]

#: resolvers kept per (run, descriptor): a callback sees one run at a time, replay one per run
_CACHE_SIZE = 8


class FrameGeometry:
    """``(start, descriptor, event) -> ResolvedGeometry | GeometryUnavailable`` for the frame
    layer; ``explicit`` and ``fallback`` as :func:`user_geometry` takes them. Never raises: a
    run whose geometry cannot be had hands its frames a :class:`GeometryUnavailable`."""

    def __init__(self, explicit: Any = None, *, fallback: Any = None) -> None:
        self.explicit = user_geometry(explicit)
        self.fallback = user_geometry(fallback)
        if isinstance(self.fallback, dict) and "poni" in self.fallback:
            raise GeometryError("geometry_fallback: a PONI file is a calibration; give it as "
                                "geometry=, the fallback holds fields to assume")
        if isinstance(self.explicit, dict):  # refused here, not on every frame
            check_mapping(self.explicit, "geometry")
            if self.explicit.get("poni") is not None:
                geometry_from_poni(self.explicit["poni"])
        if isinstance(self.fallback, dict):
            check_mapping(self.fallback, "geometry_fallback")
        self._lock = threading.Lock()
        self._resolvers: OrderedDict[tuple[str, str], GeometryResolver | GeometryUnavailable] \
            = OrderedDict()

    def resolver(self, start: Mapping[str, Any], descriptor: Mapping[str, Any] | None
                 ) -> GeometryResolver | GeometryUnavailable:
        """The run's resolver for frames of ``descriptor`` (built once, kept)."""
        key = (str(start.get("uid")), str((descriptor or {}).get("uid")))
        with self._lock:
            found = self._resolvers.get(key)
            if found is not None:
                self._resolvers.move_to_end(key)
                return found
        try:
            found = GeometryResolver(start, descriptor, self.explicit, fallback=self.fallback)
        except Exception as exc:  # noqa: BLE001 - a malformed document: said on the frames
            found = GeometryUnavailable(_why(exc))
        with self._lock:
            self._resolvers[key] = found
            while len(self._resolvers) > _CACHE_SIZE:
                self._resolvers.popitem(last=False)
        return found

    def incidence_key(self, start: Mapping[str, Any], descriptor: Mapping[str, Any] | None
                      ) -> str | None:
        """The data key whose reading in every event is the incidence angle (None: static)."""
        resolver = self.resolver(start, descriptor)
        return None if isinstance(resolver, GeometryUnavailable) else resolver.incidence_key

    def for_readings(self, start: Mapping[str, Any], descriptor: Mapping[str, Any] | None,
                     readings: Mapping[str, Any], n: int) -> list:
        """The geometry of each of ``n`` frames of a stream read as columns (``readings``:
        data key -> n values; only :meth:`incidence_key` is needed), as :meth:`__call__`."""
        key = self.incidence_key(start, descriptor)
        if key is None:
            return [self(start, descriptor, None)] * n
        column = readings.get(key)
        return [self(start, descriptor, {"data": {} if column is None else {key: column[i]}})
                for i in range(n)]

    def __call__(self, start: Mapping[str, Any], descriptor: Mapping[str, Any] | None,
                 event: Mapping[str, Any] | None) -> ResolvedGeometry | GeometryUnavailable:
        resolver = self.resolver(start, descriptor)
        if isinstance(resolver, GeometryUnavailable):
            return resolver
        try:
            return resolver.for_event((event or {}).get("data"))
        except Exception as exc:  # noqa: BLE001 - never into the frame router
            return GeometryUnavailable(_why(exc))


def _why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, GeometryError) else f"{type(exc).__name__}: {exc}"


def stream_descriptor(stream_name: str, metadata: Mapping[str, Any]) -> dict:
    """The descriptor of a stream TiledWriter stored (its node's metadata is the descriptor:
    uid, data_keys, configuration), for a consumer that reads the stream's arrays."""
    return {**dict(metadata or {}), "name": stream_name}


def geometry_summary(value: Any) -> dict | None:
    """What a derived node's metadata records of a frame's geometry: the record and where each
    field came from (``incidence_deg`` ``"event <key>"`` in a theta scan), or why none."""
    if value is None:
        return None
    if isinstance(value, GeometryUnavailable):
        return {"unavailable": value.reason}
    if isinstance(value, ResolvedGeometry):
        return {"record": value.geometry.to_dict(), "sources": dict(value.sources)}
    if isinstance(value, InstrumentGeometry):
        return {"record": value.to_dict(), "sources": {"*": "explicit"}}
    return {"unavailable": f"not a geometry: {type(value).__name__}"}


# -- command line ------------------------------------------------------------------------
def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """``--geometry``, ``--poni`` and ``--geometry-fallback`` (``replay``, ``serve``)."""
    g = parser.add_argument_group(
        "geometry", f"the frames' instrument geometry (a q-grid model needs it); the run's "
        f"start document {START_KEY} and descriptor configuration are read too")
    g.add_argument("--geometry", default=None, metavar="JSON|FILE",
                   help=f"{START_KEY} keys as JSON, a JSON file of them, or a PONI file; "
                        "before what the run says")
    g.add_argument("--poni", default=None, metavar="FILE",
                   help="pyFAI PONI calibration (distance, beam centre, wavelength, tilt)")
    g.add_argument("--geometry-fallback", default=None, metavar="JSON|FILE",
                   help="fields to assume where nothing else gives them (your choice, "
                        "recorded as 'fallback'; never a silent default)")


def geometry_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(explicit, fallback) for :class:`FrameGeometry` from the parsed flags (GeometryError
    names the flag)."""
    explicit = user_geometry_flags(getattr(args, "geometry", None), getattr(args, "poni", None))
    fallback = user_geometry_text(getattr(args, "geometry_fallback", None), "--geometry-fallback")
    FrameGeometry(explicit, fallback=fallback)  # refuse a bad value here, not per frame
    return explicit, fallback
