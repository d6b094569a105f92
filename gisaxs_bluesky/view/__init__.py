"""Live web view of the bins (``gisaxs-bluesky view``).

* :mod:`.data` -- rows of a derived node -> what the page draws (sampling, PCA, bins, outliers).
* :mod:`.medoid` -- a bin's representative frame: the denoised medoid, on q axes.
* :mod:`.watch` -- Tiled websocket streaming where the server offers it, else polling.
* :mod:`.app` -- the FastAPI app (JSON, server-sent events, the page); :func:`mount_view`.
* :mod:`.server` -- serving it beside a Tiled server or inside a local catalog's Tiled; CLI.
"""

from ..tiled_client import probe_streaming
from .app import ViewState, build_view_app, mount_view, plotly_js_path
from .data import RunRows, ViewConfig
from .medoid import MedoidFrames
from .server import BackgroundServer, ServedCatalog, serve_catalog
from .watch import Watcher

__all__ = [
    "BackgroundServer",
    "MedoidFrames",
    "RunRows",
    "ServedCatalog",
    "ViewConfig",
    "ViewState",
    "Watcher",
    "build_view_app",
    "mount_view",
    "plotly_js_path",
    "probe_streaming",
    "serve_catalog",
]
