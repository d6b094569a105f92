"""In-scan adaptive plan: coarse grid, then points suggested from the live DAE results.

The live analysis (:class:`~gisaxs_bluesky.callbacks.dae_binning.DAEBinningCallback` through
:class:`~gisaxs_bluesky.adaptive.live.DerivedCallbackResults`, or the lighter
:class:`~gisaxs_bluesky.adaptive.live.LiveEncoder`) runs beside the RunEngine; between rounds
the plan waits for it (``bps.wait_for`` on a thread, the RunEngine loop stays free), reads the
results, asks the suggester, and measures. Everything happens in one Bluesky run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from .live import ResultsSource
from .results import ScanResults
from .suggest import SuggestConfig, Suggestion, check_limits, suggest_points
from .tiled_io import SuggestionWriter

__all__ = ["Suggester", "adaptive_scan"]

logger = logging.getLogger(__name__)

#: ``(results, max_points, exclude) -> suggestions``; a SuggestConfig is wrapped into one
Suggester = Callable[[ScanResults, int, Sequence[Mapping[str, float]]], list[Suggestion]]


def _as_suggester(suggester: SuggestConfig | Suggester) -> Suggester:
    if isinstance(suggester, SuggestConfig):
        cfg = suggester
        return lambda res, n, exclude: suggest_points(res, cfg, max_points=n, exclude=exclude)
    if not callable(suggester):
        raise ValueError(f"suggester must be a SuggestConfig or callable, got {suggester!r}")
    return suggester


def adaptive_scan(
    detectors: Sequence[Any],
    motor: Any,
    start: float,
    stop: float,
    num_coarse: int,
    *,
    suggester: SuggestConfig | Suggester,
    budget: int,
    limits: tuple[float, float] | None = None,
    callback: ResultsSource,
    batch_size: int = 4,
    exposure: Any = None,
    client: Any = None,
    wait_timeout: float = 120.0,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Measure ``num_coarse`` grid points, then suggested points until ``budget`` is spent.

    ``budget`` counts every frame, coarse ones included. Each round asks for at most
    ``batch_size`` points; the loop ends when the budget is spent or nothing is suggested, so the
    plan always terminates. ``limits`` (default: ``suggester.limits[motor.name]``, else the
    scan range) bound every move; a point outside raises ValueError before moving.
    ``exposure`` is a movable exposure-time multiplier used for ``remeasure_noise`` points
    (without one those suggestions are skipped). With ``client`` the suggestions are written to
    Tiled (``/gisaxs_derived/<run uid>-suggestions``). Returns the run uid.
    """
    name = motor.name
    if int(num_coarse) < 2:
        raise ValueError(f"num_coarse={num_coarse} must be >= 2")
    if int(budget) < int(num_coarse):
        raise ValueError(f"budget={budget} must be >= num_coarse={num_coarse}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if limits is None:
        if isinstance(suggester, SuggestConfig) and name in suggester.limits:
            limits = suggester.limits[name]
        else:
            limits = (min(start, stop), max(start, stop))
    lo, hi = float(limits[0]), float(limits[1])
    if not lo < hi:
        raise ValueError(f"limits for {name}=({lo}, {hi}) must have low < high")
    check_limits({name: start}, {name: (lo, hi)})
    check_limits({name: stop}, {name: (lo, hi)})
    suggest = _as_suggester(suggester)
    readables = [*detectors, motor] + ([exposure] if exposure is not None else [])
    coarse = np.linspace(float(start), float(stop), int(num_coarse))
    _md = {
        "plan_name": "adaptive_scan",
        "motors": [name],
        "num_points": int(budget),
        "plan_args": {"start": float(start), "stop": float(stop), "num_coarse": int(num_coarse),
                      "budget": int(budget), "batch_size": int(batch_size),
                      "limits": [lo, hi]},
        "hints": {"dimensions": [([name], "primary")]},
        **dict(md or {}),
    }
    state: dict[str, Any] = {"seq": 0, "exposure": {}, "current_exposure": 1.0}

    def measure(x: float, factor: float = 1.0) -> MsgGenerator[int]:
        check_limits({name: x}, {name: (lo, hi)})
        if exposure is not None and factor != state["current_exposure"]:
            yield from bps.mv(exposure, factor)
            state["current_exposure"] = factor
        yield from bps.mv(motor, x)
        yield from bps.trigger_and_read(readables)
        state["seq"] += 1
        state["exposure"][state["seq"]] = factor
        return state["seq"]

    def wait_results() -> MsgGenerator[None]:
        def factory() -> Any:
            return asyncio.ensure_future(asyncio.to_thread(callback.wait, wait_timeout))

        (fut,) = yield from bps.wait_for([factory])
        if not fut.result():
            raise TimeoutError(f"live results not complete after wait_timeout={wait_timeout} s")

    @bpp.stage_decorator(list(detectors))
    def inner() -> MsgGenerator[str]:
        uid = yield from bps.open_run(_md)
        writer = None
        if client is not None:
            writer = SuggestionWriter(client, uid, [name], metadata={
                "limits": {name: [lo, hi]}, "budget": int(budget),
                "num_coarse": int(num_coarse), "start": float(start), "stop": float(stop)})
        stop_reason = "budget spent"
        try:
            for x in coarse:
                yield from measure(float(x))
            round_ = 0
            while state["seq"] < budget:
                yield from wait_results()
                res = callback.results(uid)
                res = dataclasses.replace(res, exposure=np.array(
                    [state["exposure"].get(int(s), 1.0) for s in res.seq_num]))
                if len(res) < state["seq"]:
                    logger.warning("live results hold %d of %d frames", len(res), state["seq"])
                todo = [s for s in suggest(res, min(batch_size, budget - state["seq"]), [])]
                if exposure is None and any(s.reason == "remeasure_noise" for s in todo):
                    logger.info("no exposure device: remeasure_noise suggestions skipped")
                    todo = [s for s in todo if s.reason != "remeasure_noise"]
                if not todo:
                    stop_reason = "no suggestions"
                    break
                seqs = []
                for s in todo[: budget - state["seq"]]:
                    seqs.append((yield from measure(s.position[name], s.exposure_factor)))
                if writer is not None:
                    writer.append(round_, todo, seqs + [-1] * (len(todo) - len(seqs)))
                round_ += 1
            if exposure is not None and state["current_exposure"] != 1.0:
                yield from bps.mv(exposure, 1.0)
        except BaseException:
            if writer is not None:
                writer.finish("failed", stop_reason="error")
            raise
        yield from bps.close_run()
        if writer is not None:
            writer.finish("complete", stop_reason=stop_reason, n_frames=state["seq"])
        logger.info("adaptive_scan %s: %d frames, stopped: %s", uid, state["seq"], stop_reason)
        return uid

    return (yield from inner())
