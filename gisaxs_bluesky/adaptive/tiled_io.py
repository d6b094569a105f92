"""Suggestions in Tiled, beside the derived data: ``/gisaxs_derived/<raw_uid>-suggestions``.

Layout: a container (spec ``GISAXSSuggestions`` v1.0) with metadata ``raw_uid``,
``raw_path``, ``motors``, ``limits``, ``budget``, ``num_coarse``, ``status``
(running/complete/failed), ``n_suggested``, ``n_measured``, ``rounds``, ``stop_reason``, and an
appendable table ``suggestions``: one row per suggestion with ``round`` int64, ``reason``
string, ``priority``/``exposure_factor`` float64, ``source_seq_nums`` string (JSON list),
``seq_num`` int64 (the raw event that measured it, -1 if never measured) and one float64 column
per motor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..runtime import DEFAULT_ROOT
from ..store import DerivedStore
from .suggest import Suggestion

__all__ = ["SUGGESTIONS_SPEC", "SuggestionWriter", "read_suggestions", "suggestions_key"]

SUGGESTIONS_SPEC = "GISAXSSuggestions"
TABLE = "suggestions"


def suggestions_key(raw_uid: str) -> str:
    """Node key of the suggestions of raw run ``raw_uid``."""
    return f"{raw_uid}-suggestions"


class SuggestionWriter:
    """Appends rounds of suggestions for one raw run to Tiled (creates the node on open)."""

    def __init__(self, client: Any, raw_uid: str, motors: Sequence[str], *,
                 root: str = DEFAULT_ROOT, metadata: Mapping[str, Any] | None = None) -> None:
        from tiled.structures.core import Spec

        if not raw_uid:
            raise ValueError(f"raw_uid must be a non-empty str, got {raw_uid!r}")
        self.motors = [str(m) for m in motors]
        self.raw_uid = raw_uid
        parent = DerivedStore(client, root=root).root_node()
        key = suggestions_key(raw_uid)
        md = {"raw_uid": raw_uid, "raw_path": f"/{raw_uid}", "motors": self.motors,
              "status": "running", "created": time.time(), "n_suggested": 0,
              "n_measured": 0, "rounds": 0, **dict(metadata or {})}
        if key in parent:
            self.node = parent[key]
        else:
            self.node = parent.create_container(
                key, metadata=json.loads(json.dumps(md, default=float)),
                specs=[Spec(SUGGESTIONS_SPEC, version="1.0")],
            )
        self.table = (self.node[TABLE] if TABLE in self.node
                      else self.node.create_appendable_table(self.schema(), key=TABLE))
        self.n_suggested = int(self.node.metadata.get("n_suggested", 0))
        self.n_measured = int(self.node.metadata.get("n_measured", 0))
        self.rounds = int(self.node.metadata.get("rounds", 0))

    def schema(self) -> pa.Schema:
        fields = [("round", pa.int64()), ("reason", pa.string()), ("priority", pa.float64()),
                  ("exposure_factor", pa.float64()), ("source_seq_nums", pa.string()),
                  ("seq_num", pa.int64())]
        return pa.schema(fields + [(m, pa.float64()) for m in self.motors])

    def append(self, round_: int, suggestions: Sequence[Suggestion],
               seq_nums: Sequence[int] | None = None) -> None:
        """One round: suggestions and the seq_num that measured each (-1: not measured)."""
        if not suggestions:
            return
        seq = list(seq_nums) if seq_nums is not None else [-1] * len(suggestions)
        if len(seq) != len(suggestions):
            raise ValueError(f"seq_nums has {len(seq)} values for {len(suggestions)} suggestions")
        cols: dict[str, Any] = {
            "round": np.full(len(suggestions), int(round_), np.int64),
            "reason": [s.reason for s in suggestions],
            "priority": np.array([s.priority for s in suggestions], np.float64),
            "exposure_factor": np.array([s.exposure_factor for s in suggestions], np.float64),
            "source_seq_nums": [json.dumps(list(s.source_seq_nums)) for s in suggestions],
            "seq_num": np.array(seq, np.int64),
        }
        for m in self.motors:
            cols[m] = np.array([s.position.get(m, np.nan) for s in suggestions], np.float64)
        schema = self.schema()
        self.table.append_partition(
            0, pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in schema],
                                    schema=schema))
        self.n_suggested += len(suggestions)
        self.n_measured += sum(1 for s in seq if s >= 0)
        self.rounds = max(self.rounds, int(round_) + 1)
        self.update(n_suggested=self.n_suggested, n_measured=self.n_measured,
                    rounds=self.rounds)

    def update(self, **md: Any) -> None:
        """Merge metadata into the node."""
        self.node.update_metadata(
            metadata=json.loads(json.dumps({**md, "updated": time.time()}, default=float)))

    def finish(self, status: str = "complete", **md: Any) -> None:
        """Mark the node ``status`` with extra metadata (e.g. stop_reason)."""
        if status not in ("running", "complete", "failed"):
            raise ValueError(f"status={status!r} must be running/complete/failed")
        self.update(status=status, finished=time.time(), **md)


def read_suggestions(client: Any, raw_uid: str, root: str = DEFAULT_ROOT) -> pd.DataFrame:
    """Suggestions of raw run ``raw_uid`` as a DataFrame (metadata in ``df.attrs``)."""
    key = suggestions_key(raw_uid)
    if root not in client or key not in client[root]:
        raise KeyError(f"no suggestions node /{root}/{key} in Tiled")
    node = client[root][key]
    df = node[TABLE].read()
    df = df.sort_values(["round", "priority"], ascending=[True, False]).reset_index(drop=True)
    df.attrs.update(dict(node.metadata))
    return df
