"""Remote consumer over a real bluesky 0MQ Proxy on loopback: it writes the same derived node
(same rows) as the in-process callback does for the same scan."""

from __future__ import annotations

import threading

import bluesky.plans as bp
import numpy as np
import pytest
import torch
from bluesky.callbacks.zmq import Proxy, Publisher

from gisaxs_bluesky import replay, serve
from gisaxs_bluesky.callbacks import DAEBinningCallback
from gisaxs_bluesky.models import GisaxsDAE, make_binner, save_checkpoint
from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors
from gisaxs_bluesky.sim.scene import default_scene
from gisaxs_bluesky.store import read_derived

XS = [2.0, 14.0, 22.0, 33.0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    model = GisaxsDAE()
    for p in model.to_identity.parameters():
        torch.nn.init.normal_(p, std=0.2)
    path = tmp_path_factory.mktemp("model") / "dae-test.pt"
    save_checkpoint(path, model, {"name": "dae-test", "version": "serve"})
    return replay.load_model(str(path), "cpu")


def _addr(port) -> str:
    """Proxy ports are full addresses ("tcp://127.0.0.1:N") when bound to a random port."""
    port = str(port)
    return port.removeprefix("tcp://") if ":" in port else f"127.0.0.1:{port}"


@pytest.fixture
def proxy():
    """A real bluesky 0MQ Proxy on random loopback ports, forwarding in a daemon thread."""
    p = Proxy("127.0.0.1", "127.0.0.1")
    thread = threading.Thread(target=p.start, daemon=True)
    thread.start()
    yield p  # (zmq.device cannot be interrupted; the daemon thread ends with the process)


def test_zmq_consumer_writes_same_node_as_in_process_callback(
    RE, proxy, tiled_server, tiled_client, tmp_path, encoder
):
    scene = default_scene()
    frames = {x: scene.frame({"sample_x": x}) for x in XS}
    x, = make_motors("x")
    # detector files on "shared storage" (same disk) read by both callbacks
    det = make_gisaxs_detector(tmp_path / "det", lambda p: frames[float(p["x"])], [x],
                               shape=frames[XS[0]].shape, dtype=np.int32)

    def callback(client, backup):
        return DAEBinningCallback(client, encoder=encoder, binner=make_binner(encoder),
                                  backup_dir=tmp_path / backup,
                                  spill_dir=tmp_path / f"spill-{backup}")

    # remote side: consumer thread -> Tiled over HTTP (loopback server, API key)
    remote_client = tiled_server.client()
    remote_cb = callback(remote_client, "remote")
    consumer = serve.ZmqConsumer(_addr(proxy.out_port), remote_cb)
    consumer.start_in_thread()
    publisher = Publisher(_addr(proxy.in_port))
    try:
        assert serve.wait_until_connected(publisher, consumer, timeout=15)
        local_cb = callback(tiled_client, "local")
        tokens = [RE.subscribe(publisher), RE.subscribe(local_cb)]
        (uid,) = RE(bp.list_scan([det], x, XS), sample="zmq")
        for t in tokens:
            RE.unsubscribe(t)
        assert local_cb.wait(60)
        # the stop document reaches the consumer shortly after the scan
        deadline = threading.Event()
        for _ in range(200):
            if consumer.counts.get("stop"):
                break
            deadline.wait(0.05)
        assert consumer.counts.get("stop") == 1, consumer.counts
        assert remote_cb.wait(60)
    finally:
        consumer.stop()
        publisher.close()
    assert consumer.stopped.is_set() and consumer.errors == []
    assert consumer.pings >= 1  # pings never reached the callback: one run only
    key = f"{uid}-{encoder.name}-{encoder.version}"
    assert list(remote_client["gisaxs_derived"]) == [key]
    remote = read_derived(remote_client["gisaxs_derived"][key])
    local = read_derived(tiled_client["gisaxs_derived"][key])
    # both sides against the frames the detector wrote (latents of this random model differ by
    # < 0.01 between frames; the reconstruction error tells them apart): catches a side that
    # read the wrong frame, even when both sides read the same wrong one
    ref = encoder.encode(np.stack([frames[x] for x in XS]))
    # both sides judged before asserting, so that a failure says which side read what
    wrong = {name: side.recon_error.values.tolist() for name, side in
             (("remote", remote), ("local", local))
             if not np.allclose(side.recon_error.values, ref.recon_error, rtol=0.02)}
    assert not wrong, f"expected recon errors {ref.recon_error.tolist()}, got {wrong}"
    for col in ("seq_num", "bin_id", "is_outlier", "x", "time"):
        np.testing.assert_array_equal(remote[col].values, local[col].values, err_msg=col)
    # the worker batches by size and time, so the two sides may group frames differently, and
    # CPU kernels round differently per batch size: equal up to float noise, not bit for bit
    np.testing.assert_allclose(remote.latent.values, local.latent.values, rtol=0, atol=0.02)
    np.testing.assert_allclose(remote.recon_error.values, local.recon_error.values, rtol=0.05,
                               atol=1e-3)
    assert remote.sizes["frame"] == len(XS)
    for k in ("raw_uid", "scan_id", "model_id", "motors", "image_key", "bin_counts", "status"):
        assert remote.attrs[k] == local.attrs[k], k
    assert remote.attrs["status"] == "complete"


def test_serve_cli_reports_unreachable_tiled(capsys):
    from gisaxs_bluesky.cli import main

    rc = main(["serve", "--zmq", "127.0.0.1:5999", "--tiled-uri", "http://127.0.0.1:1/api/v1",
               "--model", "untrained"])
    assert rc == 2
    assert "cannot reach Tiled" in capsys.readouterr().err
