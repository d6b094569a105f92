"""The latent map's method: UMAP when umap-learn is installed and asked for, PCA otherwise;
the payload says which and the page (real headless chromium) states it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from view_helpers import derived_rows, open_derived

from gisaxs_bluesky.runtime import DEFAULT_ROOT
from gisaxs_bluesky.view import BackgroundServer, ViewState, build_view_app
from gisaxs_bluesky.view.data import RunRows, umap_available


@pytest.fixture
def rows(tiled_client, tmp_path) -> RunRows:
    """40 frames in 4 bins of 10, read back from a derived node in Tiled."""
    writer = open_derived(tiled_client, "raw-embedding", tmp_path / "backup")
    writer.append(derived_rows(1, 41))
    writer.flush()
    node = tiled_client[DEFAULT_ROOT][writer.key]
    out = RunRows(writer.key, node.metadata)
    assert out.read_all(node) == 40
    return out


def _separation(xy: np.ndarray, bins: np.ndarray) -> float:
    """Smallest distance between bin centres over the largest spread inside a bin."""
    centres = np.stack([xy[bins == b].mean(axis=0) for b in np.unique(bins)])
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]]
    spread = max(np.linalg.norm(xy[bins == b] - c, axis=1).max()
                 for b, c in zip(np.unique(bins), centres, strict=True))
    return min(gaps) / spread


def test_latent_map_is_pca_by_default(rows):
    payload = rows.full()
    assert payload["embedding"] == "pca" and "embedding_error" not in payload
    xy = np.array([payload["points"]["pc1"], payload["points"]["pc2"]], dtype=float).T
    assert np.isfinite(xy).all() and xy.shape == (40, 2)
    assert _separation(xy, np.array(payload["points"]["bin_id"])) > 1.0


@pytest.mark.skipif(not umap_available(), reason="umap-learn not installed")
def test_latent_map_uses_umap_when_installed(rows):
    pca = rows.full()
    payload = rows.full(embedding="umap")
    assert payload["embedding"] == "umap" and "embedding_error" not in payload
    xy = np.array([payload["points"]["pc1"], payload["points"]["pc2"]], dtype=float).T
    assert np.isfinite(xy).all() and xy.shape == (40, 2)
    assert not np.allclose(xy, np.array([pca["points"]["pc1"], pca["points"]["pc2"]]).T)
    # UMAP keeps the four bins apart
    assert _separation(xy, np.array(payload["points"]["bin_id"])) > 1.0
    # the rest of the payload is the same run
    assert payload["points"]["seq_num"] == pca["points"]["seq_num"] == list(range(1, 41))


def test_latent_map_falls_back_to_pca_without_umap(rows, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError
    assert not umap_available()
    payload = rows.full(embedding="umap")
    assert payload["embedding"] == "pca"
    assert payload["embedding_error"] == "UMAP is not installed (pip install umap-learn)"
    assert payload["points"]["pc1"] == rows.full()["points"]["pc1"]


@pytest.mark.skipif(not umap_available(), reason="umap-learn not installed")
def test_page_states_the_method_and_keeps_pca_points_off_a_umap_map(tiled_server, browser,
                                                                    tmp_path):
    client = tiled_server.client()
    writer = open_derived(client, "raw-umap-page", tmp_path / "backup")
    writer.append(derived_rows(1, 41))
    writer.flush()
    state = ViewState(client, tiled_label="test", mode="polling", poll_interval_s=0.3)
    server = BackgroundServer(build_view_app(state)).start()
    try:
        page = browser.new_page()
        page.goto(f"{server.url}/?run={writer.key}")
        page.wait_for_function("window.gisaxsView.nFrames === 40", timeout=30000)
        assert page.inner_text("#embedding-note").startswith("PCA of the 16-dim identity latent")
        assert page.inner_text("#embedding option[value=umap]") == "UMAP"
        page.select_option("#embedding", "umap")
        page.wait_for_function("window.gisaxsView.embedding === 'umap'", timeout=120000)
        assert page.inner_text("#embedding-note") == "UMAP of the identity latent (fitted on load)"
        # rows that land now come with PCA coordinates: not drawn on the UMAP map
        writer.append(derived_rows(41, 44))
        page.wait_for_function("window.gisaxsView.nFrames === 43", timeout=30000)
        assert page.evaluate("window.gisaxsView.points.pc1.slice(-3)") == [None, None, None]
        assert "3 newer frames not on this map yet" in page.inner_text("#embedding-note")
        page.close()
    finally:
        state.close()
        server.stop()
