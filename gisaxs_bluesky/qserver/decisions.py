"""Suggestions and decisions as Tiled keeps them: the stable suggestion id, the suggestions of a
raw run with their ids, the decisions table beside them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa

from ..adaptive.tiled_io import suggestions_key
from ..runtime import DEFAULT_ROOT

__all__ = ["DECISIONS_TABLE", "DECISION_SCHEMA", "DecisionError", "suggestion_id",
           "suggestions_node", "read_suggestions_with_ids", "read_decisions"]

DECISIONS_TABLE = "decisions"


DECISION_SCHEMA = pa.schema([
    ("suggestion_id", pa.string()), ("decision", pa.string()), ("who", pa.string()),
    ("time", pa.float64()), ("reason", pa.string()), ("position", pa.string()),
    ("item_uid", pa.string()), ("note", pa.string()),
])


class DecisionError(RuntimeError):
    """A decision that cannot be made (already decided, unknown id, a server unreachable)."""


def suggestion_id(round_: int, reason: str, position: Mapping[str, float]) -> str:
    """Stable id of a suggestion: ``s`` + 10 hex digits of its round, reason and position."""
    text = json.dumps([int(round_), str(reason),
                       sorted((str(k), round(float(v), 6)) for k, v in position.items())])
    return "s" + hashlib.sha1(text.encode()).hexdigest()[:10]


def suggestions_node(client: Any, raw_uid: str, root: str) -> Any:
    key = suggestions_key(raw_uid)
    if root not in client or key not in client[root]:
        raise DecisionError(f"raw run {raw_uid!r} has no suggestions in Tiled "
                            f"(no node /{root}/{key})")
    return client[root][key]


def read_suggestions_with_ids(client: Any, raw_uid: str, *,
                              root: str = DEFAULT_ROOT) -> pd.DataFrame:
    """Suggestions of a raw run with ``suggestion_id`` and ``position`` (dict) columns."""
    node = suggestions_node(client, raw_uid, root)
    motors = [str(m) for m in node.metadata.get("motors", [])]
    if "suggestions" not in node:
        df = pd.DataFrame(columns=["round", "reason", "priority", "seq_num", *motors])
    else:
        df = node["suggestions"].read()
    df = df.sort_values(["round", "priority"], ascending=[True, False]).reset_index(drop=True)
    positions = [{m: float(r[m]) for m in motors} for _, r in df.iterrows()]
    ids, seen = [], {}
    for (_, r), pos in zip(df.iterrows(), positions, strict=True):
        base = suggestion_id(int(r["round"]), str(r["reason"]), pos)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")  # identical rows
    df["suggestion_id"] = ids
    df["position"] = positions
    df.attrs.update(dict(node.metadata))
    return df


def read_decisions(client: Any, raw_uid: str, *, root: str = DEFAULT_ROOT) -> pd.DataFrame:
    """Decisions stored beside a raw run's suggestions (empty frame when none yet)."""
    node = suggestions_node(client, raw_uid, root)
    if DECISIONS_TABLE not in node:
        return pd.DataFrame(columns=DECISION_SCHEMA.names)
    return node[DECISIONS_TABLE].read().sort_values("time").reset_index(drop=True)
