"""Real-noise transfer: the fitted noise model recovers known parameters, its file round-trips
and fails clearly, and `simulate --noise-from` makes frames with the model's statistics."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from gisaxs_bluesky.adaptation import ArraySource, FileSource, load_adapted
from gisaxs_bluesky.adaptation.noise_model import fit_noise_model
from gisaxs_bluesky.adaptation.sources import AdaptationError
from gisaxs_bluesky.cli import main
from gisaxs_bluesky.models import load_pretrained
from gisaxs_bluesky.models.dataset import DatasetSpec, generate
from gisaxs_bluesky.sim import Geometry, Sample
from gisaxs_bluesky.sim.noise_transfer import (
    InstrumentNoise,
    NoiseModel,
    NoiseModelError,
    apply_noise_model,
    load_noise_model,
    noise_model_paths,
    save_noise_model,
    simulate_with_noise_model,
)

SHAPE = (256, 256)
BACKGROUND = 4.0  # photons per pixel
HOT = 5e-4
DEAD = 2e-3


def _pattern(dose: float = 10.0) -> np.ndarray:
    """A GISAXS-like expected intensity: a bright lobe with rings in the upper part, nothing
    in the lower 90 rows (there the frame is background only)."""
    r, c = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float64)
    rad = np.hypot(r - 30, c - 128)
    cut = 1 / (1 + np.exp((r - 150) / 4))
    return dose * 12 * np.exp(-rad / 50) * (1.2 + np.cos(rad / 5)) * cut


def _synthetic(n: int, rng: np.random.Generator, gain: float | None = None, read: float = 0.0):
    """Frames with known background, hot and dead pixels, a flagged inactive column band,
    counting (gain None) or integrating (ADU = gain * photons + Normal(0, read))."""
    frames, inactive = [], np.zeros(SHAPE, bool)
    inactive[:, 120:124] = True
    for _ in range(n):
        photons = rng.poisson(_pattern() + BACKGROUND).astype(np.float64)
        flat = np.flatnonzero(~inactive)
        hot = rng.choice(flat, rng.binomial(flat.size, HOT), replace=False)
        photons.flat[hot] = 10 ** rng.normal(4.0, 0.2, hot.size)
        dead = rng.choice(flat, rng.binomial(flat.size, DEAD), replace=False)
        photons.flat[dead] = 0
        if gain is None:
            frame = photons.astype(np.int32)
            frame[inactive] = -1
        else:
            frame = (photons * gain + rng.normal(0, read, SHAPE)).astype(np.float32)
            frame[inactive] = np.nan
        frames.append(frame)
    return frames, inactive


def _bright_fraction(inactive: np.ndarray) -> float:
    """Share of valid pixels whose neighbours are bright enough to tell a dead pixel (>= 15)."""
    return float(((_pattern() + BACKGROUND) >= 15)[~inactive].mean())


def test_fit_recovers_known_counting_parameters():
    rng = np.random.default_rng(0)
    frames, inactive = _synthetic(4, rng)
    model = fit_noise_model(ArraySource(frames, label="synthetic"), progress=False)
    inst = model.instruments[0]
    assert inst.detector == "counting" and inst.frames == 4
    assert inst.gain_adu_per_photon == 1.0
    # hot: +- 15 % (Poisson on about 130 hot pixels over 4 frames: 9 %)
    assert inst.hot_pixel_fraction == pytest.approx(HOT, rel=0.15)
    assert inst.hot_log10_mean == pytest.approx(4.0, abs=0.05)
    # dead: +- 15 %, over the pixels whose neighbours are bright
    assert inst.dead_pixel_fraction == pytest.approx(DEAD, rel=0.15)
    # background: the floor of the frames is BACKGROUND + the pattern's faint tail
    median = np.median([np.median(f[~inactive]) for f in frames])
    assert inst.background_fraction * median == pytest.approx(BACKGROUND, rel=0.1)
    assert np.array_equal(inst.inactive, inactive)
    assert inst.inactive_value == -1
    assert np.exp(inst.dose_log_mean) == pytest.approx(median, rel=0.05)


@pytest.mark.parametrize("gain,read", [(2.0, 3.0), (0.5, 1.0)])
def test_fit_recovers_gain_and_read_noise_of_an_integrating_detector(gain, read):
    rng = np.random.default_rng(1)
    frames, inactive = _synthetic(2, rng, gain=gain, read=read)
    inst = fit_noise_model(ArraySource(frames), progress=False).instruments[0]
    assert inst.detector == "integrating"
    assert inst.gain_adu_per_photon == pytest.approx(gain, rel=0.05)
    assert inst.read_noise_adu == pytest.approx(read, rel=0.25)
    assert inst.hot_pixel_fraction == pytest.approx(HOT, rel=0.25)
    assert np.array_equal(inst.inactive, inactive)  # NaN in every frame


def _known(**kw) -> InstrumentNoise:
    inactive = np.zeros(SHAPE, bool)
    inactive[100:110] = True
    base = {"shape": SHAPE, "detector": "counting", "frames": 3, "dose_log_mean": np.log(20.0),
                "dose_log_std": 0.0, "dose_range": (20.0, 20.0), "background_fraction": 0.5,
                "hot_pixel_fraction": 1e-3, "hot_log10_mean": 4.2, "hot_log10_std": 0.2,
                "dead_pixel_fraction": 3e-3, "inactive": inactive,
                "kind_probability": {"zingers": 0.0, "parasitic": 0.0},
                "noise_latent_mean": np.arange(4, dtype=np.float32),
                "noise_latent_std": np.ones(4, np.float32)}
    return InstrumentNoise(**{**base, **kw})


def test_file_round_trip(tmp_path):
    model = NoiseModel((_known(), _known(detector="integrating", gain_adu_per_photon=1.7,
                                         read_noise_adu=2.5, inactive=None, shape=(64, 80))),
                       {"frames": 6})
    path = save_noise_model(model, tmp_path / "beamtime")
    assert path == tmp_path / "beamtime.json" and (tmp_path / "beamtime.npz").is_file()
    back = load_noise_model(tmp_path / "beamtime.npz")  # either file names the model
    assert back.provenance == {"frames": 6} and back.version == model.version
    for a, b in zip(model.instruments, back.instruments, strict=True):
        assert a == b  # every scalar
        for key in ("inactive", "noise_latent_mean", "noise_latent_std"):
            va, vb = getattr(a, key), getattr(b, key)
            assert (va is None and vb is None) or np.array_equal(va, vb)


def test_missing_and_corrupt_files_name_the_file_and_the_fault(tmp_path):
    with pytest.raises(NoiseModelError, match=r"nowhere\.json: file not found"):
        load_noise_model(tmp_path / "nowhere")
    jpath = save_noise_model(NoiseModel((_known(),)), tmp_path / "m")
    _, npath = noise_model_paths(jpath)
    doc = json.loads(jpath.read_text())

    def write(d):
        jpath.write_text(json.dumps(d))

    jpath.write_text("{not json")
    with pytest.raises(NoiseModelError, match=r"m\.json: not valid JSON"):
        load_noise_model(jpath)
    write({**doc, "version": 99})
    with pytest.raises(NoiseModelError, match="version 99"):
        load_noise_model(jpath)
    write({k: v for k, v in doc.items() if k != "instruments"})
    with pytest.raises(NoiseModelError, match="key 'instruments' missing"):
        load_noise_model(jpath)
    write({**doc, "instruments": [{k: v for k, v in doc["instruments"][0].items()
                                   if k != "gain_adu_per_photon"}]})
    with pytest.raises(NoiseModelError, match=r"instrument 0 lacks \['gain_adu_per_photon'\]"):
        load_noise_model(jpath)
    write({**doc, "instruments": [{**doc["instruments"][0], "detector": "film"}]})
    with pytest.raises(NoiseModelError, match="instrument 0: detector='film'"):
        load_noise_model(jpath)
    write(doc)
    npath.write_bytes(npath.read_bytes()[:100])
    with pytest.raises(NoiseModelError, match=r"m\.npz: sha256 does not match"):
        load_noise_model(jpath)
    npath.unlink()
    with pytest.raises(NoiseModelError, match=r"arrays file .*m\.npz is not found"):
        load_noise_model(jpath)


def test_applied_noise_is_what_a_fit_finds():
    """apply_noise_model on a clean pattern, then the fit: the model's own numbers back."""
    inst = _known()
    rng = np.random.default_rng(3)
    expected = _pattern(2.0)
    frames = [apply_noise_model(expected * 20 / np.median(expected), inst, rng)
              for _ in range(3)]
    fit = fit_noise_model(ArraySource(frames), progress=False).instruments[0]
    assert fit.hot_pixel_fraction == pytest.approx(1e-3, rel=0.15)
    assert fit.hot_log10_mean == pytest.approx(4.2, abs=0.05)
    assert fit.dead_pixel_fraction == pytest.approx(3e-3, rel=0.2)
    assert fit.background_fraction == pytest.approx(0.5, rel=0.1)
    assert np.array_equal(fit.inactive, inst.inactive)


def test_simulate_with_noise_model_labels_and_integrating_adu():
    inst = _known(detector="integrating", gain_adu_per_photon=2.5, read_noise_adu=3.0,
                  shape=(1043, 981), inactive=None, dead_pixel_fraction=0.0)
    rng = np.random.default_rng(4)
    sample = Sample("spheres_paracrystal", radius_nm=5, distance_nm=30)
    result, spec = simulate_with_noise_model(sample, Geometry(), NoiseModel((inst,)), rng,
                                             compute_binning=6)
    assert result.counts.dtype == np.float32
    assert spec.kinds.keys() >= {"poisson", "readout", "hot_pixels"}
    assert result.labels["noise"]["kinds"] == spec.labels()["kinds"]
    assert spec.dose_counts == pytest.approx(20.0)
    fit = fit_noise_model(ArraySource([result.counts], mask=result.mask),
                          progress=False).instruments[0]
    assert fit.gain_adu_per_photon == pytest.approx(2.5, rel=0.05)
    assert fit.read_noise_adu == pytest.approx(3.0, rel=0.25)


def test_simulate_noise_from_makes_frames_with_the_models_statistics(tmp_path):
    """Full frames of `simulate --noise-from`: hot pixels, inactive area, dose and background
    of the model, within the tolerances of the fit."""
    shape = (1043, 981)
    inactive = np.zeros(shape, bool)
    inactive[:, 300:310] = True
    inst = _known(shape=shape, inactive=inactive, dose_range=(30.0, 30.0),
                  dose_log_mean=np.log(30.0), background_fraction=0.6)
    path = save_noise_model(NoiseModel((inst,)), tmp_path / "nm")
    out = tmp_path / "sim.h5"
    assert main(["simulate", str(out), "--identities", "2", "--frames-per-identity", "1",
                 "--full", "--workers", "1", "--noise-from", str(path)]) == 0
    with h5py.File(out) as f:
        counts = f["counts"][:]
        assert f["dose_counts"][:] == pytest.approx([30.0, 30.0])
        noise_kinds = [k.decode() if isinstance(k, bytes) else k for k in f.attrs["noise_kinds"]]
        vec = f["noise_vector"][:]
    assert vec[:, noise_kinds.index("hot_pixels")].all() and vec[:, noise_kinds.index("gaps")].all()
    frames = [c.astype(np.int32) for c in counts]
    mask = _beamstop_and_gaps()
    fit = fit_noise_model(ArraySource(frames, mask=mask), progress=False).instruments[0]
    assert fit.inactive[inactive].all()
    assert fit.hot_pixel_fraction == pytest.approx(1e-3, rel=0.15)
    assert np.exp(fit.dose_log_mean) == pytest.approx(30.0, rel=0.1)
    assert fit.background_fraction == pytest.approx(0.6, rel=0.1)


def _beamstop_and_gaps() -> np.ndarray:
    from gisaxs_bluesky.sim import nominal_mask

    return nominal_mask(Geometry())


def test_noise_fit_and_simulate_cli_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(5)
    frames, _ = _synthetic(3, rng)
    folder = tmp_path / "beamtime"
    folder.mkdir()
    for i, f in enumerate(frames):
        np.save(folder / f"frame{i}.npy", f)
    out = tmp_path / "noise"
    assert main(["noise-fit", str(folder), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["frames"] == 3 and printed["noise_model"] == str(tmp_path / "noise.json")
    model = load_noise_model(out)
    inst = model.instruments[0]
    assert set(inst.kind_probability) == set(load_pretrained("cpu").noise_kinds)
    assert inst.noise_latent_mean is not None and inst.noise_latent_mean.ndim == 1
    assert model.provenance["model"]["sha256"]
    sim = tmp_path / "sim.h5"
    assert main(["simulate", str(sim), "--identities", "2", "--workers", "1",
                 "--noise-from", str(out)]) == 0
    assert DatasetSpec(noise_from=str(out)).noise_from
    with h5py.File(sim) as f:
        assert f["inputs"].shape[0] == 4 and np.isfinite(f["inputs"][:]).all()
    # faults: an empty set, a missing model file
    (tmp_path / "empty").mkdir()
    assert main(["noise-fit", str(tmp_path / "empty"), "-o", str(out), "--no-model"]) == 2
    assert main(["simulate", str(sim), "--noise-from", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "absent.json: file not found" in err


def test_empty_set_is_an_error():
    with pytest.raises(AdaptationError):
        fit_noise_model(ArraySource([]), progress=False)


def test_adapt_writes_the_noise_model_with_the_adapted_model(tmp_path, capsys):
    """`adapt --noise-model-out` fits the frames' noise with the adapted model's noise head;
    `--trainable identity` moves the identity MLP only."""
    import tifffile
    import torch

    from gisaxs_bluesky.models import load_checkpoint, pretrained_path
    from gisaxs_bluesky.sim import NoiseSpec, simulate

    folder = tmp_path / "beamtime"
    folder.mkdir()
    for i, structure in enumerate(["lamellar", "lamellar", "spheres_dilute", "spheres_dilute"]):
        r = simulate(Sample(structure, radius_nm=5, distance_nm=30), Geometry(),
                     NoiseSpec(dose_counts=5.0, kinds={"poisson": 1, "gaps": 1}), seed=i,
                     compute_binning=6)
        tifffile.imwrite(folder / f"frame{i}.tif", r.counts[:400, 300:700])
    anchor = tmp_path / "anchor.h5"
    generate(anchor, DatasetSpec(n_identities=2, frames_per_identity=2, seed=7), workers=1,
             progress=False)
    out, nm = tmp_path / "bt.pt", tmp_path / "bt-noise"
    assert main(["adapt", str(folder), "--out", str(out), "--epochs", "1", "--batch-frames",
                 "2", "--anchor", str(anchor), "--device", "cpu", "--no-progress",
                 "--trainable", "identity", "--noise-model-out", str(nm)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["noise_model"] == str(tmp_path / "bt-noise.json")
    model = load_noise_model(nm)
    assert model.provenance["model"]["sha256"] == printed["sha256"]
    inst = model.instruments[0]
    assert inst.shape == (400, 400) and inst.frames == 4 and inst.detector == "counting"
    assert inst.inactive.any()  # the module gap rows flagged -1
    # read once inside adapt = a second read of the files with the adapted model
    again = fit_noise_model(FileSource(folder), encoder=load_adapted(out, "cpu"),
                            progress=False).instruments[0]
    assert again.dose_log_mean == pytest.approx(inst.dose_log_mean)
    assert again.hot_pixel_fraction == inst.hot_pixel_fraction
    np.testing.assert_array_equal(again.inactive, inst.inactive)
    for kind, p in again.kind_probability.items():
        assert inst.kind_probability[kind] == pytest.approx(p, abs=0.02), kind
    np.testing.assert_allclose(inst.noise_latent_mean, again.noise_latent_mean, atol=0.05)
    adapted, card, _ = load_checkpoint(out)
    base, _, _ = load_checkpoint(pretrained_path())
    assert card["adaptation"]["config"]["trainable"] == "identity"
    for k, v in adapted.state_dict().items():
        if not k.startswith("to_identity."):
            torch.testing.assert_close(v, base.state_dict()[k])
    assert not torch.equal(adapted.to_identity[1].weight, base.to_identity[1].weight)
