"""Adaptive suggestions: pure core, bluesky-adaptive optimize round trip, in-scan plan + Tiled."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky.adaptive import (
    DAEOptimizer,
    DerivedCallbackResults,
    LiveEncoder,
    LiveEvaluation,
    ScanResults,
    SuggestConfig,
    adaptive_scan,
    check_limits,
    defect_scene,
    exposure_frame_fn,
    plot_suggestions,
    read_suggestions,
    suggest_points,
)
from gisaxs_bluesky.models import Encoder, GisaxsDAE, load_pretrained, pretrained_path
from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors

LIMITS = {"sample_x": (10.0, 30.0)}


def _results(x, bins, scores, noise=None, kinds=("poisson", "gaps")):
    x = np.asarray(x, float)
    scores = np.asarray(scores, float)
    n = len(x)
    noise = np.zeros((n, len(kinds))) if noise is None else np.asarray(noise, float)
    return ScanResults({"sample_x": x}, np.asarray(bins), scores, scores > 1, scores,
                       np.arange(1, n + 1), noise, kinds)


@pytest.fixture(scope="module")
def encoder():
    """The pretrained DAE when its weights exist, else a seeded untrained one (real torch)."""
    if pretrained_path().is_file():
        return load_pretrained("cpu")
    torch.manual_seed(0)
    return Encoder(GisaxsDAE(), {"name": "untrained-test", "version": "0"}, "cpu")


# ------------------------------------------------------------------------------------ core
def test_refine_and_boundary_respect_limits_and_budget():
    x = np.linspace(10, 30, 11)
    bins = [0] * 5 + [1] * 6
    scores = np.full(11, 0.2)
    scores[[0, 7]] = 4.0  # outlier at the low limit and one in the middle
    cfg = SuggestConfig(LIMITS, min_step=0.1)
    out = suggest_points(_results(x, bins, scores), cfg)
    reasons = {s.reason for s in out}
    assert reasons == {"refine_outlier", "bin_boundary"}
    for s in out:
        check_limits(s.position, LIMITS)
        assert not np.isclose(x, s.position["sample_x"]).any()
    refine = sorted(s.position["sample_x"] for s in out if s.source_seq_nums == (8,))
    assert refine == [23.0, 23.5, 24.5, 25.0]  # half and quarter spacing on both sides
    assert [s.position["sample_x"] for s in out if s.reason == "bin_boundary"] == [19.0]
    assert out == sorted(out, key=lambda s: -s.priority)
    assert len(suggest_points(_results(x, bins, scores), cfg, max_points=3)) == 3
    # pending points and min_step dedupe
    again = suggest_points(_results(x, bins, scores), cfg, exclude=[{"sample_x": 23.02}])
    assert all(abs(s.position["sample_x"] - 23.0) >= 0.1 for s in again)


def test_clip_or_drop_outside_limits(caplog):
    x = np.array([10.0, 12.0, 14.0])
    scores = np.array([0.1, 0.1, 5.0])
    narrow = {"sample_x": (10.0, 13.5)}
    with caplog.at_level(logging.INFO, logger="gisaxs_bluesky.adaptive.suggest"):
        dropped = suggest_points(_results(x, [0, 0, 0], scores),
                                 SuggestConfig(narrow, out_of_limits="drop"))
    assert all(10 <= s.position["sample_x"] <= 13.5 for s in dropped)
    clipped = suggest_points(_results(x, [0, 0, 0], scores),
                             SuggestConfig(narrow, out_of_limits="clip", min_step=0.01))
    assert all(10 <= s.position["sample_x"] <= 13.5 for s in clipped)
    with pytest.raises(ValueError, match=r"sample_x=31.0 outside limits 10.0..30.0"):
        check_limits({"sample_x": 31.0}, LIMITS)
    with pytest.raises(ValueError, match="limits"):
        SuggestConfig({"sample_x": (5.0, 5.0)})


def test_nan_and_empty(caplog):
    cfg = SuggestConfig(LIMITS)
    with caplog.at_level(logging.WARNING, logger="gisaxs_bluesky.adaptive.suggest"):
        assert suggest_points(ScanResults.empty(["sample_x"]), cfg) == []
    assert "nothing to suggest" in caplog.text
    caplog.clear()
    x = [10.0, 12.0, 14.0, 16.0]
    with caplog.at_level(logging.WARNING, logger="gisaxs_bluesky.adaptive.suggest"):
        out = suggest_points(_results(x, [0, 0, 0, 0], [np.nan, 3.0, np.nan, 0.1]), cfg)
    assert "NaN" in caplog.text and "[1, 3]" in caplog.text
    assert {s.source_seq_nums for s in out} == {(2,)}
    with caplog.at_level(logging.WARNING, logger="gisaxs_bluesky.adaptive.suggest"):
        assert suggest_points(_results(x[:2], [0, 0], [np.nan, np.nan]), cfg) == []


def test_remeasure_noise_rule():
    x = [10.0, 12.0, 14.0]
    scores = [0.1, 0.8, 0.8]  # elevated but not outliers
    noise = [[0.99, 0.0], [0.99, 0.0], [0.2, 0.0]]  # frame 2: poisson-dominated; 3: not
    cfg = SuggestConfig(LIMITS, exposure_factor=4.0, max_exposure_factor=16.0)
    out = suggest_points(_results(x, [0, 0, 0], scores, noise), cfg)
    assert [(s.reason, s.position["sample_x"], s.exposure_factor) for s in out] == [
        ("remeasure_noise", 12.0, 4.0)]
    # after a 16x re-measurement no more
    res = ScanResults({"sample_x": np.array([10.0, 12.0, 12.0])}, np.zeros(3), np.array(
        [0.1, 0.8, 0.8]), np.zeros(3, bool), np.zeros(3), np.arange(1, 4),
        np.array([[0.9, 0], [0.99, 0], [0.99, 0]]), ("poisson", "gaps"), np.array([1, 1, 16.0]))
    assert suggest_points(res, cfg) == []


def test_nd_positions_refine_along_each_axis():
    xs, ys = np.meshgrid([0.0, 2.0, 4.0], [0.0, 2.0, 4.0])
    scores = np.full(9, 0.1)
    scores[4] = 3.0  # centre
    res = ScanResults({"x": xs.ravel(), "y": ys.ravel()}, np.zeros(9), scores, scores > 1,
                      scores, np.arange(1, 10))
    out = suggest_points(res, SuggestConfig({"x": (0, 4), "y": (0, 4)},
                                            refine_fractions=(0.5,)))
    assert sorted((s.position["x"], s.position["y"]) for s in out) == [
        (1.0, 2.0), (2.0, 1.0), (2.0, 3.0), (3.0, 2.0)]


# ---------------------------------------------------------------------- Bluesky + Tiled
def test_optimizer_round_trips_through_bluesky_adaptive_optimize(RE, detector_dir, encoder):
    from bluesky_adaptive.plans import optimize
    from bluesky_adaptive.protocols import OptimizationProblem, Optimizer

    (x,) = make_motors("sample_x")
    scene = defect_scene(1)
    det = make_gisaxs_detector(detector_dir, exposure_frame_fn(scene), [x], name="pilatus")
    live = LiveEncoder(encoder, motors=["sample_x"])
    RE.subscribe(live)
    cfg = SuggestConfig(LIMITS, min_step=0.1)
    opt = DAEOptimizer(cfg, {"sample_x": np.linspace(10, 30, 4)}, budget=7,
                       noise_kinds=encoder.noise_kinds)
    assert isinstance(opt, Optimizer)
    problem = OptimizationProblem(optimizer=opt, actuators=[x], sensors=[det],
                                  evaluation_function=LiveEvaluation(live))
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(optimize(problem, iterations=None, n_points=4))
    live.close()
    assert len(opt.rows) == opt.n_suggested <= 7
    assert len(opt.rows) >= 4  # at least the coarse grid
    assert all(10 <= r["sample_x"] <= 30 for r in opt.rows)
    assert {r["_id"] for r in opt.rows} == set(opt.suggested)
    assert opt.should_stop()[0]
    starts = [d for n, d in docs if n == "start"]
    assert starts[0]["plan_name"] == "optimize"
    assert sum(d.get("plan_name") == "list_scan" for d in starts) >= 1
    best = opt.get_best_points()
    assert best and best[0][0] in opt.suggested


def test_adaptive_scan_terminates_and_writes_suggestions_to_tiled(
    RE, tiled_client, detector_dir, encoder, tmp_path
):
    from gisaxs_bluesky.callbacks.dae_binning import DAEBinningCallback, serialized
    from gisaxs_bluesky.models import make_binner

    x, exposure = make_motors("sample_x", "exposure", exposure=1.0)
    scene = defect_scene(3)
    det = make_gisaxs_detector(detector_dir, exposure_frame_fn(scene), [x, exposure],
                               name="pilatus")
    # one SQLite table store: raw and derived writes take turns (as the demo does)
    lock = threading.Lock()
    RE.subscribe(serialized(TiledWriter(tiled_client, batch_size=1), lock))
    cb = DAEBinningCallback(tiled_client, encoder=encoder, binner=make_binner(encoder),
                            persist_binner=False, backup_dir=tmp_path / "backup",
                            spill_dir=tmp_path / "spill", batch_timeout=0.05, write_lock=lock)
    RE.subscribe(cb)
    cfg = SuggestConfig(LIMITS, min_step=0.1, noise_score_min=0.0, noise_prob_threshold=0.0,
                        max_exposure_factor=4.0)
    (uid,) = RE(adaptive_scan(
        [det], x, 10.0, 30.0, 5, suggester=cfg, budget=8, callback=DerivedCallbackResults(
            cb, tiled_client, ["sample_x"]), exposure=exposure, client=tiled_client,
        batch_size=3))
    cb.wait(60)
    cb.close()
    positions = tiled_client[uid]["primary"]["sample_x"].read()
    assert 5 <= len(positions) <= 8
    assert np.all((positions >= 10) & (positions <= 30))
    df = read_suggestions(tiled_client, uid)
    assert df.attrs["status"] == "complete" and df.attrs["raw_uid"] == uid
    assert len(df) == len(positions) - 5 and set(df["reason"]) <= {
        "refine_outlier", "bin_boundary", "remeasure_noise"}
    assert (df["seq_num"] > 5).all()
    np.testing.assert_allclose(df.sort_values("seq_num")["sample_x"], positions[5:])
    # the derived node sits beside the suggestions
    res = DerivedCallbackResults(cb, tiled_client, ["sample_x"]).results(uid)
    assert len(res) == len(positions)
    png = tmp_path / "suggestions.png"
    plot_suggestions(res, df, path=png, regions=[(r.x_min_mm, r.x_max_mm, r.name)
                                                 for r in scene.defect_regions])
    assert png.stat().st_size > 1000


def test_adaptive_scan_validates_and_stops_without_suggestions(RE, detector_dir, encoder):
    (x,) = make_motors("sample_x")
    det = make_gisaxs_detector(detector_dir, exposure_frame_fn(defect_scene(0)), [x])
    live = LiveEncoder(encoder)
    RE.subscribe(live)
    cfg = SuggestConfig(LIMITS, boundaries=False, refine_fractions=(0.5,),
                        noise_score_min=np.inf)
    with pytest.raises(ValueError, match=r"sample_x=31.0 outside limits 10.0..30.0"):
        RE(adaptive_scan([det], x, 10.0, 31.0, 3, suggester=cfg, budget=4, callback=live))
    with pytest.raises(ValueError, match="budget=2"):
        RE(adaptive_scan([det], x, 10.0, 30.0, 3, suggester=cfg, budget=2, callback=live))
    # a suggester that never suggests: the plan stops after the coarse grid
    (uid,) = RE(adaptive_scan([det], x, 10.0, 30.0, 3, suggester=lambda r, n, e: [],
                              budget=10, callback=live))
    assert len(live.rows(uid)) == 3
    live.close()
