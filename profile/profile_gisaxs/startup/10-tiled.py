"""Part 1: Tiled client (GISAXS_TILED_URI / TILED_API_KEY, else a local catalog folder) and
TiledWriter subscribed (batch_size=1, so frames are in Tiled while the scan runs)."""
import threading

from bluesky_tiled_plugins import TiledWriter


def _local_tiled(directory):
    """Writable SQLite catalog + file storage in ``directory``, served in-process."""
    import copy

    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.client import Context, from_context
    from tiled.media_type_registration import default_serialization_registry
    from tiled.server.app import build_app

    directory = Path(directory).expanduser().resolve()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    catalog = catalog_from_uri(
        f"sqlite:///{directory / 'catalog.db'}",
        writable_storage={"filesystem": str(directory / "data"),
                          "sql": f"sqlite:///{directory / 'tables.sqlite'}"},
        readable_storage=[str(directory)],
        init_if_not_exists=True,
    )
    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)  # run.documents()
    context = Context.from_app(build_app(catalog, serialization_registry=registry))
    return from_context(context)


TILED_URI = os.environ.get("GISAXS_TILED_URI")
CATALOG_DIR = Path(os.environ.get("GISAXS_CATALOG_DIR", "~/gisaxs_catalog")).expanduser()
if TILED_URI:
    from tiled.client import from_uri as _from_uri

    _key = os.environ.get("TILED_API_KEY")
    tiled_client = _from_uri(TILED_URI, api_key=_key) if _key else _from_uri(TILED_URI)
    print(f"Tiled: {TILED_URI.split('?')[0]}")
else:
    tiled_client = _local_tiled(CATALOG_DIR)
    print(f"Tiled: local catalog in {CATALOG_DIR} (set GISAXS_TILED_URI for a server)")
client = tiled_client
# a local catalog keeps its tables in SQLite (one writer at a time): raw and derived writes
# take turns under one lock (see gisaxs_bluesky.callbacks.serialized); a server needs none
tiled_write_lock = None if TILED_URI else threading.Lock()
tiled_writer = TiledWriter(tiled_client, batch_size=1)
if tiled_write_lock is None:
    RE.subscribe(tiled_writer)
else:
    from gisaxs_bluesky.callbacks import serialized as _serialized

    RE.subscribe(_serialized(tiled_writer, tiled_write_lock))
