"""A geometry as a user gives it: a record, a mapping of ``gisaxs_geometry`` keys, a pyFAI
PONI file or a JSON file of such a mapping; on the command line also JSON text.

The result goes to :class:`~gisaxs_bluesky.geometry.GeometryResolver` as its ``explicit`` (or
``fallback``) source; a value that is none of these raises :class:`GeometryError` saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .detectors import GeometryError
from .mapping import START_KEY
from .record import InstrumentGeometry

__all__ = ["user_geometry", "user_geometry_flags", "user_geometry_text"]


def user_geometry(value: Any) -> InstrumentGeometry | dict | None:
    """What a user gives as ``geometry=`` (or ``--geometry`` / ``--poni``): a record, a
    mapping of ``gisaxs_geometry`` keys, a pyFAI PONI path (``.poni``) or a JSON file of such
    a mapping. Returns a record or a mapping for :class:`GeometryResolver`."""
    if value is None or isinstance(value, InstrumentGeometry):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if path.suffix.lower() == ".json":
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise GeometryError(f"geometry file {path}: {exc}") from None
            if not isinstance(loaded, Mapping):
                raise GeometryError(f"geometry file {path}: holds {type(loaded).__name__}, "
                                    "expected a mapping of gisaxs_geometry keys")
            return dict(loaded)
        if not path.is_file():
            raise GeometryError(f"geometry {str(value)!r}: no such PONI file")
        return {"poni": str(path)}
    raise GeometryError(f"geometry={value!r}: expected an InstrumentGeometry, a mapping of "
                        f"{START_KEY} keys, or the path of a PONI / JSON file")


def user_geometry_text(text: str | None, flag: str) -> Any:
    """A command-line value: JSON text of ``gisaxs_geometry`` keys, or a JSON / PONI file
    (:func:`user_geometry`); ``flag`` names the option in the error."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise GeometryError(f"{flag}: not valid JSON ({exc})") from None
    return user_geometry(text)


def user_geometry_flags(geometry: str | None, poni: str | None) -> Any:
    """The explicit geometry of ``--geometry JSON|FILE`` and ``--poni FILE`` together: the
    PONI file joins the keys (GeometryError names the flag that is wrong)."""
    explicit = user_geometry_text(geometry, "--geometry")
    if poni is not None:
        if isinstance(explicit, InstrumentGeometry):
            raise GeometryError("--poni with a complete --geometry record: give one of them")
        if not Path(poni).is_file():
            raise GeometryError(f"--poni {poni!r}: no such file")
        explicit = {**(explicit or {}), "poni": str(poni)}
    return explicit
