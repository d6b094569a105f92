"""Derived-data layout in Tiled, beside (not inside) the raw BlueskyRun.

Layout (``root`` defaults to ``gisaxs_derived``)::

    /<root>/                                   container (created if absent)
        <raw_uid>-<model name>-<model version>  container, spec GISAXSDerived v1.0
            frames                             appendable SQL table, one row per frame

Node metadata: ``raw_uid``, ``raw_path`` (``/<raw_uid>``, the raw run's path in the same
Tiled), ``scan_id``, ``model`` {name, version, sha256}, ``model_id`` ("name-version"),
``binner``, ``latent_dim``, ``noise_kinds``, ``motors``, ``status``
(running/complete/failed), ``created``/``updated`` (unix time), ``n_frames``,
``bin_summary`` {ids, counts}, ``bin_ids`` (list), ``bin_counts`` ({"<id>": count},
searchable with ``KeyPresent("bin_counts.<id>")``), ``outlier_count``, ``has_outliers``,
``errors`` (bounded list) and any ``extra_metadata``. The summary fields follow the rows at most
every ``summary_interval`` s (1 s) during a run and exactly at ``flush``/``finish``.

Table columns: ``seq_num`` int64, ``time`` float64, ``bin_id`` int64, ``outlier_score``
float32, ``is_outlier`` bool, ``recon_error`` float32, ``latent_<i>`` float32 (i <
latent_dim), ``noise_prob_<kind>`` float32 (per noise kind; ``noise_prob_<j>`` in nodes
written before schema 1.1), ``structure`` string,
``radius_nm``/``distance_nm`` float64 (NaN when not given), one float64 column per motor.

Resilience: when Tiled is unreachable (transport error / HTTP 5xx) or refuses the key
(HTTP 401/403), rows are saved as append-only ``.npz`` chunks under ``backup_dir/<node key>/``
with the metadata not yet sent (final status, bin summary, errors) and the reason
(``fault.txt``), and re-sent on the next append/flush/finish or by
``DerivedStore.flush_backups()``; already-stored seq_nums are re-read from Tiled before
re-sending, so nothing is duplicated. Writers of one node on one machine (the live callback, a
replay, ``flush_backups``) take :meth:`DerivedStore.node_lock` first, so two never write it
at once; a seq_num stored twice all the same (two hosts) is read back once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .derived.backup import default_backup_dir, jsonable, safe_key
from .derived.faults import (
    describe_fault,
    is_refused,
    is_server_fault,
    retryable,
    tiled_reachable,
)
from .derived.locks import NodeBusyError, NodeLock
from .derived.reading import read_derived
from .derived.schema import DERIVED_SPEC, DERIVED_SPEC_VERSION, STATUSES, TABLE_KEY
from .derived.writer import DerivedRunWriter
from .runtime import DEFAULT_ROOT

__all__ = [
    "DERIVED_SPEC",
    "DERIVED_SPEC_VERSION",
    "TABLE_KEY",
    "STATUSES",
    "DerivedStore",
    "DerivedRunWriter",
    "NodeBusyError",
    "NodeLock",
    "read_derived",
    "default_backup_dir",
    "is_server_fault",
    "tiled_reachable",
    "is_refused",
    "describe_fault",
]

logger = logging.getLogger(__name__)


class DerivedStore:
    """Factory for per-(raw run, model) derived nodes under a top-level container ``root``."""

    def __init__(
        self,
        client: Any,
        *,
        root: str = DEFAULT_ROOT,
        backup_dir: str | Path | None = None,
        probe_timeout: float = 2.0,
        summary_interval: float = 1.0,
    ) -> None:
        if summary_interval < 0:
            raise ValueError(f"summary_interval={summary_interval} must be >= 0")
        self.client = client
        self.root = root
        self.backup_dir = Path(backup_dir) if backup_dir is not None else default_backup_dir()
        self.probe_timeout = probe_timeout
        # a node's bin summary (n_frames, bin counts, outliers) is updated with the rows at most
        # this often (s); flush/finish bring it up to date. Each update is one metadata write.
        self.summary_interval = float(summary_interval)
        self._root_node: Any = None  # root container client, once looked up
        try:
            if self.reachable():
                self.root_node()
        except Exception as exc:
            if not retryable(exc):
                raise
            logger.warning("%s creating %r", describe_fault(exc), root)

    @property
    def server(self) -> str:
        """The Tiled server's API address (no credentials)."""
        try:
            return str(self.client.context.api_uri).split("?")[0]
        except Exception:  # noqa: BLE001
            return "?"

    def reachable(self) -> bool:
        """Whether Tiled answers at all (:func:`tiled_reachable`, no client retries)."""
        return tiled_reachable(self.client, self.probe_timeout)

    def root_node(self) -> Any:
        """The root container client, created at top level if absent (looked up once: every
        run's node opens under the write lock TiledWriter may be waiting for)."""
        if self._root_node is not None:
            return self._root_node
        if self.root in self.client:
            node = self.client[self.root]
        else:
            try:
                node = self.client.create_container(
                    self.root, metadata={"description": "GISAXS derived data (latents, bins)"}
                )
            except Exception:
                if self.root not in self.client:  # not created concurrently either
                    raise
                node = self.client[self.root]
        self._root_node = node
        return node

    @staticmethod
    def node_key(raw_uid: str, model: Mapping[str, Any]) -> str:
        """Key of the node for (raw run, model): ``f"{raw_uid}-{name}-{version}"`` (unsafe chars -> _)."""
        return safe_key(f"{raw_uid}-{model['name']}-{model['version']}")

    def open(
        self,
        raw_uid: str,
        *,
        scan_id: int | None,
        model: dict,
        binner: dict,
        latent_dim: int,
        noise_kinds: Sequence[str],
        motors: Sequence[str] = (),
        extra_metadata: dict | None = None,
    ) -> DerivedRunWriter:
        """Create or reopen the node for (raw_uid, model); ``stored_seq_nums`` lists rows present."""
        if not raw_uid or not isinstance(raw_uid, str):
            raise ValueError(f"raw_uid must be a non-empty str, got {raw_uid!r}")
        for field in ("name", "version", "sha256"):
            if field not in model:
                raise ValueError(f"model is missing {field!r}: {model!r}")
        params = jsonable(
            {
                "raw_uid": raw_uid,
                "scan_id": None if scan_id is None else int(scan_id),
                "model": {k: str(v) for k, v in model.items()},
                "binner": dict(binner),
                "latent_dim": int(latent_dim),
                "noise_kinds": [str(k) for k in noise_kinds],
                "motors": [str(m) for m in motors],
                "extra_metadata": dict(extra_metadata or {}),
            }
        )
        return DerivedRunWriter(self, self.node_key(raw_uid, model), params)

    def node_lock(self, key: str) -> NodeLock:
        """The machine-wide write lock of node ``key`` (not taken yet)."""
        return NodeLock(self.backup_dir, key)

    def flush_backups(self) -> int:
        """Re-send every backed-up node under ``backup_dir``; return rows sent.

        Nodes another writer holds (:meth:`node_lock`: a live callback, a replay) are left to
        it. Rows and metadata that still cannot go (Tiled down, key refused) stay; the reason
        is in each node's ``fault.txt`` and the log.
        """
        sent = 0
        if not self.backup_dir.exists():
            return 0
        for params_file in sorted(self.backup_dir.glob("*/open.json")):
            try:
                params = json.loads(params_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # removed meanwhile by the writer that holds the node
            key = self.node_key(params["raw_uid"], params["model"])
            lock = self.node_lock(key)
            if not lock.acquire():
                logger.info("flush_backups: %s is being written by %s; left to it", key,
                            lock.holder())
                continue
            try:
                writer = DerivedRunWriter(self, key, params)
                sent += writer.flushed_at_open + writer.flush()
            finally:
                lock.release()
        return sent
