"""DAE: preprocessing, encode contract, checkpoints, binner state, and a tiny real training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gisaxs_bluesky.binning import OnlineBinner
from gisaxs_bluesky.config import BinnerConfig, ModelConfig
from gisaxs_bluesky.models import (
    CheckpointError,
    Encoder,
    GisaxsDAE,
    load_checkpoint,
    load_encoder,
    preprocess,
    save_checkpoint,
)
from gisaxs_bluesky.models.preprocess import frame_scale, preprocess_fine
from gisaxs_bluesky.sim import NOISE_KINDS, NoiseSpec, Sample, simulate

CARD = {"name": "test-dae", "version": "0", "preprocess": {"out_shape": [128, 128]}}


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    noise = NoiseSpec(5.0, {"poisson": 1.0, "gaps": 1.0})
    return np.stack([simulate(Sample(radius_nm=r), noise=noise, seed=i, compute_binning=8).counts
                     for i, r in enumerate((4.0, 5.0, 6.0))])


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(GisaxsDAE(), dict(CARD), device="cpu")


def test_preprocess_any_dtype_gives_finite_channels(frames):
    for dtype in (np.int32, np.uint16, np.float32, np.float64, np.int64, np.uint8, bool,
                  np.float16, ">i4", ">f8"):
        x = preprocess(np.clip(frames[0], 0, 60000).astype(dtype))
        assert x.shape == (8, 128, 128) and x.dtype == np.float32
        assert np.isfinite(x).all()
    x = preprocess(frames[0])
    # gap rows 195-211 of 1043 map to model rows ~24-26: flagged there, valid elsewhere
    assert x[2, 25].mean() == pytest.approx(1.0) and x[2, 60, :50].max() == 0.0
    assert x[0].max() > 1.0


def test_preprocess_tells_tracks_from_hot_pixels_and_finds_dead_pixels():
    frame = np.random.default_rng(0).poisson(20.0, (1043, 981)).astype(np.int32)
    base = preprocess(frame)
    hot, track, dead = frame.copy(), frame.copy(), frame.copy()
    hot[500, 500] = 50_000  # one hot pixel: a high block max, no bright neighbour
    track[500, 500:512] = 3_000  # a cosmic track: neighbours share the high value
    dead[500, 500] = 0  # one dead pixel among ~20 counts (Poisson: exp(-20) chance)
    block = (500 * 128 // 1043, 500 * 128 // 981)
    x_hot, x_track, x_dead = preprocess(hot), preprocess(track), preprocess(dead)
    assert x_hot[3][block] > 2 and x_track[3][block] > 2  # log max over mean: both bright
    assert x_hot[6][block] < 0.5 < 2 < x_track[6][block]  # log pair max: only the track
    assert base[7].max() == 0 and x_dead[7][block] == pytest.approx(1 / 64, rel=0.2)
    fine = preprocess_fine(frame, frame_scale(frame))
    assert fine.shape == (2, 256, 256) and np.isfinite(fine).all()
    assert fine[0].mean() == pytest.approx(np.log(2), abs=0.05) and fine[1].min() == 1.0


def test_one_frame_in_two_halves_gives_identical_input(frames):
    """A single frame is preprocessed as two row halves on two threads: bit-identical."""
    from concurrent.futures import ThreadPoolExecutor

    from gisaxs_bluesky.models.preprocess import preprocess_with_scale
    from gisaxs_bluesky.sim import Geometry
    from gisaxs_bluesky.sim.simulate import nominal_mask

    spiky = frames[0].copy()
    spiky[520:523, 400] = 5000  # a track across the middle rows, where the halves meet
    spiky[521, 700] = 0
    with ThreadPoolExecutor(2) as pool:
        for frame, mask in ((spiky, None), (frames[1], nominal_mask(Geometry())),
                            (frames[2].astype(np.float32), None)):
            whole, scale = preprocess_with_scale(frame, mask, None)
            halves, scale2 = preprocess_with_scale(frame, mask, None, pool=pool)
            assert scale == scale2
            np.testing.assert_array_equal(whole, halves)


def test_concurrent_first_calls_and_thread_counts_agree(frames):
    """Many threads preprocessing frames of dtypes not seen before in this process (the first
    call per type compiles or loads the numba passes, one thread at a time) give what one
    thread gives; an encoder's preprocessing thread count changes nothing but the speed."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    bk = importlib.import_module("gisaxs_bluesky.models.block_kernels")
    kinds = (np.uint16, np.int64, np.float64, ">i4")
    jobs = [(frames[i % 3].astype(kinds[i % 4]), None if i % 2 else frames[0] < 0)
            for i in range(16)]
    for dtype in kinds:  # forget that these types ran here before
        bk._compiled.discard(np.dtype(dtype).newbyteorder("=").str)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: preprocess(*job), jobs))
    assert {np.dtype(k).newbyteorder("=").str for k in kinds} <= bk._compiled
    for (frame, mask), got in zip(jobs, together, strict=True):
        np.testing.assert_array_equal(got, preprocess(frame, mask))

    one = Encoder(GisaxsDAE(), dict(CARD), device="cpu", preprocess_threads=1)
    three = Encoder(one.model, dict(CARD), device="cpu", preprocess_threads=3)
    assert (one.preprocess_threads, three.preprocess_threads) == (1, 3)
    np.testing.assert_array_equal(one.preprocess(frames), three.preprocess(frames))
    with pytest.raises(ValueError, match="preprocess_threads"):
        Encoder(one.model, dict(CARD), device="cpu", preprocess_threads=0)


def test_integer_pass_gives_what_the_general_pass_gives(frames):
    """Counting-detector frames take a vectorised pass-1 kernel: per block sums, counts and
    maxima identical to the general one, with flags (-1, -2), negatives, zeros and a mask,
    over the whole frame and over a block-row-aligned part."""
    import importlib

    from gisaxs_bluesky.sim import Geometry
    from gisaxs_bluesky.sim.simulate import nominal_mask

    pp = importlib.import_module("gisaxs_bluesky.models.preprocess")  # the module, not the function
    bk = importlib.import_module("gisaxs_bluesky.models.block_kernels")
    frame = frames[0].astype(np.int64)
    frame[100:140, 200:260] = 0
    frame[300:304, :] = -1
    frame[500, 500] = -2
    frame[600, 610] = -7
    frame[700, 700] = 10**7
    h, w = 128, 128
    r_idx, c_idx = pp._index(frame.shape[0], h), pp._index(frame.shape[1], w)
    split = int(pp.block_edges(frame.shape[0], h)[h // 2])
    for dtype in (np.int32, np.int16, np.int64, np.uint16):
        f = (np.abs(frame) if dtype == np.uint16 else frame).astype(dtype)
        assert bk.block_stats_for(f) is bk.block_stats_int
        for mask in (None, nominal_mask(Geometry())):
            m, has = pp._check_mask(mask, f.shape)
            for rows in ((0, f.shape[0]), (split, f.shape[0])):
                a = bk.block_stats(f, m, has, r_idx, c_idx, h, w, *rows)
                b = bk.block_stats_int(f, m, has, r_idx, c_idx, h, w, *rows)
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
    assert bk.block_stats_for(frame.astype(np.float32)) is bk.block_stats
    assert bk.block_stats_for(frame.astype(np.uint64)) is bk.block_stats


def test_preprocess_rejects_bad_frames_by_name():
    with pytest.raises(ValueError, match=r"2-D.*\(5, 5, 5\)"):
        preprocess(np.zeros((5, 5, 5)))
    with pytest.raises(ValueError, match="dtype"):
        preprocess(np.full((300, 300), "a"))
    with pytest.raises(ValueError, match="mask shape"):
        preprocess(np.zeros((300, 300)), mask=np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="smaller than the model resolution"):
        preprocess(np.zeros((50, 300)))


def test_encode_shapes_and_dtypes(encoder, frames):
    result = encoder.encode(frames, batch_size=2)
    config = ModelConfig()
    assert result.latent.shape == (3, config.latent_dim) and result.latent.dtype == np.float32
    assert result.identity_latent.shape == (3, config.identity_dim)
    assert result.noise_prob.shape == (3, len(NOISE_KINDS))
    assert ((result.noise_prob >= 0) & (result.noise_prob <= 1)).all()
    assert result.recon_error.shape == (3,) and (result.recon_error >= 0).all()
    assert result.structure_prob.shape == (3, 5)
    np.testing.assert_allclose(result.structure_prob.sum(1), 1, rtol=1e-5)
    assert (result.radius_nm > 0).all() and result.distance_nm.shape == (3,)
    single = encoder.encode(frames[0])
    np.testing.assert_allclose(single.latent[0], result.latent[0], rtol=1e-4, atol=1e-5)
    assert result.denoised is None
    denoised = encoder.encode(frames[:2], return_denoised=True)
    assert denoised.denoised.shape == (2, 256, 256) and np.isfinite(denoised.denoised).all()
    np.testing.assert_allclose(denoised.latent, result.latent[:2], rtol=1e-4, atol=1e-5)


def test_nan_and_flagged_pixels_give_finite_latents(encoder, frames):
    frame = frames[0].astype(np.float64)
    frame[100:300, 100:300] = np.nan
    frame[500:520] = -2
    frame[::7, ::11] = np.inf
    result = encoder.encode(frame)
    assert np.isfinite(result.latent).all() and np.isfinite(result.recon_error).all()
    all_bad = np.full((400, 400), np.nan)
    assert np.isfinite(encoder.encode(all_bad).latent).all()


def test_encode_rejects_empty_and_wrong_rank(encoder):
    with pytest.raises(ValueError, match="N >= 1"):
        encoder.encode(np.zeros((0, 300, 300)))
    with pytest.raises(ValueError, match=r"got \(2, 2, 300, 300\)"):
        encoder.encode(np.zeros((2, 2, 300, 300)))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, encoder, frames):
    path = tmp_path / "model.pt"
    card = save_checkpoint(path, encoder.model, dict(CARD))
    assert len(card["sha256"]) == 64 and (tmp_path / "model.json").is_file()
    loaded = load_encoder(path, device="cpu")
    a, b = encoder.encode(frames), loaded.encode(frames)
    np.testing.assert_array_equal(a.latent, b.latent)
    np.testing.assert_array_equal(a.recon_error, b.recon_error)
    assert loaded.sha256 == card["sha256"] and loaded.name == "test-dae"


def test_corrupt_truncated_and_mismatched_checkpoints_fail_clearly(tmp_path, encoder):
    path = tmp_path / "model.pt"
    save_checkpoint(path, encoder.model, dict(CARD))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is corrupt or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    save_checkpoint(other, GisaxsDAE(ModelConfig(identity_dim=4)), dict(CARD))
    payload = torch.load(other, weights_only=True)
    payload["card"]["model"]["identity_dim"] = 16  # card says one architecture, weights another
    torch.save(payload, other)
    (tmp_path / "other.json").unlink()
    with pytest.raises(CheckpointError, match="do not match its architecture"):
        load_checkpoint(other)
    # a card whose sha256 does not belong to the weights
    (tmp_path / "model.json").write_text((tmp_path / "model.json").read_text().replace(
        load_encoder(path).sha256, "0" * 64))
    with pytest.raises(CheckpointError, match="does not match its card"):
        load_checkpoint(path)


def test_checkpoint_from_before_noise_hidden_loads(tmp_path):
    """Cards written before ``noise_hidden`` existed had a 64-unit noise layer and no entry."""
    old = GisaxsDAE(ModelConfig(noise_dim=8, noise_hidden=64))
    path = tmp_path / "old.pt"
    save_checkpoint(path, old, dict(CARD))
    payload = torch.load(path, weights_only=True)
    del payload["card"]["model"]["noise_hidden"]
    torch.save(payload, path)
    (tmp_path / "old.json").unlink()
    model, card, _ = load_checkpoint(path)
    assert model.config.noise_hidden == 64 and model.config.latent_dim == 24
    x = torch.randn(2, 8, 128, 128)
    old.eval(), model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(x)["noise_logits"], old(x)["noise_logits"])


def test_binner_groups_opens_flags_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = rng.integers(0, 3, 300)
    z = centres[labels] + rng.normal(0, 0.3, (300, 2))
    err = rng.uniform(0, 1, 300)
    binner = OnlineBinner(BinnerConfig()).calibrate(z, labels, err)
    assert 0.5 < binner.spread < 1.5 and 0.9 < binner.recon_threshold <= 1.0
    result = binner.assign(z, np.full(300, 0.1))
    assert binner.n_bins == 3
    # one bin per identity, stable integer ids in order of appearance
    for k in range(3):
        assert len(set(result.bin_id[labels == k])) == 1
    assert result.is_outlier.mean() < 0.05
    far = binner.assign(np.array([[30.0, 30.0], [0.0, 0.0]]), np.array([0.1, 50.0]))
    assert far.new_bin[0] and far.is_outlier[0] and far.outlier_score[0] > 1
    assert far.bin_id[1] == -1 and far.is_outlier[1]  # unexplainable frame: no bin
    path = tmp_path / "binner.json"
    binner.save(path)
    restored = OnlineBinner.load(path)
    assert restored.state_dict() == binner.state_dict()
    again = restored.assign(z[:10], np.full(10, 0.1))
    np.testing.assert_array_equal(again.bin_id, binner.copy().assign(z[:10], np.full(10, 0.1)).bin_id)
    with pytest.raises(ValueError, match="dimension 5"):
        restored.assign(np.zeros((1, 5)), np.zeros(1))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json cannot be read"):
        OnlineBinner.load(tmp_path / "bad.json")


def test_empty_binner_state_round_trips():
    empty = OnlineBinner(spread=0.5, recon_threshold=2.0, model_sha256="abc")
    copy = OnlineBinner.from_state(empty.state_dict())
    assert copy.n_bins == 0 and copy.spread == 0.5 and copy.model_sha256 == "abc"
    assert copy.assign(np.zeros((2, 3)), np.zeros(2)).bin_id.tolist() == [0, 0]


def test_binner_nan_latent_is_outlier_not_a_crash():
    binner = OnlineBinner(spread=1.0, recon_threshold=1.0)
    result = binner.assign(np.array([[np.nan, 0.0], [0.0, 0.0]]), np.array([0.1, 0.1]))
    assert result.bin_id.tolist() == [-1, 0] and result.is_outlier.tolist() == [True, False]
