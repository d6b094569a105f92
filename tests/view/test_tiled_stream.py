"""``serve --tiled-stream``: a real RunEngine writes with TiledWriter to a real ``tiled serve``
(Redis streaming cache); the consumer, on its own client, bins each run as it is written."""

from __future__ import annotations

import bluesky.plans as bp
import numpy as np
import pytest
import torch
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky import replay
from gisaxs_bluesky.models import GisaxsDAE, save_checkpoint
from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors
from gisaxs_bluesky.sim.scene import default_scene
from gisaxs_bluesky.store import read_derived
from gisaxs_bluesky.tiled_stream import TiledStreamConsumer

XS = [2.0, 9.0, 14.0, 22.0, 27.0, 33.0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "dae-test.pt"
    save_checkpoint(path, GisaxsDAE(), {"name": "dae-test", "version": "stream"})
    return replay.load_model(str(path), "cpu")


@pytest.mark.parametrize("mode", ["streaming", "polling"])
def test_runs_are_binned_as_tiledwriter_writes_them(tiled_streaming, RE, encoder, mode,
                                                    tmp_path):
    scene = default_scene()
    frames = {x: scene.frame({"sample_x": x}) for x in XS}
    (x,) = make_motors("x")
    det = make_gisaxs_detector(tiled_streaming.directory / f"det-{mode}",
                               lambda p: frames[float(p["x"])], [x],
                               shape=frames[XS[0]].shape, dtype=np.int32)
    consumer = TiledStreamConsumer(tiled_streaming.client(), encoder, mode=mode,
                                   poll_interval_s=0.5, backup_dir=tmp_path / "backup")
    consumer.start()
    assert consumer.mode == mode
    try:
        token = RE.subscribe(TiledWriter(tiled_streaming.client(), batch_size=1))
        (uid,) = RE(bp.list_scan([det], x, XS), sample=f"tiled-stream {mode}")
        RE.unsubscribe(token)
        assert consumer.wait_idle(uid, timeout=90), consumer.errors
    finally:
        consumer.stop()
    assert consumer.runs_done[-1] == (uid, "complete")
    client = tiled_streaming.client()
    key = next(k for k in client["gisaxs_derived"] if k.startswith(uid))
    ds = read_derived(client["gisaxs_derived"][key])
    assert ds.attrs["status"] == "complete"
    assert ds.attrs["producer"] == "gisaxs_bluesky.tiled_stream"
    assert ds["seq_num"].values.tolist() == list(range(1, len(XS) + 1))
    np.testing.assert_allclose(ds["x"].values, XS)
    assert np.isfinite(ds["latent"].values).all()
