"""The derived-row schema, in one place: columns, dtypes, empty rows, Tiled table <-> rows.

A *row batch* is what the pipeline produces and the store writes: a mapping with
``seq_num``, ``time``, ``bin_id``, ``outlier_score``, ``is_outlier``, ``recon_error`` (N,),
``latent`` (N, D), ``noise_prob`` (N, K), ``structure``, ``radius_nm``, ``distance_nm`` (N,)
``flag`` (N,) str and one (N,) float column per motor. The Tiled table holds it flat:
``latent_<i>`` and ``noise_prob_<kind>`` columns (nodes written before schema 1.1 name the
noise columns by index, ``noise_prob_<j>``; both read back the same).

``flag`` (schema 1.2) says why a frame was not binned as usual, "" when it was: a frame whose
geometry a q-grid model needs but cannot be had (``bin_id`` UNPROCESSED_BIN, the reason
names the missing key), or whose geometry lies outside the ranges the model's card covers
(``bin_id`` UNBINNED_BIN, ``is_outlier`` True: encoded, its latent stored, but kept out of
the bins; the reason names the field and the range). Nodes written before 1.2 have no
``flag`` column; they read back with "" and are appended to without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "CORE_COLUMNS",
    "FLAG_COLUMN",
    "OPTIONAL_FLOATS",
    "SCHEMA_VERSION",
    "UNBINNED_BIN",
    "UNPROCESSED_BIN",
    "DerivedSchema",
    "latent_column",
    "noise_column",
]

#: version of the table layout (1.1: noise columns named by kind; 1.2: the ``flag`` column)
SCHEMA_VERSION = "1.2"
#: spec of a derived node (a container beside the raw run) and of its layout
DERIVED_SPEC = "GISAXSDerived"
DERIVED_SPEC_VERSION = SCHEMA_VERSION
#: key of the frames table inside a derived node
TABLE_KEY = "frames"
#: a derived node's ``status``
STATUSES = ("running", "complete", "failed")
#: the node's ``errors``: at most this many, each at most this long
MAX_ERRORS = 50
MAX_ERROR_CHARS = 2000
#: bin id of frames that were not encoded (bad frame or model failure; see the node's errors)
UNPROCESSED_BIN = -2
#: bin id of frames encoded but kept out of the bins (their ``flag`` says why: a geometry
#: outside the model card's ranges)
UNBINNED_BIN = -3
#: the column that says why a frame was not binned as usual ("" when it was)
FLAG_COLUMN = "flag"

# column name -> (arrow type, numpy dtype, allowed numpy kinds)
CORE_COLUMNS: dict[str, tuple[pa.DataType, str, str]] = {
    "seq_num": (pa.int64(), "int64", "iu"),
    "time": (pa.float64(), "float64", "iuf"),
    "bin_id": (pa.int64(), "int64", "iu"),
    "outlier_score": (pa.float32(), "float32", "iuf"),
    "is_outlier": (pa.bool_(), "bool", "b"),
    "recon_error": (pa.float32(), "float32", "iuf"),
}
OPTIONAL_FLOATS = ("radius_nm", "distance_nm")
_RESERVED = set(CORE_COLUMNS) | {"latent", "noise_prob", "structure", FLAG_COLUMN,
                                 *OPTIONAL_FLOATS}


def latent_column(i: int) -> str:
    return f"latent_{i}"


def noise_column(kind: str) -> str:
    return f"noise_prob_{kind}"


@dataclass(frozen=True)
class DerivedSchema:
    """Column layout of one derived node: latent width, noise kinds, motors.

    ``noise_by_index``: the noise columns of a node written before schema 1.1
    (``noise_prob_0`` ...), kept when such a node is appended to; ``has_flag`` False: a node
    written before 1.2, without the ``flag`` column.
    """

    latent_dim: int
    noise_kinds: tuple[str, ...]
    motors: tuple[str, ...] = ()
    noise_by_index: bool = False
    has_flag: bool = True

    def __post_init__(self) -> None:
        if int(self.latent_dim) < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim!r}")
        kinds = tuple(str(k) for k in self.noise_kinds)
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"noise_kinds must be unique, got {list(kinds)!r}")
        motors = tuple(str(m) for m in self.motors)
        for m in motors:
            if m in _RESERVED or m.startswith(("latent_", "noise_prob_")):
                raise ValueError(f"motor name {m!r} collides with a derived column name")
        object.__setattr__(self, "latent_dim", int(self.latent_dim))
        object.__setattr__(self, "noise_kinds", kinds)
        object.__setattr__(self, "motors", motors)

    @classmethod
    def for_table(cls, latent_dim: int, noise_kinds: Sequence[str], motors: Sequence[str],
                  columns: Sequence[str]) -> DerivedSchema:
        """The schema of an existing table with these ``columns`` (old or new noise names,
        with or without ``flag``)."""
        by_index = bool(noise_kinds) and noise_column(str(noise_kinds[0])) not in columns \
            and "noise_prob_0" in columns
        return cls(latent_dim, tuple(noise_kinds), tuple(motors), noise_by_index=by_index,
                   has_flag=FLAG_COLUMN in columns)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> DerivedSchema:
        """The schema of a derived node from its metadata (``schema_version`` absent: written
        before 1.1, noise columns by index)."""
        latent_dim = int(md.get("latent_dim") or 1)
        version = md.get("schema_version")
        return cls(latent_dim, tuple(md.get("noise_kinds") or ()), tuple(md.get("motors") or ()),
                   noise_by_index=version is None, has_flag=version not in (None, "1.0", "1.1"))

    # ------------------------------------------------------------------------- columns
    @property
    def latent_columns(self) -> list[str]:
        return [latent_column(i) for i in range(self.latent_dim)]

    @property
    def noise_columns(self) -> list[str]:
        if self.noise_by_index:
            return [f"noise_prob_{j}" for j in range(len(self.noise_kinds))]
        return [noise_column(k) for k in self.noise_kinds]

    def arrow_schema(self) -> pa.Schema:
        """Arrow schema of the frames table."""
        fields = [(k, t) for k, (t, _, _) in CORE_COLUMNS.items()]
        fields += [(c, pa.float32()) for c in self.latent_columns]
        fields += [(c, pa.float32()) for c in self.noise_columns]
        fields += [("structure", pa.string())]
        fields += [(c, pa.float64()) for c in OPTIONAL_FLOATS]
        if self.has_flag:
            fields += [(FLAG_COLUMN, pa.string())]
        fields += [(m, pa.float64()) for m in self.motors]
        return pa.schema(fields)

    # ---------------------------------------------------------------------------- rows
    def empty_rows(self, seq_num: Any, time: Any,
                   positions: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Rows of frames not (yet) encoded: UNPROCESSED_BIN, NaN latent and scores."""
        seq = np.asarray(seq_num, dtype=np.int64).reshape(-1)
        n = len(seq)
        rows: dict[str, np.ndarray] = {
            "seq_num": seq,
            "time": np.asarray(time, dtype=np.float64).reshape(-1),
            "latent": np.full((n, self.latent_dim), np.nan, dtype=np.float32),
            "bin_id": np.full(n, UNPROCESSED_BIN, dtype=np.int64),
            "outlier_score": np.full(n, np.nan, dtype=np.float32),
            "is_outlier": np.zeros(n, dtype=bool),
            "recon_error": np.full(n, np.nan, dtype=np.float32),
            "noise_prob": np.full((n, len(self.noise_kinds)), np.nan, dtype=np.float32),
            "structure": np.full(n, "", dtype=object),
            "radius_nm": np.full(n, np.nan),
            "distance_nm": np.full(n, np.nan),
            FLAG_COLUMN: np.full(n, "", dtype=object),
        }
        positions = positions or {}
        for m in self.motors:
            rows[m] = np.asarray(positions.get(m, np.full(n, np.nan)), dtype=np.float64)
        return rows

    def validate(self, rows: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], str | None]:
        """Check a row batch and flatten it to table columns; ValueError names the bad column.
        Also returns how ``structure`` was given ("int", "str" or None)."""
        if not isinstance(rows, Mapping):
            raise ValueError(f"rows must be a mapping of column -> array, got {type(rows)}")
        for name in [*CORE_COLUMNS, "latent", "noise_prob", *self.motors]:
            if name not in rows:
                raise ValueError(f"missing column {name!r} in rows")
        n = len(np.asarray(rows["seq_num"]).reshape(-1))
        out: dict[str, np.ndarray] = {}

        def arr(name: str, ndim: int) -> np.ndarray:
            a = np.asarray(rows[name])
            if a.ndim != ndim or a.shape[0] != n:
                want = "(n,)" if ndim == 1 else f"(n, {a.shape[1:] or '?'})"
                raise ValueError(
                    f"column {name!r}: expected shape {want} with n={n}, got {a.shape}")
            return a

        def check_kind(name: str, a: np.ndarray, kinds: str) -> None:
            if a.dtype.kind not in kinds:
                raise ValueError(f"column {name!r}: dtype {a.dtype} not allowed (kinds {kinds!r})")

        for name, (_, dtype, kinds) in CORE_COLUMNS.items():
            a = arr(name, 1)
            if n and name == "is_outlier" and a.dtype.kind in "iu" and set(np.unique(a)) <= {0, 1}:
                a = a.astype(bool)
            check_kind(name, a, kinds)
            out[name] = a.astype(dtype)
        lat = arr("latent", 2)
        if lat.shape[1] != self.latent_dim:
            raise ValueError(
                f"column 'latent': expected shape (n, {self.latent_dim}), got {lat.shape}")
        check_kind("latent", lat, "iuf")
        for i, col in enumerate(self.latent_columns):
            out[col] = lat[:, i].astype("float32")
        nk = len(self.noise_kinds)
        noise = arr("noise_prob", 2)
        if noise.shape[1] != nk:
            raise ValueError(f"column 'noise_prob': expected shape (n, {nk}), got {noise.shape}")
        check_kind("noise_prob", noise, "iuf")
        for j, col in enumerate(self.noise_columns):
            out[col] = noise[:, j].astype("float32")
        structure_kind = None
        if rows.get("structure") is not None:
            s = arr("structure", 1)
            if s.dtype.kind in "iu":
                structure_kind = "int"
            elif s.dtype.kind in "UO":
                structure_kind = "str"
            else:
                raise ValueError(f"column 'structure': dtype {s.dtype} must be str or int")
            out["structure"] = np.array([str(v) for v in s], dtype=str)
        else:
            out["structure"] = np.full(n, "", dtype=str)
        for name in OPTIONAL_FLOATS:
            if rows.get(name) is not None:
                a = arr(name, 1)
                check_kind(name, a, "iuf")
                out[name] = a.astype("float64")
            else:
                out[name] = np.full(n, np.nan)
        if self.has_flag:  # a node written before 1.2 has no column for it: not stored there
            if rows.get(FLAG_COLUMN) is not None:
                f = arr(FLAG_COLUMN, 1)
                if f.dtype.kind not in "UO":
                    raise ValueError(f"column {FLAG_COLUMN!r}: dtype {f.dtype} must be str")
                out[FLAG_COLUMN] = np.array(["" if v is None else str(v) for v in f], dtype=str)
            else:
                out[FLAG_COLUMN] = np.full(n, "", dtype=str)
        for m in self.motors:
            a = arr(m, 1)
            check_kind(m, a, "iuf")
            out[m] = a.astype("float64")
        return out, structure_kind

    def to_arrow(self, columns: Mapping[str, np.ndarray]) -> pa.Table:
        """Table columns (from :meth:`validate`) -> an arrow table with the node's schema."""
        schema = self.arrow_schema()
        n = len(np.asarray(columns["seq_num"]))
        # rows kept in a local backup before 1.2 have no flag: "" (binned as usual)
        return pa.Table.from_arrays(
            [pa.array(np.asarray(columns[f.name]) if f.name in columns or f.name != FLAG_COLUMN
                      else np.full(n, "", dtype=str), type=f.type) for f in schema],
            schema=schema)

    def rows_from_table(self, df: Any, structure_kind: str | None = None
                        ) -> dict[str, np.ndarray]:
        """A frames table (pandas, any row order) -> a row batch sorted by seq_num."""
        df = df.sort_values("seq_num").reset_index(drop=True)
        n = len(df)
        rows: dict[str, np.ndarray] = {
            name: df[name].to_numpy(dtype) for name, (_, dtype, _) in CORE_COLUMNS.items()}
        rows["latent"] = (np.stack([df[c].to_numpy("float32") for c in self.latent_columns], 1)
                          if n else np.zeros((0, self.latent_dim), "float32"))
        noise_cols = self.noise_columns
        rows["noise_prob"] = (np.stack([df[c].to_numpy("float32") for c in noise_cols], 1)
                              if n and noise_cols else np.zeros((n, len(noise_cols)), "float32"))
        structure = df["structure"].astype(str).to_numpy() if n else np.array([], dtype=str)
        if structure_kind == "int" and n:
            structure = np.array([int(s) if s != "" else -1 for s in structure], dtype="int64")
        rows["structure"] = structure
        for name in (*OPTIONAL_FLOATS, *self.motors):
            rows[name] = df[name].to_numpy("float64")
        rows[FLAG_COLUMN] = (df[FLAG_COLUMN].fillna("").astype(str).to_numpy(object)
                             if FLAG_COLUMN in df.columns else np.full(n, "", dtype=object))
        return rows
