"""Query helpers over the derived-data nodes written by ``gisaxs_bluesky.store``.

Server-side narrowing uses node metadata (``tiled.queries``); frame-level rows are then read
from each matching node's ``frames`` table.  Note: on SQLite catalogs ``Contains`` on a list
of ints is a substring match (bin 1 matches 12), so bin membership is queried through the
``bin_counts`` mapping with ``KeyPresent("bin_counts.<id>")``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from tiled.queries import Eq, KeyPresent, SpecsQuery

from .runtime import DEFAULT_ROOT
from .store import DERIVED_SPEC, TABLE_KEY, read_derived

__all__ = [
    "DEFAULT_ROOT",
    "derived_nodes",
    "runs_with_bin",
    "frames_in_bin",
    "outlier_frames",
    "derived_for_run",
]

ModelSpec = str | Mapping[str, Any] | None


def _model_queries(model: ModelSpec) -> list[list[Any]]:
    """Alternative query lists (OR-ed) selecting a model: "name", "name-version" or a dict."""
    if model is None:
        return [[]]
    if isinstance(model, Mapping):
        qs = [Eq("model.name", str(model["name"]))]
        if model.get("version") is not None:
            qs.append(Eq("model.version", str(model["version"])))
        return [qs]
    return [[Eq("model_id", str(model))], [Eq("model.name", str(model))]]


def derived_nodes(
    client: Any, *queries: Any, model: ModelSpec = None, root: str = DEFAULT_ROOT
) -> Iterator[tuple[str, Any]]:
    """Yield (key, node) of derived nodes matching all ``queries`` and ``model`` (server-side).

    Only nodes with the ``GISAXSDerived`` spec: the root also holds other nodes about a run
    (e.g. its ``<raw_uid>-suggestions``) that carry ``raw_uid`` but no ``frames`` table.
    """
    if root not in client:
        return
    base = client[root].search(SpecsQuery(include=[DERIVED_SPEC]))
    seen: set[str] = set()
    for alternative in _model_queries(model):
        results = base
        for q in (*queries, *alternative):
            results = results.search(q)
        for key, node in results.items():
            if key not in seen:
                seen.add(key)
                yield key, node


def _node_row(key: str, md: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "node_key": key,
        "raw_uid": md.get("raw_uid"),
        "scan_id": md.get("scan_id"),
        "model": md.get("model_id"),
    }


def runs_with_bin(
    client: Any, bin_id: int, *, model: ModelSpec = None, root: str = DEFAULT_ROOT
) -> pd.DataFrame:
    """One row per derived node having frames in ``bin_id``: raw_uid, scan_id, model, count.

    Equivalent query::

        client["gisaxs_derived"].search(KeyPresent(f"bin_counts.{bin_id}"))
                                .search(Eq("model_id", "dae-1.2"))   # if model given
    """
    rows = []
    for key, node in derived_nodes(client, KeyPresent(f"bin_counts.{int(bin_id)}"),
                                   model=model, root=root):
        md = node.metadata
        rows.append({**_node_row(key, md), "count": int(md["bin_counts"][str(int(bin_id))])})
    return pd.DataFrame(rows, columns=["node_key", "raw_uid", "scan_id", "model", "count"])


def _frame_rows(key: str, node: Any, select) -> pd.DataFrame:
    """Frame-level rows of one node where ``select(df)`` is True, with node identity columns."""
    md = node.metadata
    motors = list(md.get("motors", []))
    cols = ["seq_num", "time", "bin_id", "outlier_score", "is_outlier", "recon_error", *motors]
    df = node[TABLE_KEY].read(columns=cols)
    df = df[np.asarray(select(df), dtype=bool)].sort_values("seq_num")
    for name, value in reversed(list(_node_row(key, md).items())):
        df.insert(0, name, value)
    return df.reset_index(drop=True)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    base = ["node_key", "raw_uid", "scan_id", "model", "seq_num", "time", "bin_id",
            "outlier_score", "is_outlier", "recon_error"]
    if not frames:
        return pd.DataFrame(columns=base)
    return pd.concat(frames, ignore_index=True)


def frames_in_bin(
    client: Any, bin_id: int, *, model: ModelSpec = None, root: str = DEFAULT_ROOT
) -> pd.DataFrame:
    """All frames in ``bin_id``: raw_uid, scan_id, model, seq_num, outlier_score, ..., motors.

    Equivalent query (then each node's ``frames`` table filtered on ``bin_id``)::

        client["gisaxs_derived"].search(KeyPresent(f"bin_counts.{bin_id}"))
    """
    k = int(bin_id)
    frames = [
        _frame_rows(key, node, lambda df: df["bin_id"] == k)
        for key, node in derived_nodes(client, KeyPresent(f"bin_counts.{k}"), model=model,
                                       root=root)
    ]
    return _concat(frames)


def outlier_frames(
    client: Any,
    *,
    model: ModelSpec = None,
    min_score: float | None = None,
    root: str = DEFAULT_ROOT,
) -> pd.DataFrame:
    """Frames flagged ``is_outlier`` (or with ``outlier_score >= min_score`` when given).

    Equivalent query (``min_score=None``)::

        client["gisaxs_derived"].search(Eq("has_outliers", True))
    """
    if min_score is None:
        nodes = derived_nodes(client, Eq("has_outliers", True), model=model, root=root)
        frames = [_frame_rows(k, n, lambda df: df["is_outlier"]) for k, n in nodes]
    else:
        thr = float(min_score)
        nodes = derived_nodes(client, model=model, root=root)
        frames = [_frame_rows(k, n, lambda df: df["outlier_score"] >= thr) for k, n in nodes]
    return _concat(frames)


def derived_for_run(
    client: Any, raw_uid: str, *, root: str = DEFAULT_ROOT
) -> dict[str, xr.Dataset]:
    """All derived datasets of one raw run, keyed by model id ("name-version").

    Equivalent query::

        client["gisaxs_derived"].search(Eq("raw_uid", raw_uid))
    """
    return {
        node.metadata.get("model_id", key): read_derived(node)
        for key, node in derived_nodes(client, Eq("raw_uid", raw_uid), root=root)
    }
