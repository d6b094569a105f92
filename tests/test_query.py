"""Query helpers against real derived nodes in an in-process Tiled."""

from __future__ import annotations

import numpy as np
import pytest

from gisaxs_bluesky.adaptive import Suggestion, SuggestionWriter
from gisaxs_bluesky.query import derived_for_run, frames_in_bin, outlier_frames, runs_with_bin
from gisaxs_bluesky.store import DerivedStore

DAE = {"name": "dae", "version": "1.2", "sha256": "0" * 64}
DAE2 = {"name": "dae", "version": "2.0", "sha256": "1" * 64}
OTHER = {"name": "vae", "version": "1.0", "sha256": "2" * 64}


def rows(seq, bins, outlier_seq=(), score=None):
    seq = np.asarray(seq, dtype=np.int64)
    n = len(seq)
    out = np.isin(seq, outlier_seq)
    return {
        "seq_num": seq,
        "time": seq.astype(float),
        "latent": np.tile(seq[:, None], (1, 2)).astype(np.float32),
        "bin_id": np.asarray(bins, dtype=np.int64),
        "outlier_score": (np.where(out, 0.9, 0.1) if score is None else score).astype(np.float32),
        "is_outlier": out,
        "recon_error": np.zeros(n, np.float32),
        "noise_prob": np.full((n, 1), 1.0, np.float32),
        "x": seq * 10.0,
    }


@pytest.fixture(scope="module")
def populated(module_tiled_client, tmp_path_factory):
    tiled_client = module_tiled_client
    store = DerivedStore(tiled_client, backup_dir=tmp_path_factory.mktemp("bk"))

    def write(uid, scan_id, model, r):
        w = store.open(uid, scan_id=scan_id, model=model, binner={"n_bins": 32}, latent_dim=2,
                       noise_kinds=["poisson"], motors=["x"])
        w.append(r)
        w.finish()

    write("uid-a", 1, DAE, rows([1, 2, 3, 4], [1, 12, 1, 12], outlier_seq=[4]))
    write("uid-b", 2, DAE, rows([1, 2], [3, 3]))
    write("uid-c", 3, OTHER, rows([1, 2, 3], [21, 1, 21], outlier_seq=[1, 2]))
    write("uid-a", 1, DAE2, rows([1, 2, 3, 4], [5, 5, 5, 1]))
    # the demo writes suggestions beside the derived nodes: same raw_uid, no frames table
    SuggestionWriter(tiled_client, "uid-a", ["x"]).append(
        0, [Suggestion({"x": 1.0}, "refine_outlier", (1,), 1.0)])
    return tiled_client


def test_runs_with_bin_is_exact_not_substring(populated):
    df = runs_with_bin(populated, 1).sort_values(["raw_uid", "model"])
    assert list(zip(df.raw_uid, df.model, df["count"])) == [
        ("uid-a", "dae-1.2", 2), ("uid-a", "dae-2.0", 1), ("uid-c", "vae-1.0", 1)]
    assert runs_with_bin(populated, 2).empty
    df = runs_with_bin(populated, 1, model="dae-1.2")
    assert list(df.raw_uid) == ["uid-a"] and list(df.scan_id) == [1]
    assert set(runs_with_bin(populated, 1, model="dae").model) == {"dae-1.2", "dae-2.0"}
    assert list(runs_with_bin(populated, 1, model=OTHER).raw_uid) == ["uid-c"]


def test_frames_in_bin(populated):
    df = frames_in_bin(populated, 12, model=DAE)
    assert list(df.raw_uid) == ["uid-a", "uid-a"] and list(df.seq_num) == [2, 4]
    assert list(df.x) == [20.0, 40.0] and list(df.bin_id) == [12, 12]
    df = frames_in_bin(populated, 1).sort_values(["raw_uid", "model", "seq_num"])
    assert list(zip(df.raw_uid, df.model, df.seq_num)) == [
        ("uid-a", "dae-1.2", 1), ("uid-a", "dae-1.2", 3), ("uid-a", "dae-2.0", 4),
        ("uid-c", "vae-1.0", 2)]
    assert frames_in_bin(populated, 99).empty


def test_outlier_frames(populated):
    df = outlier_frames(populated).sort_values(["raw_uid", "seq_num"])
    assert list(zip(df.raw_uid, df.seq_num)) == [("uid-a", 4), ("uid-c", 1), ("uid-c", 2)]
    np.testing.assert_allclose(df.outlier_score, 0.9)
    assert list(outlier_frames(populated, model="dae-1.2").seq_num) == [4]
    assert len(outlier_frames(populated, min_score=0.5)) == 3
    assert len(outlier_frames(populated, min_score=0.05)) == 4 + 2 + 3 + 4


def test_derived_for_run(populated):
    assert "uid-a-suggestions" in populated["gisaxs_derived"]  # not a derived node: left out
    out = derived_for_run(populated, "uid-a")
    assert set(out) == {"dae-1.2", "dae-2.0"}
    np.testing.assert_array_equal(out["dae-2.0"]["bin_id"].values, [5, 5, 5, 1])
    np.testing.assert_array_equal(out["dae-1.2"]["latent"].values[:, 0], [1, 2, 3, 4])
    assert out["dae-1.2"].attrs["model"] == DAE
    assert derived_for_run(populated, "nope") == {}
