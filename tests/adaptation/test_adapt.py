"""`adapt` end to end on a tiny set: checkpoint loads, provenance, resolver, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from gisaxs_bluesky.adaptation.adapt_config import AdaptConfig
from gisaxs_bluesky.adaptation.errors import AdaptationError
from gisaxs_bluesky.adaptation.finetune import adapt, list_adapted, load_adapted, resolve_model
from gisaxs_bluesky.adaptation.halves import counts_converter
from gisaxs_bluesky.adaptation.sources import SourceFrame
from gisaxs_bluesky.adaptation.thinning import ThinningError
from gisaxs_bluesky.cli import main
from gisaxs_bluesky.models import load_checkpoint, make_binner, pretrained_path
from gisaxs_bluesky.models.dataset import DatasetSpec, generate
from gisaxs_bluesky.sim import Geometry, NoiseSpec, Sample, simulate

TINY = AdaptConfig(epochs=1, batch_frames=2, thinnings=2)


def _sim(structure: str, seed: int, **kinds) -> np.ndarray:
    r = simulate(Sample(structure, radius_nm=5, distance_nm=30), Geometry(),
                 NoiseSpec(dose_counts=5.0, kinds={"poisson": 1, "gaps": 1, **kinds}), seed=seed,
                 compute_binning=6)
    return r.counts[:400, 300:700]


@pytest.fixture(scope="module")
def beamtime(tmp_path_factory):
    """Four 400 x 400 counting frames of two samples, as TIFF files."""
    d = tmp_path_factory.mktemp("beamtime")
    for i, structure in enumerate(["lamellar", "lamellar", "spheres_dilute", "spheres_dilute"]):
        tifffile.imwrite(d / f"frame{i}.tif", _sim(structure, i))
    return d


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    path = tmp_path_factory.mktemp("anchor") / "anchor.h5"
    generate(path, DatasetSpec(n_identities=2, frames_per_identity=2, seed=7), workers=1,
             progress=False)
    return path


def test_adapt_writes_a_checkpoint_that_loads_with_provenance(beamtime, anchor, tmp_path):
    out = tmp_path / "bt.pt"
    geometry = {"distance_mm": 1730.0, "wavelength_nm": 0.134}
    result = adapt(beamtime, out, config=TINY, anchor=anchor, device="cpu", progress=False,
                   geometry=geometry)
    model, card, _ = load_checkpoint(out)  # sha256 of the card verified
    assert card["sha256"] == result.card["sha256"]
    base, base_card, _ = load_checkpoint(pretrained_path())
    a = card["adaptation"]
    assert a["base"]["sha256"] == base_card["sha256"]
    assert a["frames"] == 4 and a["split_fraction"] == 0.5 and a["thinnings"] == 2
    files = [f["path"] for f in a["sources"][0]["files"]]
    assert [p.rsplit("/", 1)[1] for p in files] == [f"frame{i}.tif" for i in range(4)]
    assert a["geometry"] == [{"geometry": geometry, "frames": 4}]
    assert a["detector"]["400x400"]["detector"] == "counting"
    assert set(a["losses"]) >= {"n2n_decoder", "n2n_denoiser", "identity", "anchor_total"}
    assert all(np.isfinite(v) for v in a["losses"].values())
    assert a["anchor"]["frames"] == 4
    cal = a["calibration"]
    assert cal["latents"] == 16 and cal["frames"] == 4 and cal["reference_split"] == "by frame"
    # the weights moved; batch-norm statistics did not
    moved = any(not torch.equal(p, base.state_dict()[k]) for k, p in model.state_dict().items()
                if "running" not in k and "num_batches" not in k)
    assert moved
    for k, v in model.state_dict().items():
        if "running_mean" in k:
            torch.testing.assert_close(v, base.state_dict()[k])
        if k.split(".")[0] in ("stem", "block4", "to_noise", "noise_head", "size_head"):
            torch.testing.assert_close(v, base.state_dict()[k])  # not trainable by default
    assert not torch.equal(model.to_identity[1].weight, base.to_identity[1].weight)
    assert "anchor_distill" in a["losses"] and a["config"]["trainable"] == "decoder+identity"
    # the calibrated binner comes with the model
    encoder = load_adapted(out, "cpu")
    binner = make_binner(encoder)
    assert binner.spread == pytest.approx(cal["spread"])
    assert binner.recon_threshold == pytest.approx(cal["recon_threshold"])
    assert len(binner.reference) == cal["n_reference"]
    frame = tifffile.imread(beamtime / "frame0.tif")
    res = encoder.encode(frame)
    assert res.latent.shape == (1, 32) and np.isfinite(res.latent).all()
    assert json.loads(out.with_suffix(".json").read_text())["adaptation"]["frames"] == 4


def test_cli_by_name_in_user_cache_and_resolver(beamtime, anchor, tmp_path, monkeypatch, capsys):
    from gisaxs_bluesky import replay

    monkeypatch.setenv("GISAXS_BLUESKY_MODELS", str(tmp_path / "models"))
    rc = main(["adapt", str(beamtime), "--name", "beamtime-1", "--epochs", "1",
               "--batch-frames", "2", "--anchor", str(anchor), "--device", "cpu",
               "--no-progress", "--max-frames", "2", "--thinnings", "2"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    path = tmp_path / "models" / "beamtime-1.pt"
    assert printed["checkpoint"] == str(path) and printed["frames"] == 2
    assert list_adapted() == ["beamtime-1"]
    assert resolve_model("beamtime-1") == path
    assert resolve_model("pretrained") == pretrained_path()
    assert resolve_model(str(path)) == path
    enc = load_adapted("beamtime-1", "cpu")
    assert enc.name == "beamtime-1" and enc.sha256 == printed["sha256"]
    assert enc.card["adaptation"]["calibration"]["reference_split"].startswith("by thinning")
    # what replay / serve / the callback call: a path from the resolver
    assert replay.load_model(str(resolve_model("beamtime-1")), "cpu").sha256 == enc.sha256
    with pytest.raises(Exception, match="beamtime-1"):
        resolve_model("nope")


def test_bad_inputs_give_clear_errors(beamtime, anchor, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["adapt", str(empty), "--out", str(tmp_path / "x.pt")]) == 2
    assert "adaptation set is empty" in capsys.readouterr().err
    assert main(["adapt", "--out", str(tmp_path / "x.pt")]) == 2
    assert "adaptation set is empty" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    frame = tifffile.imread(beamtime / "frame0.tif").astype(np.int32)
    frame[10, 20] = -5
    tifffile.imwrite(bad / "neg.tif", frame)
    with pytest.raises(ThinningError, match=r"neg\.tif: pixel \(10, 20\) = -5 is a negative"):
        adapt(bad, tmp_path / "y.pt", config=AdaptConfig(epochs=1, detector="counting"),
              anchor=anchor, device="cpu", progress=False)
    with pytest.raises(AdaptationError, match="frame0.tif: no geometry"):
        adapt(beamtime, tmp_path / "z.pt", config=TINY, anchor=anchor, device="cpu",
              progress=False, require_geometry=True)
    with pytest.raises(AdaptationError, match="give out=PATH or name=NAME"):
        adapt(beamtime, None, config=TINY)
    assert not (tmp_path / "y.pt").exists() and not (tmp_path / "z.pt").exists()


def test_integrating_frames_are_converted_with_the_estimated_gain():
    rng = np.random.default_rng(0)
    lam = simulate(Sample("lamellar", radius_nm=5, distance_nm=30), Geometry(),
                   NoiseSpec(dose_counts=5.0), seed=0, compute_binning=6).expected[:400, 300:700]
    frames = [SourceFrame(rng.poisson(lam) * 2.5 + rng.normal(0, 1.5, lam.shape), f"ccd{i}")
              for i in range(2)]
    conv, report = counts_converter(frames, AdaptConfig(), None)
    est = conv[(400, 400)]
    assert report["400x400"]["detector"] == "integrating"
    assert est.gain_adu_per_photon == pytest.approx(2.5, rel=0.1)
    # integer ADU of a CCD (uint16) with gain 2.5 are not taken for photon counts
    ints = [SourceFrame(np.rint(f.frame).clip(0).astype(np.uint16), f.source) for f in frames]
    conv, report = counts_converter(ints, AdaptConfig(), None)
    assert report["400x400"]["detector"] == "integrating"
    conv, report = counts_converter(ints, AdaptConfig(), 2.0)
    assert conv[(400, 400)].gain_adu_per_photon == 2.0
