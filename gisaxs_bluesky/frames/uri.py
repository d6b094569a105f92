"""Resource URIs -> local paths (the one place that knows which URIs are files)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import FrameSourceError

__all__ = ["uri_to_path"]


def uri_to_path(uri: str) -> Path:
    """Local path of a ``file://`` URI (or a plain path); other schemes are not files here."""
    if not isinstance(uri, str) or not uri:
        raise FrameSourceError(f"resource uri {uri!r}: expected a non-empty string")
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise FrameSourceError(
            f"resource uri {uri!r}: scheme {parsed.scheme!r} is not a local file"
        )
    return Path(unquote(parsed.path) if parsed.scheme else uri)
