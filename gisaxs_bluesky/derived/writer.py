"""Writes one derived node: rows and metadata to Tiled, or to the local backup meanwhile."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xarray as xr

from .backup import LocalBackup, jsonable, safe_key
from .faults import describe_fault, retryable
from .reading import read_derived
from .schema import (
    DERIVED_SPEC,
    DERIVED_SPEC_VERSION,
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    SCHEMA_VERSION,
    STATUSES,
    TABLE_KEY,
    DerivedSchema,
)

__all__ = ["DerivedRunWriter", "NodeStore"]

logger = logging.getLogger("gisaxs_bluesky.store")


class NodeStore(Protocol):
    """What a writer needs of the store that opened it (``gisaxs_bluesky.store.DerivedStore``)."""

    backup_dir: Path
    summary_interval: float

    @property
    def server(self) -> str: ...

    def reachable(self) -> bool: ...

    def root_node(self) -> Any: ...


def _select(cols: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[mask] for k, v in cols.items()}


class DerivedRunWriter:
    """Incrementally writes one derived node; falls back to a local backup when Tiled is down."""

    def __init__(self, store: NodeStore, key: str, params: dict[str, Any]) -> None:
        self.store = store
        self.key = key
        self.params = params
        self.layout = DerivedSchema(params["latent_dim"], tuple(params["noise_kinds"]),
                                    tuple(params["motors"]))
        self.stored_seq_nums: set[int] = set()
        self._backup = LocalBackup(store.backup_dir / safe_key(key))
        self._node: Any = None
        self._table: Any = None
        self._bin_counts: Counter[int] = Counter()
        self._outliers = 0
        self._structure_kind: str | None = None
        self._user_md: dict[str, Any] = self._backup.pending_metadata()
        self._md_dirty = bool(self._user_md)
        self._errors: list[str] = []
        # when the bin summary was last pushed (monotonic s), and whether it is behind the rows
        self._summary_at = -float("inf")
        self._summary_stale = False
        self.flushed_at_open = 0  # rows re-sent from the backup while opening
        # why rows or metadata last waited in the backup (None: all in Tiled)
        self.fault: str | None = self._backup.fault()
        self.duplicate_rows = 0  # rows in Tiled whose seq_num is stored more than once
        self._connect()
        if self._backup.chunks() or self._md_dirty:
            self.flushed_at_open = self.flush()

    # -- connection ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the node and its table are open on the server."""
        return self._table is not None

    @property
    def node(self) -> Any:
        """The Tiled container client of this node (None while Tiled is unreachable)."""
        return self._node

    @property
    def pending_rows(self) -> int:
        """Rows held in the local backup, not yet in Tiled."""
        return len(self._backup.seq_nums())

    @property
    def pending(self) -> bool:
        """Whether rows or metadata (e.g. the final status) wait in the local backup."""
        return bool(self._backup.chunks()) or self._md_dirty

    @property
    def backup_path(self) -> Path:
        """Directory of this node's local backup (rows, metadata and ``fault.txt``)."""
        return self._backup.dir

    def _note_fault(self, exc: BaseException, doing: str) -> None:
        self.fault = f"{describe_fault(exc)} while {doing} {self.key}"
        logger.warning("%s", self.fault)

    def _initial_metadata(self) -> dict[str, Any]:
        p = self.params
        now = time.time()
        md = {
            "raw_uid": p["raw_uid"],
            "raw_path": f"/{p['raw_uid']}",
            "scan_id": p["scan_id"],
            "model": p["model"],
            "model_id": f"{p['model']['name']}-{p['model']['version']}",
            "binner": p["binner"],
            "latent_dim": p["latent_dim"],
            "noise_kinds": p["noise_kinds"],
            "motors": p["motors"],
            "status": "running",
            "created": now,
            "updated": now,
            "n_frames": 0,
            "bin_ids": [],
            "bin_counts": {},
            "bin_summary": {"ids": [], "counts": []},
            "outlier_count": 0,
            "has_outliers": False,
            "structure_kind": None,
            "errors": [],
            "table_key": TABLE_KEY,
            "schema_version": SCHEMA_VERSION,
        }
        md.update(p.get("extra_metadata") or {})
        return jsonable(md)

    def _connect(self, probe: bool = True) -> bool:
        """Probe Tiled, then open (or create) node and table; False when Tiled is unreachable.

        The probe (one request without retries) keeps a dead server from stalling the writer
        for tens of seconds in the client's retries. ``probe=False`` skips it for a request that
        follows one Tiled has just answered.
        """
        if probe and not self.store.reachable():
            self._node = self._table = None
            self.fault = f"Tiled unreachable (no answer from {self.store.server})"
            return False
        if self._table is not None:
            return True
        try:
            root = self.store.root_node()
            created = False
            if self.key in root:
                node = root[self.key]
                md = node.metadata
                if int(md.get("latent_dim", self.layout.latent_dim)) != self.layout.latent_dim:
                    raise ValueError(
                        f"node {self.key!r} has latent_dim={md.get('latent_dim')}, "
                        f"writer opened with latent_dim={self.layout.latent_dim}"
                    )
                self._errors = list(md.get("errors") or [])
                self._structure_kind = self._structure_kind or md.get("structure_kind")
            else:
                from tiled.structures.core import Spec

                node = root.create_container(
                    self.key,
                    metadata=self._initial_metadata(),
                    specs=[Spec(DERIVED_SPEC, version=DERIVED_SPEC_VERSION)],
                )
                created = True
            if not created and TABLE_KEY in node:
                table = node[TABLE_KEY]
                # a node written before schema 1.1 keeps its noise column names
                self.layout = DerivedSchema.for_table(
                    self.layout.latent_dim, self.layout.noise_kinds, self.layout.motors,
                    list(table.structure().columns))
            else:
                table = node.create_appendable_table(self.layout.arrow_schema(), key=TABLE_KEY)
            self._node, self._table = node, table
            if created:  # a new node holds no rows: nothing to read back
                self.stored_seq_nums = set()
                self._bin_counts = Counter()
                self._outliers = 0
            else:
                self._refresh_from_server()
            return True
        except Exception as exc:
            if not retryable(exc):
                raise
            self._note_fault(exc, "opening")
            self._node = self._table = None
            return False

    def _refresh_from_server(self) -> None:
        """Re-read seq_num/bin_id/is_outlier from Tiled to seed dedup and summaries."""
        df = self._table.read(columns=["seq_num", "bin_id", "is_outlier"])
        # rows of a seq_num stored twice (two writers at once on different hosts) count once
        first = ~df["seq_num"].duplicated()
        self.duplicate_rows = int((~first).sum())
        df = df[first]
        self.stored_seq_nums = {int(s) for s in df["seq_num"]}
        self._bin_counts = Counter(int(b) for b in df["bin_id"])
        self._outliers = int(np.asarray(df["is_outlier"], dtype=bool).sum())

    # -- rows ---------------------------------------------------------------------------------
    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Validate rows (ValueError naming the column) and write new seq_nums to Tiled or backup."""
        cols, skind = self.layout.validate(rows)
        if skind is not None:
            if self._structure_kind not in (None, skind):
                raise ValueError(
                    f"column 'structure': got {skind} values, node stores {self._structure_kind}"
                )
            if self._structure_kind is None:
                self._structure_kind = skind
                self._user_md["structure_kind"] = skind
        seq = cols["seq_num"]
        _, first = np.unique(seq, return_index=True)
        keep = np.zeros(len(seq), dtype=bool)
        keep[first] = True
        known = self.stored_seq_nums | self._backup.seq_nums()
        keep &= np.array([int(s) not in known for s in seq], dtype=bool)
        cols = _select(cols, keep)
        self.flush(summary=False)
        if len(cols["seq_num"]) == 0:
            return
        if self._backup.chunks() or not self._send(cols):
            self._backup.write_open_params(self.params)
            self._backup.add_rows(cols)
            self._backup.set_fault(self.fault)
            logger.warning(
                "%s: %d rows for %s kept in %s", self.fault or "Tiled unreachable",
                len(cols["seq_num"]), self.key, self._backup.dir,
            )
            self._md_dirty = True
            self._keep_metadata()
            return
        if time.monotonic() - self._summary_at >= self.store.summary_interval:
            self._push_metadata(probe=False)  # Tiled has just taken the rows
        else:  # sent with the next append after the interval, a flush or finish
            self._summary_stale = True

    def _send(self, cols: Mapping[str, np.ndarray]) -> bool:
        """Append columns to the table; False on server fault."""
        if not self._connect():
            return False
        try:
            self._table.append_partition(0, self.layout.to_arrow(cols))
        except Exception as exc:
            if not retryable(exc):
                raise
            self._note_fault(exc, "appending rows to")
            self._node = self._table = None  # re-read stored seq_nums on reconnect
            return False
        self.stored_seq_nums.update(int(s) for s in cols["seq_num"])
        self._bin_counts.update(int(b) for b in cols["bin_id"])
        self._outliers += int(np.asarray(cols["is_outlier"], dtype=bool).sum())
        return True

    def flush(self, summary: bool = True) -> int:
        """Send backed-up rows and pending metadata to Tiled; return rows sent (never raises on faults).

        ``summary``: also push a bin summary held back by ``summary_interval``.
        """
        chunks = self._backup.chunks()
        sent = 0
        if chunks:
            if not self._connect():
                self._keep_metadata()
                return 0
            try:
                self._refresh_from_server()
            except Exception as exc:
                if not retryable(exc):
                    raise
                self._note_fault(exc, "reading back")
                self._node = self._table = None
                self._keep_metadata()
                return 0
            for path in chunks:
                cols = self._backup.load(path)
                mask = np.array([int(s) not in self.stored_seq_nums for s in cols["seq_num"]],
                                dtype=bool)
                cols = _select(cols, mask)
                if len(cols["seq_num"]) and not self._send(cols):
                    self._md_dirty = True  # the summary must follow the rows sent so far
                    self._keep_metadata()
                    return sent
                sent += len(cols["seq_num"])
                path.unlink()
        if self._md_dirty or sent or (summary and self._summary_stale):
            self._push_metadata()
        if not self._backup.chunks() and not self._md_dirty:
            self.fault = None
            self._backup.set_fault(None)
            self._backup.cleanup()
        return sent

    def _keep_metadata(self) -> None:
        """Save metadata not yet in Tiled (final status, bin summary, errors) with the backup,
        so that a later flush, in this process or another, delivers it."""
        if not self._md_dirty:
            return
        self._backup.write_open_params(self.params)
        self._backup.set_pending_metadata(jsonable(self._user_md))
        self._backup.set_fault(self.fault)

    # -- metadata -----------------------------------------------------------------------------
    def _auto_metadata(self) -> dict[str, Any]:
        ids = sorted(self._bin_counts)
        counts = [int(self._bin_counts[i]) for i in ids]
        return {
            "n_frames": len(self.stored_seq_nums),
            "bin_ids": ids,
            "bin_counts": {str(i): c for i, c in zip(ids, counts)},
            "bin_summary": {"ids": ids, "counts": counts},
            "outlier_count": int(self._outliers),
            "has_outliers": bool(self._outliers),
            "updated": time.time(),
        }

    def _push_metadata(self, probe: bool = True) -> bool:
        """Send auto summaries + user metadata; keep user metadata on disk on server fault."""
        md = jsonable({**self._auto_metadata(), **self._user_md})
        ok = self._connect(probe or self._table is None)
        if ok:
            try:
                self._node.update_metadata(metadata=md)
            except Exception as exc:
                if not retryable(exc):
                    raise
                self._note_fault(exc, "updating the metadata of")
                self._node = self._table = None
                ok = False
        if ok:
            self._summary_at = time.monotonic()
            self._md_dirty = self._summary_stale = False
            self._backup.set_pending_metadata({})
        else:
            self._md_dirty = True
            self._keep_metadata()
        return ok

    def update_metadata(self, **md: Any) -> None:
        """Merge user metadata (e.g. bin_summary, status) into the node; kept locally if Tiled is down."""
        if "status" in md and md["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {md['status']!r}")
        self._user_md.update(jsonable(md))
        self._push_metadata()

    def finish(self, status: str = "complete", **md: Any) -> None:
        """Flush backups and mark the node ``status`` (running/complete/failed)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._user_md.update(jsonable({**md, "status": status, "finished": time.time()}))
        self._md_dirty = True
        self.flush()
        if self._backup.chunks() or self._md_dirty:
            logger.warning("finish(%s): %s; data kept in %s (re-sent by flush/flush_backups)",
                           self.key, self.fault or "Tiled unreachable", self._backup.dir)

    def record_error(self, message: str) -> None:
        """Append ``message`` to the node's bounded ``errors`` list; never raises."""
        try:
            self._errors.append(str(message)[:MAX_ERROR_CHARS])
            del self._errors[:-MAX_ERRORS]
            self.update_metadata(errors=list(self._errors))
        except Exception as exc:  # noqa: BLE001 - must never raise
            logger.warning("record_error failed for %s: %s", self.key, exc)

    # -- reading ------------------------------------------------------------------------------
    def read(self) -> xr.Dataset:
        """Read this node back from Tiled as an xarray.Dataset."""
        if not self._connect():
            raise ConnectionError(f"Tiled unreachable; cannot read derived node {self.key!r}")
        return read_derived(self._node)
