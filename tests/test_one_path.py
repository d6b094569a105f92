"""One frame path: a recorded document stream (tests/examples/list_scan) fed to the live
callback, to replay and to ``serve`` (0MQ) gives derived nodes identical column by column."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from bluesky.callbacks.zmq import Proxy, Publisher
from bluesky_tiled_plugins import TiledWriter

from gisaxs_bluesky import serve
from gisaxs_bluesky.callbacks import DAEBinningCallback
from gisaxs_bluesky.models import Encoder, GisaxsDAE, make_binner
from gisaxs_bluesky.replay import ReplayOptions, replay_runs
from gisaxs_bluesky.store import read_derived

EXAMPLE = Path(__file__).parent / "examples" / "list_scan"


def recorded_docs(directory: Path) -> list[tuple[str, dict]]:
    """The example's documents, its HDF5 file copied into ``directory`` (Tiled can read it)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "pilatus.h5", directory / "pilatus.h5")
    docs = []
    for line in (EXAMPLE / "documents.jsonl").read_text().splitlines():
        name, doc = json.loads(line)
        if name == "stream_resource":
            doc["uri"] = doc["uri"].replace("/EXAMPLE_DIR", str(directory))
        docs.append((name, doc))
    return docs


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    model = GisaxsDAE()
    for p in model.to_identity.parameters():  # latents that tell the blob widths apart
        torch.nn.init.normal_(p, std=0.2)
    return Encoder(model, {"name": "one-path", "version": "1"}, "cpu")


def callback(client, encoder, tmp_path: Path, root: str) -> DAEBinningCallback:
    return DAEBinningCallback(client, encoder=encoder, binner=make_binner(encoder), root=root,
                              backup_dir=tmp_path / f"backup-{root}",
                              spill_dir=tmp_path / f"spill-{root}")


def _addr(port) -> str:
    port = str(port)
    return port.removeprefix("tcp://") if ":" in port else f"127.0.0.1:{port}"


def test_recorded_stream_gives_one_derived_node_on_every_path(tiled_client, detector_dir,
                                                              tmp_path, encoder):
    docs = recorded_docs(detector_dir / "example")
    uid = docs[0][1]["uid"]
    writer = TiledWriter(tiled_client, batch_size=1)
    live = callback(tiled_client, encoder, tmp_path, "live")
    for name, doc in docs:  # the raw run into Tiled first, as a beamline would have it
        writer(name, doc)
    for name, doc in docs:
        live(name, doc)
    assert live.wait(60)

    (summary,) = replay_runs(tiled_client, [uid], encoder=encoder, show_progress=False,
                             options=ReplayOptions(root="replay",
                                                   backup_dir=str(tmp_path / "b-replay")))
    assert summary.status == "complete", summary.errors

    p = Proxy("127.0.0.1", "127.0.0.1")
    threading.Thread(target=p.start, daemon=True).start()
    remote = callback(tiled_client, encoder, tmp_path, "serve")
    consumer = serve.ZmqConsumer(_addr(p.out_port), remote)
    consumer.start_in_thread()
    publisher = Publisher(_addr(p.in_port))
    try:
        assert serve.wait_until_connected(publisher, consumer, timeout=15)
        for name, doc in docs:
            publisher(name, doc)
        for _ in range(400):
            if consumer.counts.get("stop"):
                break
            threading.Event().wait(0.05)
        assert consumer.counts.get("stop") == 1, consumer.counts
        assert remote.wait(60)
    finally:
        consumer.stop()
        publisher.close()

    key = f"{uid}-{encoder.name}-{encoder.version}"
    nodes = {root: read_derived(tiled_client[root][key]) for root in ("live", "replay", "serve")}
    ref = nodes["live"]
    assert ref.sizes["frame"] == 8 and ref.attrs["status"] == "complete"
    assert list(ref.seq_num.values) == list(range(1, 9))
    # the two blob widths give different latents: a mixed-up frame would show
    assert np.abs(ref.latent.values[0] - ref.latent.values[-1]).max() > 1e-3
    for root, ds in nodes.items():
        assert set(ds.data_vars) == set(ref.data_vars), root
        for col in ("seq_num", "bin_id", "is_outlier", "sample_x", "time", "structure"):
            np.testing.assert_array_equal(ds[col].values, ref[col].values, err_msg=f"{root} {col}")
        # batches may group frames differently: float noise of CPU kernels, not bit for bit
        for col in ("latent", "recon_error", "noise_prob", "outlier_score", "radius_nm",
                    "distance_nm"):
            np.testing.assert_allclose(ds[col].values, ref[col].values, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{root} {col}")
        for attr in ("raw_uid", "scan_id", "model_id", "motors", "image_key", "latent_dim",
                     "noise_kinds", "bin_counts", "status", "n_frames"):
            assert ds.attrs[attr] == ref.attrs[attr], (root, attr)
