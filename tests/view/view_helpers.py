"""Made-up derived rows and suggestions written through the real store (no model needed)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def derived_rows(lo: int, hi: int, *, latent_dim: int = 20, seed: int = 0) -> dict:
    """Rows seq_num lo..hi-1: bins of 10 consecutive frames along sample_x, every 7th an
    outlier, the latent clustered by bin (what the DAE callback writes, made up)."""
    rng = np.random.default_rng(seed + lo)
    seq = np.arange(lo, hi)
    n = len(seq)
    bins = (seq - 1) // 10
    outlier = seq % 7 == 0
    return {
        "seq_num": seq, "time": time.time() + np.zeros(n), "bin_id": bins,
        "outlier_score": np.where(outlier, 1.5, 0.4).astype("f4"), "is_outlier": outlier,
        "recon_error": np.where(seq % 14 == 0, 3.0, 0.2).astype("f4"),
        "latent": rng.normal(scale=0.1, size=(n, latent_dim)) + bins[:, None] * 1.0,
        "noise_prob": np.stack([seq % 3 == 0, seq % 5 == 0], axis=1).astype("f4"),
        "structure": np.array(["sphere" if b % 2 else "cylinder" for b in bins]),
        "radius_nm": 5.0 + bins, "distance_nm": 20.0 + bins,
        "sample_x": seq * 0.4,
    }


def open_derived(client, raw_uid: str, backup_dir: Path):
    from gisaxs_bluesky.store import DerivedStore

    store = DerivedStore(client, backup_dir=backup_dir)
    return store.open(raw_uid, scan_id=7, model={"name": "dae", "version": "t", "sha256": "0"},
                      binner={"recon_threshold": 1.0}, latent_dim=20,
                      noise_kinds=["hot_pixels", "beam_drift"], motors=["sample_x"])


def write_suggestions(client, raw_uid: str, xs=(3.1, 7.9, 12.0)):
    from gisaxs_bluesky.adaptive import Suggestion, SuggestionWriter

    w = SuggestionWriter(client, raw_uid, ["sample_x"])
    w.append(0, [Suggestion(position={"sample_x": x}, reason="refine_outlier",
                            priority=2.0 - i / 10, source_seq_nums=(7 * (i + 1),))
                 for i, x in enumerate(xs)])
    w.finish("complete")
    return w
