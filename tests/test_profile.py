"""The IPython beamline profile starts (real IPython subprocess) and wires RE, Tiled,
TiledWriter, the simulated devices and the DAE callback together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profile" / "profile_gisaxs"

CHECK = """
import json as _json
(_uid,) = RE(bp.count([pilatus], 1))
dae_callback.wait(60)
_keys = list(tiled_client["gisaxs_derived"])
_cbs = [c for cbs in RE.dispatcher.cb_registry.callbacks.values() for c in cbs.values()]
print("RESULT" + _json.dumps({
    "names": [n for n in ("RE", "bp", "bps", "tiled_client", "tiled_writer", "pilatus",
              "sample_x", "dae_callback", "dae_token", "frames_in_bin", "outlier_frames",
              "runs_with_bin", "replay_runs") if n in globals()],
    "types": [type(RE).__name__, type(dae_callback).__name__, type(tiled_writer).__name__],
    "n_callbacks": len(_cbs),
    "derived": _keys,
    "uid": _uid,
    "raw_in_tiled": _uid in tiled_client,
    "adaptive": adaptive is not None,
}))
"""


@pytest.mark.skipif(not (Path(sys.executable).parent / "ipython").exists(),
                    reason="ipython not installed in this environment")
def test_profile_starts_and_wires_the_session(tmp_path):
    env = dict(os.environ, GISAXS_CATALOG_DIR=str(tmp_path / "catalog"),
               GISAXS_MODEL="untrained", GISAXS_DEVICE="cpu",
               XDG_CACHE_HOME=str(tmp_path / "cache"), IPYTHONDIR=str(tmp_path / "ipython"))
    env.pop("GISAXS_TILED_URI", None)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ipython"), "--no-banner", "--colors=nocolor", "--HistoryManager.enabled=False",
         f"--profile-dir={PROFILE}", "-c", CHECK],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line is not None, out[-4000:]
    res = json.loads(line[len("RESULT"):])
    assert set(res["names"]) == {"RE", "bp", "bps", "tiled_client", "tiled_writer", "pilatus",
                                 "sample_x", "dae_callback", "dae_token", "frames_in_bin",
                                 "outlier_frames", "runs_with_bin", "replay_runs"}
    assert res["types"] == ["RunEngine", "DAEBinningCallback", "TiledWriter"]
    assert res["raw_in_tiled"]  # TiledWriter subscribed
    assert res["derived"] == [f"{res['uid']}-untrained-seed0"]  # DAE callback subscribed
    assert "local catalog" in out
    if not res["adaptive"]:
        assert "adaptive plan not available" in out
