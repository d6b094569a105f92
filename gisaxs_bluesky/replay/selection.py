"""Which runs to replay: Tiled queries on the start document, explicit uids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tiled.queries import Eq, Key

from ..runtime import DEFAULT_ROOT


def _parse_time(value: float | str) -> float:
    """Unix time from a number or an ISO-8601 string."""
    if isinstance(value, int | float):
        return float(value)

    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError as exc:
        raise ValueError(f"time {value!r}: expected unix seconds or ISO-8601") from exc


def build_queries(
    *,
    scan_ids: tuple[int | None, int | None] | None = None,
    plan_name: str | None = None,
    since: float | str | None = None,
    until: float | str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Tiled queries on the start document: scan_id range (inclusive), plan, time, key=value."""

    queries: list[Any] = []
    if scan_ids is not None:
        lo, hi = scan_ids
        if lo is not None:
            queries.append(Key("start.scan_id") >= int(lo))
        if hi is not None:
            queries.append(Key("start.scan_id") <= int(hi))
    if plan_name:
        queries.append(Eq("start.plan_name", plan_name))
    if since is not None:
        queries.append(Key("start.time") >= _parse_time(since))
    if until is not None:
        queries.append(Key("start.time") <= _parse_time(until))
    for key, value in (metadata or {}).items():
        queries.append(Eq(f"start.{key}", value))
    return queries


def select_runs(
    catalog: Any,
    *queries: Any,
    uids: Sequence[str] | None = None,
    root: str = DEFAULT_ROOT,
    limit: int | None = None,
) -> list[str]:
    """Run uids matching all ``queries`` (server-side), in catalogue order, then ``uids``.

    Explicit ``uids`` are kept as given (a missing one is reported by the replay); nodes that are
    not Bluesky runs (e.g. the derived ``root`` container) are left out of query results.
    """
    out: list[str] = []
    if queries or not uids:
        results = catalog
        for q in queries:
            results = results.search(q)
        for key, node in results.items():
            if key == root:
                continue
            specs = {getattr(s, "name", s) for s in getattr(node, "specs", [])}
            if specs and "BlueskyRun" not in specs:
                continue
            out.append(key)
            if limit is not None and len(out) >= limit:
                break
    for uid in uids or ():
        if uid not in out:
            out.append(uid)
    return out


# ------------------------------------------------------------------------------------ model
_MODEL_CACHE: dict[tuple[str, str], Any] = {}
