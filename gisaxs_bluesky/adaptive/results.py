"""Per-frame DAE results of one scan, as the suggestion logic and the plans read them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ScanResults"]


@dataclass(frozen=True)
class ScanResults:
    """Per-frame DAE results of one scan, aligned arrays of length N.

    ``positions`` maps motor name -> (N,) positions; ``noise_prob`` is (N, K) over
    ``noise_kinds`` (may be (N, 0)); ``exposure`` is the exposure factor each frame had (1.0 for
    the nominal exposure).
    """

    positions: Mapping[str, np.ndarray]
    bin_id: np.ndarray
    outlier_score: np.ndarray
    is_outlier: np.ndarray
    recon_error: np.ndarray
    seq_num: np.ndarray
    noise_prob: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    noise_kinds: tuple[str, ...] = ()
    exposure: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.positions:
            raise ValueError("positions is empty: need at least one motor")
        pos = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.positions.items()}
        n = len(next(iter(pos.values())))
        for k, v in pos.items():
            if len(v) != n:
                raise ValueError(f"positions[{k!r}] has {len(v)} values, expected {n}")
        object.__setattr__(self, "positions", pos)
        for name, dtype in (("bin_id", np.int64), ("outlier_score", np.float64),
                            ("recon_error", np.float64), ("seq_num", np.int64)):
            a = np.asarray(getattr(self, name))
            if name in ("bin_id", "seq_num") and a.dtype.kind == "f":
                a = np.where(np.isfinite(a), a, -1)
            a = a.astype(dtype).reshape(-1)
            if len(a) != n:
                raise ValueError(f"{name} has {len(a)} values, positions have {n}")
            object.__setattr__(self, name, a)
        out = np.asarray(self.is_outlier).astype(bool).reshape(-1)
        if len(out) != n:
            raise ValueError(f"is_outlier has {len(out)} values, positions have {n}")
        object.__setattr__(self, "is_outlier", out)
        noise = np.asarray(self.noise_prob, dtype=np.float64)
        kinds = tuple(str(k) for k in self.noise_kinds)
        if noise.size == 0:
            noise = np.zeros((n, len(kinds)), np.float64) * np.nan if kinds else np.zeros((n, 0))
        if noise.ndim != 2 or noise.shape != (n, len(kinds)):
            raise ValueError(
                f"noise_prob has shape {noise.shape}, expected ({n}, {len(kinds)}) for "
                f"noise_kinds={kinds}"
            )
        object.__setattr__(self, "noise_prob", noise)
        object.__setattr__(self, "noise_kinds", kinds)
        exp = np.ones(n) if self.exposure is None else np.asarray(self.exposure, np.float64)
        if exp.shape != (n,):
            raise ValueError(f"exposure has shape {exp.shape}, expected ({n},)")
        object.__setattr__(self, "exposure", exp)

    def __len__(self) -> int:
        return len(self.seq_num)

    @property
    def motors(self) -> tuple[str, ...]:
        return tuple(self.positions)

    @classmethod
    def empty(cls, motors: Sequence[str], noise_kinds: Sequence[str] = ()) -> ScanResults:
        """No frames yet."""
        z = np.zeros(0)
        return cls({m: z for m in motors}, z, z, z, z, z,
                   np.zeros((0, len(noise_kinds))), tuple(noise_kinds))

    @classmethod
    def from_dataset(cls, ds: Any, motors: Sequence[str] | None = None,
                     exposure: Mapping[int, float] | None = None) -> ScanResults:
        """From :func:`gisaxs_bluesky.store.read_derived` (xarray.Dataset with a frame dim)."""
        motors = list(motors if motors is not None else ds.attrs.get("motors", []))
        if not motors:
            raise ValueError("the derived dataset names no motors (attrs['motors'] is empty)")
        for m in motors:
            if m not in ds:
                raise ValueError(f"motor {m!r} is not a variable of the derived dataset")
        seq = np.asarray(ds["seq_num"].values, np.int64)
        exp = None
        if exposure:
            exp = np.array([float(exposure.get(int(s), 1.0)) for s in seq])
        return cls(
            {m: np.asarray(ds[m].values) for m in motors},
            np.asarray(ds["bin_id"].values),
            np.asarray(ds["outlier_score"].values),
            np.asarray(ds["is_outlier"].values),
            np.asarray(ds["recon_error"].values),
            seq,
            np.asarray(ds["noise_prob"].values),
            tuple(str(k) for k in ds["noise_kind"].values),
            exp,
        )

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], motors: Sequence[str],
                  noise_kinds: Sequence[str] = ()) -> ScanResults:
        """From dict rows (motor positions, bin_id, outlier_score, is_outlier, recon_error,
        optional seq_num, noise_prob (K,) or ``noise_prob_<kind>``, exposure_factor)."""
        if not rows:
            return cls.empty(motors, noise_kinds)
        for i, r in enumerate(rows):
            for key in (*motors, "bin_id", "outlier_score", "is_outlier"):
                if key not in r:
                    raise ValueError(f"row {i} lacks {key!r}: {dict(r)}")

        def noise_row(r: Mapping[str, Any]) -> list[float]:
            if "noise_prob" in r and len(noise_kinds):
                return [float(v) for v in np.asarray(r["noise_prob"]).reshape(-1)]
            return [float(r.get(f"noise_prob_{k}", np.nan)) for k in noise_kinds]

        return cls(
            {m: np.array([float(r[m]) for r in rows]) for m in motors},
            np.array([r["bin_id"] for r in rows], dtype=np.float64),
            np.array([float(r["outlier_score"]) for r in rows]),
            np.array([bool(r["is_outlier"]) for r in rows]),
            np.array([float(r.get("recon_error", np.nan)) for r in rows]),
            np.array([int(r.get("seq_num", i + 1)) for i, r in enumerate(rows)]),
            np.array([noise_row(r) for r in rows], dtype=np.float64).reshape(len(rows), -1)
            if noise_kinds else np.zeros((len(rows), 0)),
            tuple(noise_kinds),
            np.array([float(r.get("exposure_factor", 1.0)) for r in rows]),
        )
