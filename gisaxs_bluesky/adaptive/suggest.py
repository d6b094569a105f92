"""Pure suggestion logic: per-frame DAE results + motor positions -> next points to measure.

Three kinds of suggestion, each with a ``reason``:

``refine_outlier``
    Around a frame flagged ``is_outlier``: points at ``refine_fractions`` (default 1/2 and 1/4)
    of the distance to each measured neighbour along every motor axis. Repeated rounds halve
    the spacing again, so a defect seen in one frame gets sampled densely.
``bin_boundary``
    Midpoint of two neighbouring measured points whose (non-negative) ``bin_id`` differ: a
    structural boundary; repeated rounds bisect it down to ``min_step``.
``remeasure_noise``
    Same position, longer exposure (``exposure_factor`` times the exposure the frame had) for
    a noise-dominated frame. Rule: the frame is *not* an outlier, its outlier score is at least
    ``noise_score_min`` (the model places it only ambiguously: recon error or latent distance
    close to the outlier threshold), and either the probability of a counting-noise kind
    (``noise_kinds``, default poisson/readout: what a longer exposure reduces) is at least
    ``noise_prob_threshold``, or ``recon_error`` is at least ``noise_recon_min`` (when set).
    A position is re-measured only while its best exposure is below ``max_exposure_factor``.

Positions are N-D (one array per motor): neighbours are taken along each motor axis among
points that share the other motors' coordinates (rows/columns of a grid); 1-D scans are the
plain case. Candidates outside ``limits`` are clipped or dropped (logged), candidates closer
than ``min_step`` to a measured, pending or already chosen point are merged away, frames with a
NaN score or position are ignored with a logged warning, and empty input gives ``[]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .results import ScanResults

__all__ = [
    "REASONS",
    "Reason",
    "SuggestConfig",
    "Suggestion",
    "suggest_points",
    "check_limits",
]

logger = logging.getLogger(__name__)

Reason = Literal["refine_outlier", "bin_boundary", "remeasure_noise"]
REASONS: tuple[str, ...] = ("refine_outlier", "bin_boundary", "remeasure_noise")


@dataclass(frozen=True)
class Suggestion:
    """One point to measure next, why, which frames caused it, and how urgent it is."""

    position: Mapping[str, float]
    reason: Reason
    source_seq_nums: tuple[int, ...]
    priority: float
    exposure_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"reason={self.reason!r} is not one of {REASONS}")
        if not (math.isfinite(self.exposure_factor) and self.exposure_factor > 0):
            raise ValueError(f"exposure_factor={self.exposure_factor} must be finite and > 0")
        for motor, value in self.position.items():
            if not math.isfinite(float(value)):
                raise ValueError(f"suggested {motor}={value} is not finite")
        object.__setattr__(self, "position", {k: float(v) for k, v in self.position.items()})
        object.__setattr__(self, "source_seq_nums", tuple(int(s) for s in self.source_seq_nums))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for metadata, tables and bluesky-adaptive suggestions)."""
        return {
            "position": dict(self.position),
            "reason": self.reason,
            "source_seq_nums": list(self.source_seq_nums),
            "priority": float(self.priority),
            "exposure_factor": float(self.exposure_factor),
        }


@dataclass(frozen=True)
class SuggestConfig:
    """Knobs of :func:`suggest_points`; ``limits`` maps motor -> (low, high), inclusive."""

    limits: Mapping[str, tuple[float, float]]
    min_step: float | Mapping[str, float] = 0.05
    refine_fractions: tuple[float, ...] = (0.5, 0.25)
    boundaries: bool = True
    noise_kinds: tuple[str, ...] = ("poisson", "readout")
    noise_prob_threshold: float = 0.9
    noise_score_min: float = 0.6
    noise_recon_min: float | None = None
    exposure_factor: float = 4.0
    max_exposure_factor: float = 16.0
    out_of_limits: Literal["clip", "drop"] = "drop"
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"refine_outlier": 1.0, "bin_boundary": 0.5,
                                 "remeasure_noise": 0.25}
    )
    max_score: float = 10.0

    def __post_init__(self) -> None:
        if not self.limits:
            raise ValueError("limits is empty: give (low, high) for every scanned motor")
        lim = {}
        for m, pair in self.limits.items():
            lo, hi = (float(v) for v in pair)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"limits[{m!r}]=({lo}, {hi}) must be finite with low < high")
            lim[str(m)] = (lo, hi)
        object.__setattr__(self, "limits", lim)
        steps = self.min_step if isinstance(self.min_step, Mapping) else {m: self.min_step
                                                                            for m in lim}
        for m in lim:
            s = float(steps.get(m, 0.0))
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"min_step[{m!r}]={s} must be finite and >= 0")
        object.__setattr__(self, "min_step", {m: float(steps.get(m, 0.0)) for m in lim})
        for f in self.refine_fractions:
            if not 0 < f < 1:
                raise ValueError(f"refine_fractions value {f} must be in (0, 1)")
        if self.out_of_limits not in ("clip", "drop"):
            raise ValueError(f"out_of_limits={self.out_of_limits!r} must be 'clip' or 'drop'")
        if not self.exposure_factor > 1:
            raise ValueError(f"exposure_factor={self.exposure_factor} must be > 1")
        for r in self.weights:
            if r not in REASONS:
                raise ValueError(f"weights key {r!r} is not one of {REASONS}")

    def step(self, motor: str) -> float:
        return float(self.min_step[motor])  # type: ignore[index]


def check_limits(position: Mapping[str, float], limits: Mapping[str, tuple[float, float]]) -> None:
    """Raise ValueError naming the motor and value if ``position`` is outside ``limits``."""
    for m, (lo, hi) in limits.items():
        if m in position and not lo <= float(position[m]) <= hi:
            raise ValueError(f"suggested {m}={float(position[m])} outside limits {lo}..{hi}")


# ------------------------------------------------------------------------------------ helpers
@dataclass
class _Point:
    """A measured position, represented by its most reliable frame (highest exposure, last)."""

    coords: tuple[float, ...]
    seq_nums: list[int]
    rep: int  # index of the representative frame
    exposure: float


def _unique_points(res: ScanResults, keep: np.ndarray) -> list[_Point]:
    motors = res.motors
    pts: dict[tuple[float, ...], _Point] = {}
    order = np.flatnonzero(keep)
    for i in order:
        coords = tuple(float(res.positions[m][i]) for m in motors)
        key = tuple(round(c, 9) for c in coords)
        p = pts.get(key)
        if p is None:
            pts[key] = _Point(coords, [int(res.seq_num[i])], int(i), float(res.exposure[i]))
        else:
            p.seq_nums.append(int(res.seq_num[i]))
            if res.exposure[i] >= p.exposure:
                p.rep, p.exposure = int(i), float(res.exposure[i])
    return list(pts.values())


def _lines(points: list[_Point], axis: int) -> list[list[_Point]]:
    """Points grouped by their other coordinates, each group sorted along ``axis``."""
    groups: dict[tuple[float, ...], list[_Point]] = {}
    for p in points:
        other = tuple(round(c, 9) for j, c in enumerate(p.coords) if j != axis)
        groups.setdefault(other, []).append(p)
    return [sorted(g, key=lambda p: p.coords[axis]) for g in groups.values()]


def _finite_mask(res: ScanResults) -> np.ndarray:
    keep = np.isfinite(res.outlier_score)
    for m in res.motors:
        keep &= np.isfinite(res.positions[m])
    bad = np.flatnonzero(~keep)
    if len(bad):
        logger.warning(
            "ignoring %d frame(s) with NaN outlier_score or position (seq_nums %s)",
            len(bad), res.seq_num[bad[:20]].tolist(),
        )
    return keep


# ------------------------------------------------------------------------------- suggestions
def suggest_points(
    results: ScanResults,
    config: SuggestConfig,
    *,
    max_points: int | None = None,
    exclude: Iterable[Mapping[str, float]] = (),
) -> list[Suggestion]:
    """Suggested next points, highest priority first (at most ``max_points``).

    ``exclude`` holds positions already queued (pending) that new suggestions must not repeat.
    Motors of ``results`` without limits in ``config`` raise ValueError.
    """
    if max_points is not None and max_points < 0:
        raise ValueError(f"max_points={max_points} must be >= 0")
    motors = results.motors
    for m in motors:
        if m not in config.limits:
            raise ValueError(f"motor {m!r} has no limits in config.limits {dict(config.limits)}")
    if len(results) == 0:
        logger.warning("no measured frames: nothing to suggest (empty results)")
        return []
    if max_points == 0:
        return []
    keep = _finite_mask(results)
    if not keep.any():
        logger.warning("no frame with a finite outlier_score and position: nothing to suggest")
        return []
    points = _unique_points(results, keep)
    cands: list[Suggestion] = []
    w = {"refine_outlier": 1.0, "bin_boundary": 0.5, "remeasure_noise": 0.25, **config.weights}

    # gaps along every axis, for normalising boundary priorities
    for axis, motor in enumerate(motors):
        lines = _lines(points, axis)
        gaps = [b.coords[axis] - a.coords[axis] for ln in lines for a, b in zip(ln, ln[1:])]
        typical = float(np.max(gaps)) if gaps else 1.0
        step = config.step(motor)
        for ln in lines:
            for k, p in enumerate(ln):
                i = p.rep
                if not results.is_outlier[i]:
                    continue
                score = min(float(results.outlier_score[i]), config.max_score)
                for nb in (ln[k - 1] if k > 0 else None, ln[k + 1] if k + 1 < len(ln) else None):
                    if nb is None:
                        continue
                    d = nb.coords[axis] - p.coords[axis]
                    for rank, frac in enumerate(sorted(config.refine_fractions, reverse=True)):
                        if abs(d * frac) < step:
                            continue
                        c = list(p.coords)
                        c[axis] += d * frac
                        cands.append(Suggestion(
                            dict(zip(motors, c)), "refine_outlier", tuple(p.seq_nums),
                            w["refine_outlier"] * score * (0.9 ** rank),
                        ))
            if not config.boundaries:
                continue
            for a, b in zip(ln, ln[1:]):
                ba, bb = int(results.bin_id[a.rep]), int(results.bin_id[b.rep])
                gap = b.coords[axis] - a.coords[axis]
                if ba < 0 or bb < 0 or ba == bb or gap / 2 < step:
                    continue
                c = list(a.coords)
                c[axis] = a.coords[axis] + gap / 2
                cands.append(Suggestion(
                    dict(zip(motors, c)), "bin_boundary", (*a.seq_nums, *b.seq_nums),
                    w["bin_boundary"] * min(gap / typical, 1.0),
                ))

    # noise-dominated frames: same position, longer exposure
    kinds = [j for j, k in enumerate(results.noise_kinds) if k in config.noise_kinds]
    for p in points:
        i = p.rep
        if results.is_outlier[i] or results.outlier_score[i] < config.noise_score_min:
            continue
        probs = results.noise_prob[i, kinds] if kinds else np.zeros(0)
        noisy = bool(len(probs) and np.nanmax(np.append(probs, -1.0)) >= config.noise_prob_threshold)
        if config.noise_recon_min is not None and results.recon_error[i] >= config.noise_recon_min:
            noisy = True
        new_exp = p.exposure * config.exposure_factor
        if not noisy or new_exp > config.max_exposure_factor:
            continue
        cands.append(Suggestion(
            dict(zip(motors, p.coords)), "remeasure_noise", tuple(p.seq_nums),
            w["remeasure_noise"] * float(results.outlier_score[i]), new_exp,
        ))

    measured = [p.coords for p in points]
    pending = [tuple(float(e[m]) for m in motors) for e in exclude if all(m in e for m in motors)]
    return _select(cands, measured, pending, config, motors, max_points)


def _too_close(c: Sequence[float], others: Iterable[Sequence[float]], steps: Sequence[float]) -> bool:
    for o in others:
        if all(abs(a - b) < max(s, 1e-9) for a, b, s in zip(c, o, steps)):
            return True
    return False


def _select(
    cands: list[Suggestion],
    measured: list[tuple[float, ...]],
    pending: list[tuple[float, ...]],
    config: SuggestConfig,
    motors: tuple[str, ...],
    max_points: int | None,
) -> list[Suggestion]:
    steps = [config.step(m) for m in motors]
    chosen: list[Suggestion] = []
    chosen_coords: list[tuple[float, ...]] = []
    remeasured: set[tuple[float, ...]] = set()
    dropped = 0
    for s in sorted(cands, key=lambda s: -s.priority):
        pos = dict(s.position)
        outside = [(m, pos[m], *config.limits[m]) for m in motors
                   if not config.limits[m][0] <= pos[m] <= config.limits[m][1]]
        if outside:
            if config.out_of_limits == "drop":
                dropped += 1
                for m, x, lo, hi in outside:
                    logger.info("dropped %s suggestion: %s=%g outside limits %g..%g",
                                s.reason, m, x, lo, hi)
                continue
            for m, x, lo, hi in outside:
                logger.info("clipped %s suggestion: %s=%g to limits %g..%g", s.reason, m, x, lo, hi)
                pos[m] = min(max(x, lo), hi)
            s = Suggestion(pos, s.reason, s.source_seq_nums, s.priority, s.exposure_factor)
        c = tuple(pos[m] for m in motors)
        if s.reason == "remeasure_noise":
            key = tuple(round(v, 9) for v in c)
            if key in remeasured or _too_close(c, pending, steps):
                continue
            remeasured.add(key)
        elif _too_close(c, measured, steps) or _too_close(c, pending, steps) or _too_close(
            c, chosen_coords, steps
        ):
            continue
        chosen.append(s)
        chosen_coords.append(c)
        if max_points is not None and len(chosen) >= max_points:
            break
    if dropped:
        logger.info("%d suggestion(s) outside the motor limits were dropped", dropped)
    return chosen
