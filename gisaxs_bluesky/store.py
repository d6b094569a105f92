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

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import xarray as xr

from .derived import SCHEMA_VERSION, DerivedSchema
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

DERIVED_SPEC = "GISAXSDerived"
DERIVED_SPEC_VERSION = SCHEMA_VERSION
TABLE_KEY = "frames"
STATUSES = ("running", "complete", "failed")
MAX_ERRORS = 50
MAX_ERROR_CHARS = 2000

def default_backup_dir() -> Path:
    """Per-user cache dir for rows that could not reach Tiled."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gisaxs_bluesky" / "derived_backup"


def is_server_fault(exc: BaseException) -> bool:
    """True for faults of the server/connection (transport errors, HTTP 5xx), not of the request."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    if "database is locked" in str(exc):
        # SQLite storage busy with another writer; an in-process app raises it unwrapped
        return True
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def is_refused(exc: BaseException) -> bool:
    """True when Tiled refused the request for its credentials (HTTP 401/403: a key revoked
    or rotated, no write permission): the request itself was fine and can be re-sent later."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 403)


def _retryable(exc: BaseException) -> bool:
    """Faults after which rows are kept in the local backup and re-sent later."""
    return is_server_fault(exc) or is_refused(exc)


def describe_fault(exc: BaseException) -> str:
    """One line for the user: what Tiled answered (never the API key)."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        what = {401: "refused the API key (HTTP 401: missing, revoked or rotated)",
                403: "refused the write (HTTP 403: no write permission)"}.get(code)
        if what is None:
            what = (f"answered with a server error (HTTP {code})" if code >= 500
                    else f"rejected the request (HTTP {code})")
        return f"Tiled {what}"
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return f"Tiled unreachable ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


def _select(cols: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[mask] for k, v in cols.items()}


class _Backup:
    """Append-only local store of rows (npz chunks) and pending metadata for one node."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz")) if self.dir.exists() else []

    def write_open_params(self, params: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.dir / "open.json", params)

    def add_rows(self, cols: Mapping[str, np.ndarray]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"chunk-{time.time_ns():020d}-{os.getpid()}.npz"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in cols.items()})
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def seq_nums(self) -> set[int]:
        out: set[int] = set()
        for p in self.chunks():
            with np.load(p, allow_pickle=False) as z:
                out.update(int(s) for s in z["seq_num"])
        return out

    def pending_metadata(self) -> dict[str, Any]:
        p = self.dir / "metadata.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def set_pending_metadata(self, md: Mapping[str, Any]) -> None:
        p = self.dir / "metadata.json"
        if md:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_json(p, md)
        elif p.exists():
            p.unlink()

    def fault(self) -> str | None:
        p = self.dir / "fault.txt"
        return p.read_text() if p.exists() else None

    def set_fault(self, reason: str | None) -> None:
        """Why rows wait here (e.g. Tiled refused the key), for the user who looks in the dir."""
        p = self.dir / "fault.txt"
        if reason:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(reason + "\n")
            os.replace(tmp, p)
        elif p.exists():
            p.unlink()

    def cleanup(self) -> None:
        """Remove the directory when nothing is pending."""
        if self.dir.exists() and not self.chunks() and not (self.dir / "metadata.json").exists():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def _jsonable(md: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(md), default=_json_default))


class DerivedRunWriter:
    """Incrementally writes one derived node; falls back to a local backup when Tiled is down."""

    def __init__(self, store: DerivedStore, key: str, params: dict[str, Any]) -> None:
        self.store = store
        self.key = key
        self.params = params
        self.layout = DerivedSchema(params["latent_dim"], tuple(params["noise_kinds"]),
                                    tuple(params["motors"]))
        self.stored_seq_nums: set[int] = set()
        self._backup = _Backup(store.backup_dir / _safe_key(key))
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
        }
        md.update(p.get("extra_metadata") or {})
        return _jsonable(md)

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
            if not _retryable(exc):
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
            if not _retryable(exc):
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
                if not _retryable(exc):
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
        self._backup.set_pending_metadata(_jsonable(self._user_md))
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
        md = _jsonable({**self._auto_metadata(), **self._user_md})
        ok = self._connect(probe or self._table is None)
        if ok:
            try:
                self._node.update_metadata(metadata=md)
            except Exception as exc:
                if not _retryable(exc):
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
        self._user_md.update(_jsonable(md))
        self._push_metadata()

    def finish(self, status: str = "complete", **md: Any) -> None:
        """Flush backups and mark the node ``status`` (running/complete/failed)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._user_md.update(_jsonable({**md, "status": status, "finished": time.time()}))
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


class NodeLock:
    """Exclusive lock on one derived node among the writers of this machine (``flock`` on
    ``backup_dir/.locks/<key>.lock``; released by :meth:`release` or when the process ends).

    Without it, two replays of one run (or a replay of a run the live callback is still
    writing) each read the stored seq_nums, then both append the rest: duplicate rows.
    """

    def __init__(self, directory: Path, key: str) -> None:
        self.path = directory / ".locks" / f"{_safe_key(key)}.lock"
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def holder(self) -> str:
        """Who holds the lock (``pid@host`` as written by the holder), or ``?``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` s; True when held (also when the backup
        directory cannot be written: the lock is then only advisory and not taken)."""
        import fcntl

        if self._file is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 - held open while locked
        except OSError as exc:
            logger.warning("cannot create lock %s (%s); writing without it", self.path, exc)
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.close()
                    return False
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}@{socket.gethostname()}\n")
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        """Release (never raises)."""
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()  # closing the descriptor drops the flock


class NodeBusyError(RuntimeError):
    """Another writer on this machine holds the node (see :class:`NodeLock`)."""


def tiled_reachable(client: Any, timeout: float = 2.0) -> bool:
    """A fast request (no client retries) to tell whether the client's Tiled answers at all.

    A transport error is tried once more at once: after a server restart the client's
    pooled keep-alive connection to the old process fails on first use, and the second
    attempt opens a fresh one. A server that is down refuses both in milliseconds.
    """
    ctx = getattr(client, "context", None)
    if ctx is None:
        return True
    in_process = type(ctx.http_client).__name__ == "TestClient"  # no timeouts there
    kwargs = {} if in_process else {"timeout": timeout}
    for attempt in range(2):
        try:
            r = ctx.http_client.get(ctx.api_uri, **kwargs)
        except httpx.TransportError:
            if attempt:
                return False
            continue
        except httpx.HTTPError:
            return False
        return r.status_code < 500
    return False


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
            if not _retryable(exc):
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
        return _safe_key(f"{raw_uid}-{model['name']}-{model['version']}")

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
        params = _jsonable(
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


def read_derived(node: Any) -> xr.Dataset:
    """Derived node (container client or its frames table) -> Dataset sorted by seq_num."""
    if hasattr(node, "append_partition"):  # the table itself
        container, table = node, node
    else:
        container, table = node, node[TABLE_KEY]
    md = dict(container.metadata)
    df = table.read().sort_values("seq_num", kind="stable")
    # a seq_num stored twice (two writers at once on different hosts): the first row wins,
    # as for a writer's own re-appends
    df = df[~df["seq_num"].duplicated()].reset_index(drop=True)
    latent_dim = int(md.get("latent_dim", sum(c.startswith("latent_") for c in df.columns)))
    kinds = list(md.get("noise_kinds", []))
    motors = list(md.get("motors", []))
    schema = DerivedSchema.for_table(latent_dim, kinds, motors, list(df.columns))
    rows = schema.rows_from_table(df, md.get("structure_kind"))
    data_vars: dict[str, Any] = {
        name: ("frame", rows[name]) for name in
        ("time", "bin_id", "outlier_score", "is_outlier", "recon_error", "structure",
         "radius_nm", "distance_nm", *motors)}
    data_vars["latent"] = (("frame", "latent_dim"), rows["latent"])
    data_vars["noise_prob"] = (("frame", "noise_kind"), rows["noise_prob"])
    return xr.Dataset(
        data_vars,
        coords={
            "seq_num": ("frame", rows["seq_num"]),
            "noise_kind": ("noise_kind", kinds),
            "latent_dim": ("latent_dim", np.arange(latent_dim)),
        },
        attrs=md,
    )
