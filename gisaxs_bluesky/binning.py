"""Online binning of identity latents with outlier scores; state saves so bins persist."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtri

from .config import BinnerConfig

__all__ = ["BinAssignment", "OnlineBinner"]

STATE_FORMAT = "gisaxs-bluesky-binner/1"


@dataclass(frozen=True)
class BinAssignment:
    """Per-frame result of :meth:`OnlineBinner.assign`."""

    bin_id: np.ndarray  # (N,) int64, stable ids; -1 for frames the model cannot reconstruct
    outlier_score: np.ndarray  # (N,) float32, > 1 means outlier
    is_outlier: np.ndarray  # (N,) bool
    distance: np.ndarray  # (N,) float32 distance to the bin centre, in spread units
    new_bin: np.ndarray  # (N,) bool, the frame opened its bin


class OnlineBinner:
    """Each identity latent joins the nearest bin or opens a new one.

    ``spread`` is the calibrated within-identity scatter of latents (frames of one identity
    under every noise kind and dose) and ``recon_threshold`` the reconstruction error that
    clean simulated frames rarely exceed. ``reference`` holds centres of the latents of
    simulated frames (what the model knows) and ``reference_threshold`` the distance to the
    nearest centre that they rarely exceed. :meth:`calibrate` sets all from labelled data.

    Outlier score = max(recon_error / recon_threshold, distance to the nearest reference
    centre / reference_threshold): > 1 means the frame fits nothing the model knows. A frame
    that opens a new bin is not an outlier for that alone: a new region of the sample is news,
    not an anomaly.
    """

    def __init__(
        self,
        config: BinnerConfig | None = None,
        *,
        spread: float = 1.0,
        recon_threshold: float = float("inf"),
        model_sha256: str = "",
        reference: np.ndarray | None = None,
        reference_threshold: float = float("inf"),
    ) -> None:
        self.config = config or BinnerConfig()
        if not np.isfinite(spread) or spread <= 0:
            raise ValueError(f"spread={spread} must be a finite number > 0")
        if not recon_threshold > 0:
            raise ValueError(f"recon_threshold={recon_threshold} must be > 0")
        self.spread = float(spread)
        self.recon_threshold = float(recon_threshold)
        self.model_sha256 = model_sha256
        self.reference = (np.zeros((0, 0)) if reference is None
                          else np.asarray(reference, dtype=np.float64))
        self.reference_threshold = float(reference_threshold)
        self.centroids = np.zeros((0, 0), dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int64)
        self.next_id = 0

    # ------------------------------------------------------------------ binning
    @property
    def n_bins(self) -> int:
        return len(self.ids)

    def settings(self) -> dict:
        """What the derived data records about how it was binned."""
        return {
            **self.config.to_dict(),
            "spread": self.spread,
            "recon_threshold": self.recon_threshold,
            "reference_threshold": self.reference_threshold,
            "n_reference": len(self.reference),
            "model_sha256": self.model_sha256,
        }

    def summary(self) -> dict:
        return {"ids": self.ids.tolist(), "counts": self.counts.tolist()}

    def assign(self, identity_latent: np.ndarray, recon_error: np.ndarray) -> BinAssignment:
        """Bin N frames in order; updates centroids as frames join."""
        z = np.asarray(identity_latent, dtype=np.float64)
        err = np.asarray(recon_error, dtype=np.float64).reshape(-1)
        if z.ndim != 2:
            raise ValueError(f"identity_latent must be (N, D), got shape {z.shape}")
        if len(err) != len(z):
            raise ValueError(f"recon_error has {len(err)} rows, identity_latent has {len(z)}")
        if self.n_bins and z.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"identity_latent dimension {z.shape[1]} does not match the binner's "
                f"{self.centroids.shape[1]} (a different model?)"
            )
        n = len(z)
        bin_id = np.full(n, -1, dtype=np.int64)
        score = np.zeros(n, dtype=np.float32)
        dist_out = np.zeros(n, dtype=np.float32)
        new_bin = np.zeros(n, dtype=bool)
        radius = self.config.join_radius
        latent_score = self.reference_score(z)
        for i in range(n):
            finite = np.isfinite(z[i]).all() and np.isfinite(err[i])
            if not finite:
                score[i] = np.inf
                dist_out[i] = np.inf
                continue
            recon_score = err[i] / self.recon_threshold
            score[i] = max(recon_score, latent_score[i])
            if recon_score > 1:
                # the model cannot explain this frame: it fits no bin, and must not move one
                dist_out[i] = self._nearest(z[i])[1]
                continue
            k, d = self._nearest(z[i])
            if k < 0 or d > radius:
                k = self._open(z[i])
                new_bin[i] = True
                d = 0.0
            else:
                self._join(k, z[i])
            dist_out[i] = d
            bin_id[i] = self.ids[k]
        return BinAssignment(bin_id, score, score > 1, dist_out, new_bin)

    def reference_score(self, z: np.ndarray) -> np.ndarray:
        """Distance to the nearest reference centre over its calibrated threshold (0 if none)."""
        if not len(self.reference) or not np.isfinite(self.reference_threshold):
            return np.zeros(len(z))
        if z.shape[1] != self.reference.shape[1]:
            raise ValueError(
                f"identity_latent dimension {z.shape[1]} does not match the reference "
                f"dimension {self.reference.shape[1]} (a different model?)"
            )
        d2 = np.nan_to_num(_sq_distances(z, self.reference), nan=np.inf)
        return np.sqrt(d2.min(axis=1)) / self.reference_threshold

    def _nearest(self, z: np.ndarray) -> tuple[int, float]:
        if not self.n_bins:
            return -1, float("inf")
        d = np.sqrt(((self.centroids - z) ** 2).sum(axis=1)) / self.spread
        k = int(d.argmin())
        return k, float(d[k])

    def _open(self, z: np.ndarray) -> int:
        if not self.n_bins:
            self.centroids = z[None].copy()
        else:
            self.centroids = np.vstack([self.centroids, z[None]])
        self.counts = np.append(self.counts, 1)
        self.ids = np.append(self.ids, self.next_id)
        self.next_id += 1
        return self.n_bins - 1

    def _join(self, k: int, z: np.ndarray) -> None:
        self.counts[k] += 1
        m = self.config.centroid_momentum
        rate = m if m > 0 else 1.0 / self.counts[k]
        self.centroids[k] += rate * (z - self.centroids[k])

    # -------------------------------------------------------------- calibration
    def calibrate(
        self,
        identity_latent: np.ndarray,
        identity_label: np.ndarray,
        recon_error: np.ndarray,
        *,
        clean_latent: np.ndarray | None = None,
        clean_recon_error: np.ndarray | None = None,
        clean_identity_label: np.ndarray | None = None,
        reference: bool = True,
    ) -> OnlineBinner:
        """Set spread from frames with known identity labels (under every kind of noise), and
        the outlier thresholds from clean frames (photon noise only) when given, else from the
        same frames: the quantiles then flag that fraction of clean simulated frames.
        ``reference=False`` leaves the reference centres and threshold as they are, for a
        caller that sets them next (:meth:`reference_cross_fitted`,
        :meth:`thresholds_from_held_out`)."""
        z = np.asarray(identity_latent, dtype=np.float64)
        labels = np.asarray(identity_label)
        if clean_latent is not None and clean_recon_error is not None:
            z_ref = np.asarray(clean_latent, dtype=np.float64)
            err_ref = np.asarray(clean_recon_error, dtype=np.float64)
            labels_ref = (np.arange(len(z_ref)) if clean_identity_label is None
                          else np.asarray(clean_identity_label))
        else:
            z_ref, err_ref, labels_ref = z, np.asarray(recon_error, dtype=np.float64), labels
        distances = []
        for label in np.unique(labels):
            zi = z[labels == label]
            distances.append(np.sqrt(((zi - zi.mean(axis=0)) ** 2).sum(axis=1)))
        d = np.concatenate(distances)
        self.spread = float(max(np.quantile(d, self.config.spread_quantile), 1e-6))
        self.recon_threshold = float(max(np.quantile(err_ref, self.config.recon_quantile), 1e-6))
        if not reference:
            return self
        # reference centres from half of the identities, the threshold from the other half:
        # a scan brings samples the calibration never saw, and so must the held-out half
        rng = np.random.default_rng(0)
        identities = rng.permutation(np.unique(labels_ref))
        fit_ids = np.isin(labels_ref, identities[: len(identities) // 2])
        nearest = self._fit_reference(z_ref[fit_ids], z_ref[~fit_ids], rng)
        self.reference_threshold = float(
            max(np.quantile(nearest, self.config.reference_quantile), 1e-6)
        )
        return self

    def thresholds_from_held_out(self, fit_latent: np.ndarray, held_latent: np.ndarray,
                                 held_recon_error: np.ndarray) -> np.ndarray:
        """Reference centres from ``fit_latent``, the reconstruction and reference thresholds
        from frames held out of everything else (as live frames are): their quantiles, or
        those of a log-normal fit to them where that is higher (a few dozen held-out frames
        put the empirical 99 % quantile near their maximum, about the 95 % one). Returns the
        held-out frames' distances to the nearest centre (for :meth:`widen_to_joint_quantile`).
        """
        rng = np.random.default_rng(0)
        fit = np.asarray(fit_latent, dtype=np.float64)
        held = np.asarray(held_latent, dtype=np.float64)
        self.recon_threshold = _held_out_quantile(held_recon_error, self.config.recon_quantile)
        nearest = self._fit_reference(fit, held, rng)
        self.reference_threshold = _held_out_quantile(nearest, self.config.reference_quantile)
        return nearest

    def reference_cross_fitted(self, latent: np.ndarray, folds: int = 5) -> np.ndarray:
        """Reference centres (k-means) of every row of ``latent``, and the reference threshold
        the ``reference_quantile`` of each row's distance to centres fitted without it
        (``folds``-fold cross-fitting). Centres from only half of the frames (as
        :meth:`calibrate` splits labelled identities) leave gaps between them that the next
        ordinary frame of a beamtime falls into; a threshold from one half's distances rests
        on half as many values. Returns the cross-fitted distances, one per row."""
        z = np.asarray(latent, dtype=np.float64)
        if len(z) < 2 * folds:
            raise ValueError(f"cross-fitting {folds} folds needs >= {2 * folds} latents, "
                             f"got {len(z)}")
        rng = np.random.default_rng(0)
        fold = rng.permutation(len(z)) % folds
        nearest = np.empty(len(z))
        for j in range(folds):
            nearest[fold == j] = self._fit_reference(z[fold != j], z[fold == j], rng)
        self.reference = _kmeans(z, min(self.config.n_reference, len(z)), rng)
        self.reference_threshold = float(
            max(np.quantile(nearest, self.config.reference_quantile), 1e-6))
        return nearest

    def widen_to_joint_quantile(self, recon_error: np.ndarray, reference_distance: np.ndarray,
                                quantile: float) -> float:
        """Scale the reconstruction and reference thresholds by one factor >= 1 so that at
        most ``1 - quantile`` of these frames (the reconstruction error and the out-of-fit
        reference distance of each) score above 1 on either test. Each threshold alone flags
        ``1 - its quantile`` of them; a frame is an outlier when either flags it, so without
        this the two rates add up where the tests disagree. Returns the factor."""
        err = np.asarray(recon_error, dtype=np.float64).reshape(-1)
        dist = np.asarray(reference_distance, dtype=np.float64).reshape(-1)
        if len(err) != len(dist) or not len(err):
            raise ValueError(f"{len(err)} reconstruction errors and {len(dist)} reference "
                             "distances: one of each per frame, at least one frame")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile={quantile} must lie in (0, 1]")
        score = np.maximum(err / self.recon_threshold, dist / self.reference_threshold)
        factor = float(max(np.quantile(score, quantile), 1.0))
        self.recon_threshold *= factor
        self.reference_threshold *= factor
        return factor

    def _fit_reference(self, fit: np.ndarray, held: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
        """Reference centres (k-means) of ``fit``; the distances of ``held`` to the nearest."""
        self.reference = _kmeans(fit, min(self.config.n_reference, len(fit)), rng)
        return np.sqrt(_sq_distances(held, self.reference).min(axis=1))

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "spread": self.spread,
            "recon_threshold": self.recon_threshold,
            "model_sha256": self.model_sha256,
            "reference": self.reference.tolist(),
            "reference_threshold": self.reference_threshold,
            "centroids": self.centroids.tolist(),
            "counts": self.counts.tolist(),
            "ids": self.ids.tolist(),
            "next_id": self.next_id,
        }

    @classmethod
    def from_state(cls, state: dict) -> OnlineBinner:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"binner state format {state.get('format')!r} is not {STATE_FORMAT!r}")
        binner = cls(
            BinnerConfig(**state["config"]),
            spread=state["spread"],
            recon_threshold=state["recon_threshold"],
            model_sha256=state.get("model_sha256", ""),
            reference=np.asarray(state["reference"]) if state.get("reference") else None,
            reference_threshold=state.get("reference_threshold", float("inf")),
        )
        centroids = np.asarray(state["centroids"], dtype=np.float64)
        binner.centroids = centroids.reshape(len(state["ids"]), -1) if len(state["ids"]) else (
            np.zeros((0, 0), dtype=np.float64)
        )
        binner.counts = np.asarray(state["counts"], dtype=np.int64)
        binner.ids = np.asarray(state["ids"], dtype=np.int64)
        binner.next_id = int(state["next_id"])
        return binner

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> OnlineBinner:
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"binner state {path} cannot be read: {exc}") from exc
        return cls.from_state(state)

    def copy(self) -> OnlineBinner:
        return OnlineBinner.from_state(self.state_dict())


def _held_out_quantile(values: np.ndarray, q: float) -> float:
    """max(empirical q-quantile, log-normal q-quantile) of positive values."""
    v = np.maximum(np.asarray(values, dtype=np.float64).reshape(-1), 1e-12)
    empirical = float(np.quantile(v, q))
    if len(v) < 3:
        return max(empirical, 1e-6)
    log_v = np.log(v)
    lognormal = float(np.exp(log_v.mean() + ndtri(q) * log_v.std(ddof=1)))
    return max(empirical, lognormal, 1e-6)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _kmeans(z: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 25) -> np.ndarray:
    """Plain k-means (k-means++ start) for the reference centres."""
    centres = [z[rng.integers(len(z))]]
    for _ in range(1, k):
        d2 = _sq_distances(z, np.array(centres)).min(axis=1)
        pick = rng.choice(len(z), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(z))
        centres.append(z[pick])
    centres = np.array(centres)
    for _ in range(iterations):
        labels = _sq_distances(z, centres).argmin(axis=1)
        for j in range(k):
            members = z[labels == j]
            if len(members):
                centres[j] = members.mean(axis=0)
    return centres
