"""bluesky-adaptive 1.0 ``Optimizer`` around :func:`suggest_points`, plus its evaluation function.

Use with ``bluesky_adaptive.plans.optimize`` (each iteration: ``suggest`` -> ``default_acquire``
list scan -> :class:`LiveEvaluation` -> ``ingest``) or the queue-server runner; the first
suggestions are the coarse grid, later ones come from the DAE results ingested so far.
``should_stop`` (``SupportsStoppingCriteria``) ends ``optimize(..., iterations=None)`` when the
point budget is spent or nothing is left to suggest.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .results import ScanResults
from .suggest import SuggestConfig, Suggestion, check_limits, suggest_points

__all__ = ["DAEOptimizer", "LiveEvaluation", "ID_KEY"]

logger = logging.getLogger(__name__)

ID_KEY = "_id"
OUTCOME_KEYS = ("bin_id", "outlier_score", "is_outlier", "recon_error")


class DAEOptimizer:
    """Suggests coarse-grid points, then DAE-driven refinements; ``ingest`` takes outcomes.

    Suggestions are ``{"_id": str, <motor>: value}`` (only motors: ``default_acquire`` routes
    on every key); :meth:`exposure_factor` gives a suggestion's exposure multiplier.
    ``remeasure_noise`` points are suggested only with ``apply_exposure=True`` (an acquisition
    plan that applies :meth:`exposure_factor` and reports ``exposure_factor`` in the outcome),
    since ``default_acquire`` would repeat the same exposure. Outcomes need
    ``_id`` (of a suggestion, whose position is then known) or the motor positions, plus
    ``bin_id``, ``outlier_score``, ``is_outlier`` and optionally ``recon_error``,
    ``noise_prob_<kind>``.
    """

    def __init__(self, config: SuggestConfig, coarse: Mapping[str, Sequence[float]], *,
                 budget: int, noise_kinds: Sequence[str] = (),
                 apply_exposure: bool = False) -> None:
        self.config = config
        self.motors = tuple(config.limits)
        if set(coarse) != set(self.motors):
            raise ValueError(f"coarse names {sorted(coarse)}, limits name {sorted(self.motors)}")
        n = {len(v) for v in coarse.values()}
        if len(n) != 1:
            raise ValueError(f"coarse positions differ in length: {n}")
        self.coarse = [{m: float(coarse[m][i]) for m in self.motors} for i in range(n.pop())]
        for p in self.coarse:
            check_limits(p, config.limits)
        if budget < 1:
            raise ValueError(f"budget={budget} must be >= 1")
        self.budget = int(budget)
        self.noise_kinds = tuple(noise_kinds)
        self.apply_exposure = bool(apply_exposure)
        self.rows: list[dict[str, Any]] = []
        self.suggested: dict[str, dict[str, Any]] = {}
        self.reasons: dict[str, Suggestion | None] = {}
        self.pending: set[str] = set()
        self.failed: set[str] = set()
        self._ids = itertools.count()
        self._next_coarse = 0

    # ---------------------------------------------------------------- protocol
    @property
    def n_suggested(self) -> int:
        return len(self.suggested) - len(self.failed)

    def results(self) -> ScanResults:
        """Everything ingested so far, as :class:`ScanResults`."""
        return ScanResults.from_rows(self.rows, self.motors, self.noise_kinds)

    def _register(self, position: Mapping[str, float], s: Suggestion | None) -> dict[str, Any]:
        _id = f"pt{next(self._ids):04d}"
        d = {ID_KEY: _id, **{m: float(position[m]) for m in self.motors}}
        self.suggested[_id] = d
        self.reasons[_id] = s
        self.pending.add(_id)
        return dict(d)

    def exposure_factor(self, _id: str) -> float:
        """Exposure multiplier of suggestion ``_id`` (1.0 unless a noise re-measurement)."""
        s = self.reasons.get(str(_id))
        return float(s.exposure_factor) if s is not None else 1.0

    def _suggest_core(self, n: int, exclude: list) -> list[Suggestion]:
        if not self.rows:
            return []
        out = suggest_points(self.results(), self.config, max_points=None, exclude=exclude)
        if not self.apply_exposure:
            out = [s for s in out if s.reason != "remeasure_noise"]
        return out[:n]

    def suggest(self, num_points: int | None = None) -> list[dict[str, Any]]:
        """Up to ``num_points`` (default 1) new points within limits and budget, with ``_id``."""
        n = 1 if num_points is None else int(num_points)
        if n < 0:
            raise ValueError(f"num_points={num_points} must be >= 0")
        n = min(n, self.budget - self.n_suggested)
        out: list[dict[str, Any]] = []
        while len(out) < n and self._next_coarse < len(self.coarse):
            out.append(self._register(self.coarse[self._next_coarse], None))
            self._next_coarse += 1
        if len(out) < n:
            exclude = [self.suggested[i] for i in self.pending] + out
            for s in self._suggest_core(n - len(out), exclude):
                out.append(self._register(s.position, s))
        if not out:
            logger.info("nothing to suggest (budget left %d)", self.budget - self.n_suggested)
        return out

    def register_suggestions(self, suggestions: Sequence[Mapping]) -> list[dict[str, Any]]:
        """Give manual points (motor positions) ``_id``s so ``ingest`` can match them."""
        out = []
        for s in suggestions:
            for m in self.motors:
                if m not in s:
                    raise ValueError(f"manual suggestion lacks motor {m!r}: {dict(s)}")
            out.append(self._register(s, None))
        return out

    def ingest(self, points: Sequence[Mapping]) -> None:
        """Add measured outcomes (matched to suggestions by ``_id``, or carrying positions)."""
        for p in points:
            _id = p.get(ID_KEY)
            base = self.suggested.get(str(_id), {}) if _id is not None else {}
            row = {**base, **dict(p)}
            for key in (*self.motors, *OUTCOME_KEYS[:3]):
                if key not in row:
                    raise ValueError(f"ingested point {_id!r} lacks {key!r}: {dict(p)}")
            row.setdefault("seq_num", len(self.rows) + 1)
            self.rows.append(row)
            self.pending.discard(str(_id))

    def register_failures(self, suggestions: Sequence[Mapping]) -> None:
        """Failed acquisitions give their budget back."""
        for s in suggestions:
            _id = str(s.get(ID_KEY))
            if _id in self.pending:
                self.pending.discard(_id)
                self.failed.add(_id)

    def should_stop(self) -> tuple[bool, str | None]:
        """Stop when the budget is spent or no further point would be suggested."""
        if self.n_suggested >= self.budget:
            return True, f"budget of {self.budget} points spent"
        if self._next_coarse < len(self.coarse):
            return False, None
        exclude = [self.suggested[i] for i in self.pending]
        if not self._suggest_core(1, exclude):
            return True, "no further suggestions"
        return False, None

    def get_best_points(self) -> list[tuple[Any, Mapping, Mapping]]:
        """The most anomalous measured point: (``_id``, position, outcomes)."""
        if not self.rows:
            return []
        row = max(self.rows, key=lambda r: float(np.nan_to_num(r["outlier_score"], nan=-1)))
        pos = {m: row[m] for m in self.motors}
        return [(row.get(ID_KEY), pos, {k: row[k] for k in OUTCOME_KEYS if k in row})]


class LiveEvaluation:
    """``EvaluationFunction``: outcomes of an acquisition run from a live DAE results source.

    Frames are matched to suggestions through the run's ``blop_acquisition_order`` start
    metadata (``default_acquire``) or, if absent, the order of ``suggestions``.
    """

    def __init__(self, live: Any, timeout: float = 120.0) -> None:
        self.live = live
        self.timeout = timeout
        self.__name__ = "LiveEvaluation"

    def __call__(self, uid: str, suggestions: Sequence[Mapping]) -> list[dict[str, Any]]:
        if not self.live.wait(self.timeout):
            raise TimeoutError(f"live results not complete after timeout={self.timeout} s")
        try:
            order = list(self.live.start_doc(uid).get("blop_acquisition_order") or [])
        except (KeyError, AttributeError):
            order = []
        if not order:
            order = [s[ID_KEY] for s in suggestions]
        res = self.live.results(uid)
        by_seq = {int(s): i for i, s in enumerate(res.seq_num)}
        out = []
        for k, _id in enumerate(order):
            i = by_seq.get(k + 1)
            if i is None:
                raise ValueError(f"run {uid}: no DAE result for seq_num={k + 1} (_id={_id!r})")
            row = {ID_KEY: _id, "bin_id": int(res.bin_id[i]),
                   "outlier_score": float(res.outlier_score[i]),
                   "is_outlier": int(res.is_outlier[i]),
                   "recon_error": float(res.recon_error[i])}
            for j, kind in enumerate(res.noise_kinds):
                row[f"noise_prob_{kind}"] = float(res.noise_prob[i, j])
            out.append(row)
        return out
