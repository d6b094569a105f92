"""Tiled clients the package makes or probes: a writable local catalog served in-process, and
whether a server streams a node's updates over its websocket.

:func:`probe_streaming` opens Tiled's ``/stream/single/<segments>`` websocket once: a server
started with a streaming cache (``tiled serve ... --cache redis://...``, or a catalog built
with ``cache_config``) answers with the node's schema; one without refuses the socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["local_tiled_client", "probe_streaming"]


def local_tiled_client(directory: Path) -> Any:
    """Writable SQLite-backed Tiled catalog in ``directory``, served in-process; returns a client."""
    from tiled.catalog import from_uri  # the server side (FastAPI): only for a local catalog
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    catalog = from_uri(
        f"sqlite:///{directory / 'catalog.db'}",
        writable_storage={
            "filesystem": str(directory / "data"),
            "sql": f"sqlite:///{directory / 'tables.sqlite'}",
        },
        readable_storage=[str(directory.parent)],
        init_if_not_exists=True,
    )
    context = Context.from_app(build_app(catalog))
    return from_context(context)


def _ws_url(context: Any, segments: list[str]) -> str:
    base = context.api_uri
    scheme = "wss" if base.scheme == "https" else "ws"
    path = base.path.rstrip("/") + "/stream/single/" + "/".join(segments)
    return str(base.copy_with(scheme=scheme, path=path, query=None))


def probe_streaming(client: Any, segments: list[str], timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether Tiled streams updates of the node at ``segments``; (ok, reason in words)."""
    context = client.context
    if getattr(context.http_client, "app", None) is not None:
        return False, "in-process Tiled client (no websocket to subscribe to)"
    try:
        from websockets.sync.client import connect  # optional: only for streaming
    except ImportError:
        return False, "the websockets package is not installed"
    headers = {}
    if context.api_key:
        headers["Authorization"] = f"Apikey {context.api_key}"
    url = _ws_url(context, segments)
    try:
        with connect(url + "?envelope_format=msgpack", additional_headers=headers,
                     open_timeout=timeout_s, close_timeout=1) as ws:
            ws.recv(timeout=timeout_s)  # the node's schema message
    except Exception as exc:  # noqa: BLE001 - refused handshake, timeout, closed
        return False, (f"Tiled offers no streaming for /{'/'.join(segments)} "
                       f"({type(exc).__name__}: {exc}); start it with a streaming cache, "
                       "e.g. `tiled serve ... --cache redis://HOST:6379`")
    return True, "Tiled websocket streaming (server-side streaming cache)"
