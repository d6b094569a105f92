"""Replay catalogued runs through the binning pipeline and write the same derived nodes.

Sources
-------
* Tiled catalogs written by ``TiledWriter`` (SQL-backed ``BlueskyRun`` v3): frames are read
  from the run's array node for the 2-D image key of the stream (``method="arrays"``), or from
  ``run.documents()`` when the server registers the ``json_seq_exporter``
  (``method="documents"``; HDF5 ``stream_resource`` files must then be readable locally).
* databroker 2 MongoDB-backed catalogs (``BlueskyRun`` v2): documents from ``run.documents()``
  (inline frames, or ``stream_resource``/``stream_datum`` HDF5 on shared storage).
* ``method="callback"`` feeds the run's documents into ``DAEBinningCallback`` instead.

Every run goes through :class:`gisaxs_bluesky.pipeline.BinningPipeline` and
:class:`gisaxs_bluesky.store.DerivedStore`, like the live callback, so the derived node has the
same key (``<uid>-<model>-<version>``), metadata and columns.

Idempotent and resumable: seq_nums already stored for (run, model) are skipped (not even
read); before continuing a partly written node the binner is re-seeded by re-assigning the
stored identity latents in seq order, so bins continue as if the replay had not stopped.
Another model version writes its own node beside the first.

Faults (missing uid, no 2-D image field, unreadable frame, Tiled down) are reported per run
in :class:`RunSummary`; the batch goes on. One writer per derived node on a machine: a replay
takes the node's lock (:meth:`gisaxs_bluesky.store.DerivedStore.node_lock`) and reports a run
another replay or the live callback is writing as "busy", writing nothing (no duplicate rows).
A run without a stop document yet is replayed as far as it is stored and reported "partial".
Frames that cannot be *read* get no row (a later replay retries them); frames that are read
but invalid get the pipeline's UNPROCESSED row.

Each frame's geometry is resolved as the live callback resolves it (``ReplayOptions.geometry``
/ ``geometry_fallback``, ``--geometry`` / ``--poni`` / ``--geometry-fallback``, then the run's
``gisaxs_geometry``, its descriptor and the incidence motor per event, read from the stream's
column or the documents), so a q-grid model re-bins a run as it binned live.

Layout: :mod:`.selection` (which runs), :mod:`.sources` (their frames), :mod:`.one_run`
(one run), :mod:`.batch` (many runs here, the Tiled connection), :mod:`.distributed` (Dask),
:mod:`.cli` (``gisaxs-bluesky replay``).
"""

from ..models import load_model
from ..models import read_binner_state as load_binner_state
from .batch import connect, replay_runs
from .cli import add_arguments, parse_range, parse_where, run
from .distributed import replay_distributed
from .one_run import replay_run
from .options import SUMMARY_STATUSES, ReplayError, ReplayOptions, RunSummary
from .selection import build_queries, select_runs
from .sources import find_image_key, open_source

__all__ = [
    "SUMMARY_STATUSES",
    "ReplayError",
    "RunSummary",
    "ReplayOptions",
    "build_queries",
    "select_runs",
    "load_model",
    "load_binner_state",
    "find_image_key",
    "open_source",
    "parse_range",
    "parse_where",
    "replay_run",
    "replay_runs",
    "replay_distributed",
    "connect",
    "add_arguments",
    "run",
]
