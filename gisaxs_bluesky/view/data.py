"""What the live view draws, computed from a derived node's rows (no web code here).

:class:`RunRows` holds one derived node's frame rows (the columns the page needs), merges new
rows by ``seq_num`` (streamed payloads and polled re-reads alike, so nothing is drawn twice),
and turns them into JSON-ready payloads: points (sampled above ``max_points``), the latent map
(PCA of the identity latent; UMAP where ``umap-learn`` is installed), bins with a medoid frame,
outliers with why, and noise kinds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..derived import DerivedSchema
from ..store import TABLE_KEY

__all__ = ["ViewConfig", "RunRows", "run_summary", "umap_available"]

#: identity-latent size of the shipped DAE (DAEConfig.identity_dim); the noise part follows
DEFAULT_IDENTITY_DIM = 16


@dataclass(frozen=True)
class ViewConfig:
    """Numbers of the view, documented once.

    max_points: points drawn per plot; above it all outliers are kept and the other frames are
        thinned to every k-th seq_num (stated on the page).
    noise_threshold: a noise kind counts for a frame when its probability is at least this.
    refit_factor: the PCA basis is refitted (page redraws) when a run has grown by this factor
        since the last fit; new rows in between are projected onto the current basis.
    preview_pixels: a representative frame is block-averaged down to at most this many pixels
        per side before it is sent.
    max_bins: bins listed with a representative frame (the most populated; all are counted).
    """

    max_points: int = 2000
    max_bins: int = 24
    noise_threshold: float = 0.5
    refit_factor: float = 1.5
    preview_pixels: int = 128


def umap_available() -> bool:
    """Whether ``umap-learn`` can be imported (the latent map then offers UMAP too)."""
    try:
        import umap  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def run_summary(key: str, md: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the run picker from a derived node's metadata."""
    return {
        "key": key,
        "raw_uid": md.get("raw_uid"),
        "scan_id": md.get("scan_id"),
        "model_id": md.get("model_id"),
        "status": md.get("status"),
        "n_frames": int(md.get("n_frames") or 0),
        "created": float(md.get("created") or 0.0),
        "updated": float(md.get("updated") or 0.0),
        "n_errors": len(md.get("errors") or []),
    }


class RunRows:
    """Rows of one derived node, merged by seq_num; thread-safe."""

    def __init__(self, key: str, metadata: Mapping[str, Any],
                 config: ViewConfig | None = None) -> None:
        self.key = key
        self.config = config or ViewConfig()
        self.metadata = dict(metadata)
        self.motors = [str(m) for m in self.metadata.get("motors", [])]
        self.noise_kinds = [str(k) for k in self.metadata.get("noise_kinds", [])]
        latent_dim = int(self.metadata.get("latent_dim") or 0)
        self.identity_dim = int((self.metadata.get("binner") or {}).get(
            "identity_dim", min(DEFAULT_IDENTITY_DIM, latent_dim) or latent_dim))
        self.latent_cols = [f"latent_{i}" for i in range(self.identity_dim)]
        self.noise_cols = DerivedSchema.from_metadata(self.metadata).noise_columns
        self.columns = ["seq_num", "time", "bin_id", "outlier_score", "is_outlier",
                        "recon_error", "structure", "radius_nm", "distance_nm", *self.motors,
                        *self.latent_cols, *self.noise_cols]
        self.df = pd.DataFrame(columns=self.columns)
        self.lock = threading.RLock()
        self._basis: tuple[np.ndarray, np.ndarray] | None = None  # (mean, 2 components)
        self._fit_n = 0

    # -- rows ---------------------------------------------------------------------------
    def read_all(self, node: Any) -> int:
        """Re-read the node's frames table (only the needed columns); returns new rows."""
        if TABLE_KEY not in node:
            return 0
        df = node[TABLE_KEY].read(columns=self.columns)
        return len(self.merge(df))

    def merge(self, rows: pd.DataFrame | Mapping[str, Sequence[Any]]) -> pd.DataFrame:
        """Add rows whose seq_num is new; returns the new rows (sorted by seq_num)."""
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(dict(rows))
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ValueError(f"derived rows of {self.key!r} lack columns {missing}")
        df = df[self.columns]
        with self.lock:
            known = set(self.df["seq_num"].astype("int64").tolist()) if len(self.df) else set()
            new = df[~df["seq_num"].astype("int64").isin(known)]
            new = new.drop_duplicates("seq_num").sort_values("seq_num")
            if len(new):
                self.df = (new if not len(self.df) else pd.concat([self.df, new]))
                self.df = self.df.sort_values("seq_num").reset_index(drop=True)
            return new.reset_index(drop=True)

    @property
    def n_frames(self) -> int:
        return len(self.df)

    # -- latent map ----------------------------------------------------------------------
    def _latent(self, df: pd.DataFrame) -> np.ndarray:
        if not self.latent_cols:
            return np.zeros((len(df), 0))
        return df[self.latent_cols].to_numpy(np.float64)

    def _fit(self) -> None:
        z = self._latent(self.df)
        z = z[np.isfinite(z).all(axis=1)]
        if len(z) < 3 or z.shape[1] < 2:
            self._basis = None
            return
        mean = z.mean(axis=0)
        _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
        comps = vt[:2]
        # a sign convention, so a refit does not mirror the map
        biggest = comps[np.arange(2), np.abs(comps).argmax(axis=1)]
        comps = comps * np.where(biggest < 0, -1, 1)[:, None]
        self._basis = (mean, comps)
        self._fit_n = len(self.df)

    def needs_refit(self) -> bool:
        """Whether the basis is missing or the run outgrew it (the page then reloads)."""
        with self.lock:
            n = len(self.df)
            return (self._basis is None and n >= 3) or (
                self._basis is not None and n >= self.config.refit_factor * max(self._fit_n, 1))

    def project(self, df: pd.DataFrame) -> np.ndarray:
        """PCA coordinates (n, 2) of rows on the current basis (NaN before a fit)."""
        if self._basis is None:
            return np.full((len(df), 2), np.nan)
        mean, comps = self._basis
        return (self._latent(df) - mean) @ comps.T

    # -- payloads ------------------------------------------------------------------------
    def _noise_labels(self, df: pd.DataFrame) -> list[str]:
        if not self.noise_cols or not len(df):
            return [""] * len(df)
        p = df[self.noise_cols].to_numpy(np.float64) >= self.config.noise_threshold
        return [", ".join(k for k, on in zip(self.noise_kinds, row, strict=True) if on)
                for row in p]

    def _why(self, df: pd.DataFrame) -> list[str]:
        thr = float((self.metadata.get("binner") or {}).get("recon_threshold") or np.inf)
        out = []
        for err, score, flag in zip(df["recon_error"].to_numpy(np.float64),
                                    df["outlier_score"].to_numpy(np.float64),
                                    df["is_outlier"].to_numpy(bool), strict=True):
            if not flag:
                out.append("")
            elif np.isfinite(thr) and err / thr >= 0.999 * score:
                out.append("reconstruction")  # the model cannot reproduce the frame
            else:
                out.append("unknown identity")  # far from every structure the model knows
        return out

    def points(self, df: pd.DataFrame) -> dict[str, list[Any]]:
        """Column lists for plotted points (JSON-ready; NaN -> None)."""
        pc = self.project(df)
        motor = self.motors[0] if self.motors else None
        x = df[motor].to_numpy(np.float64) if motor else df["seq_num"].to_numpy(np.float64)

        def floats(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else round(float(v), 5) for v in a]

        return {
            "seq_num": df["seq_num"].astype("int64").tolist(),
            "x": floats(x),
            "bin_id": df["bin_id"].astype("int64").tolist(),
            "outlier_score": floats(df["outlier_score"].to_numpy(np.float64)),
            "is_outlier": df["is_outlier"].astype(bool).tolist(),
            "why": self._why(df),
            "noise": self._noise_labels(df),
            "pc1": floats(pc[:, 0]),
            "pc2": floats(pc[:, 1]),
        }

    def sample(self) -> tuple[pd.DataFrame, str]:
        """Rows to draw: all when few, else every outlier plus every k-th other frame."""
        df = self.df
        n, cap = len(df), self.config.max_points
        if n <= cap:
            return df, f"all {n} frames drawn"
        out = df["is_outlier"].astype(bool).to_numpy()
        k = int(np.ceil((n - out.sum()) / max(cap - out.sum(), 1)))
        keep = out | (np.arange(n) % k == 0)
        return df[keep], (f"{int(keep.sum())} of {n} frames drawn: all {int(out.sum())} "
                          f"outliers and every {k}-th other frame (bins and counts use all)")

    def bins(self) -> list[dict[str, Any]]:
        """Per bin (the ``max_bins`` most populated): count, most common structure, median
        radius/distance, medoid seq_num."""
        rows = []
        df = self.df
        if not len(df):
            return rows
        counts = df["bin_id"].value_counts()
        top = sorted(counts.index[np.lexsort((counts.index.to_numpy(), -counts.to_numpy()))]
                     [: self.config.max_bins].tolist())
        df = df[df["bin_id"].isin(top)]
        for b, grp in df.groupby("bin_id", sort=True):
            z = self._latent(grp)
            ok = np.isfinite(z).all(axis=1)
            medoid = int(grp["seq_num"].iloc[0])
            if ok.any():
                zc = z[ok]
                medoid = int(grp["seq_num"].to_numpy()[ok][
                    np.argmin(((zc - zc.mean(axis=0)) ** 2).sum(axis=1))])
            structure = grp["structure"].astype(str)
            structure = structure[structure != ""]

            def median(col: str, g: pd.DataFrame = grp) -> float | None:
                v = g[col].to_numpy(np.float64)
                v = v[np.isfinite(v)]
                return round(float(np.median(v)), 3) if len(v) else None

            rows.append({
                "bin_id": int(b), "count": len(grp),
                "structure": structure.mode().iloc[0] if len(structure) else "",
                "radius_nm": median("radius_nm"), "distance_nm": median("distance_nm"),
                "medoid_seq": medoid,
                "x_range": ([round(float(grp[self.motors[0]].min()), 3),
                             round(float(grp[self.motors[0]].max()), 3)]
                            if self.motors else None),
            })
        return rows

    def outliers(self, limit: int = 50) -> list[dict[str, Any]]:
        df = self.df[self.df["is_outlier"].astype(bool)]
        df = df.sort_values("outlier_score", ascending=False).head(limit)
        pts = self.points(df)
        return [{"seq_num": s, "x": x, "bin_id": b, "outlier_score": sc, "why": w, "noise": nz,
                 "recon_error": round(float(e), 5)}
                for s, x, b, sc, w, nz, e in zip(pts["seq_num"], pts["x"], pts["bin_id"],
                                                  pts["outlier_score"], pts["why"], pts["noise"],
                                                  df["recon_error"], strict=True)]

    def noise(self) -> list[dict[str, Any]]:
        if not self.noise_cols or not len(self.df):
            return [{"kind": k, "frames": 0} for k in self.noise_kinds]
        p = self.df[self.noise_cols].to_numpy(np.float64) >= self.config.noise_threshold
        return [{"kind": k, "frames": int(p[:, j].sum())}
                for j, k in enumerate(self.noise_kinds)]

    def summary(self) -> dict[str, Any]:
        """Everything but the points: bins, outliers, noise, counts."""
        n_bins = int(self.df["bin_id"].nunique()) if len(self.df) else 0
        n_out = int(self.df["is_outlier"].astype(bool).sum()) if len(self.df) else 0
        return {"n_frames": self.n_frames, "n_bins": n_bins, "n_outliers": n_out,
                "bins": self.bins(), "outliers": self.outliers(), "noise": self.noise()}

    def full(self, embedding: str = "pca") -> dict[str, Any]:
        """The whole payload for a page (re)load; refits the PCA basis."""
        with self.lock:
            self._fit()
            shown, sampling = self.sample()
            payload = {
                "key": self.key,
                "metadata": run_summary(self.key, self.metadata),
                "motor": self.motors[0] if self.motors else "seq_num",
                "identity_dim": self.identity_dim,
                "noise_kinds": self.noise_kinds,
                "sampling": sampling,
                "embedding": "pca",
                "points": self.points(shown),
                **self.summary(),
            }
            if embedding == "umap":
                payload.update(self._umap(shown))
            return payload

    def _umap(self, shown: pd.DataFrame) -> dict[str, Any]:
        if not umap_available():
            return {"embedding_error": "UMAP is not installed (pip install umap-learn)"}
        import umap

        z = self._latent(shown)
        if len(z) < 5:
            return {"embedding_error": f"UMAP needs at least 5 frames, have {len(z)}"}
        xy = umap.UMAP(n_components=2, random_state=0).fit_transform(np.nan_to_num(z))
        return {"embedding": "umap",
                "points": {**self.points(shown), "pc1": xy[:, 0].round(5).tolist(),
                           "pc2": xy[:, 1].round(5).tolist()}}

    def delta(self, new: pd.DataFrame) -> dict[str, Any]:
        """Payload for rows just merged: their points plus the updated summary."""
        with self.lock:
            return {"key": self.key, "points": self.points(new), **self.summary()}
