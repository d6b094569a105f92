"""BinningPipeline: frames -> rows, bad frames, model errors, writing through the real store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gisaxs_bluesky.models import Encoder, GisaxsDAE, make_binner
from gisaxs_bluesky.pipeline import UNPROCESSED_BIN, BinningPipeline, check_frame
from gisaxs_bluesky.store import DerivedStore

SHAPE = (140, 130)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")


def frames(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(20, size=(n, *SHAPE)).astype(np.int32)


def test_check_frame_names_the_fault():
    ok, why = check_frame(np.zeros((1, 4, 5), np.uint16))
    assert why is None and ok.shape == (4, 5)
    assert "wrong ndim 1" in check_frame(np.zeros(5))[1]
    assert "wrong dtype <U1" in check_frame(np.array([["a"]]))[1]
    assert "wrong dtype bool" in check_frame(np.zeros((3, 3), bool))[1]
    assert "differs from the run's (3, 3)" in check_frame(np.zeros((4, 4)), expected_shape=(3, 3))[1]
    nan = np.full((4, 4), np.nan)
    assert "16 NaN" in check_frame(nan, label="frame seq_num=7")[1]
    assert check_frame(nan, label="frame seq_num=7")[1].startswith("frame seq_num=7:")
    few = np.zeros((10, 10))
    few[0, 0] = np.nan
    assert check_frame(few)[1] is None  # 1 % <= default 5 %


def test_process_rows_layout(encoder):
    pipe = BinningPipeline(encoder, make_binner(encoder), batch_size=2)
    result = pipe.process(frames(5), [1, 2, 3, 4, 5], np.arange(5.0), {"x": np.arange(5.0)})
    rows = result.rows
    assert result.errors == [] and result.n_rows == 5
    assert rows["latent"].shape == (5, encoder.latent_dim) and rows["latent"].dtype == np.float32
    assert rows["noise_prob"].shape == (5, len(encoder.noise_kinds))
    assert (rows["bin_id"] >= 0).all() and rows["is_outlier"].dtype == bool
    assert rows["x"].tolist() == [0, 1, 2, 3, 4]
    assert all(isinstance(s, str) and s for s in rows["structure"])
    assert np.isfinite(rows["recon_error"]).all()
    # same frames again: identical latents, the binner now knows the bins
    again = pipe.process(frames(5), [6, 7, 8, 9, 10], np.arange(5.0), {"x": np.arange(5.0)})
    np.testing.assert_allclose(again.rows["latent"], rows["latent"], rtol=1e-5, atol=1e-6)
    assert sum(pipe.binner.summary()["counts"]) == 10  # every frame joined a bin


def test_bad_frames_get_unprocessed_rows(encoder):
    pipe = BinningPipeline(encoder, make_binner(encoder))
    good = frames(2)
    batch = [good[0], np.full(SHAPE, np.nan, np.float32), None, np.zeros(3), good[1]]
    result = pipe.process(batch, [1, 2, 3, 4, 5], np.zeros(5))
    assert result.rows["bin_id"].tolist()[1:4] == [UNPROCESSED_BIN] * 3
    assert (result.rows["bin_id"][[0, 4]] >= 0).all()
    assert np.isnan(result.rows["latent"][1:4]).all()
    text = " | ".join(result.errors)
    assert "frame seq_num=2" in text and "NaN" in text
    assert "frame seq_num=3: no frame data" in text
    assert "frame seq_num=4: wrong ndim 1" in text


def test_model_error_is_reported_not_raised(encoder):
    class Broken(Encoder):
        def encode_inputs(self, *a, **k):
            raise RuntimeError("weights corrupted")

    broken = Broken(encoder.model, encoder.card, "cpu")
    pipe = BinningPipeline(broken, make_binner(encoder))
    result = pipe.process(frames(3), [1, 2, 3], np.zeros(3))
    assert (result.rows["bin_id"] == UNPROCESSED_BIN).all()
    assert "model error for frames seq_num=[1, 2, 3]: RuntimeError: weights corrupted" in (
        result.errors[0]
    )


def test_input_lengths_must_agree(encoder):
    pipe = BinningPipeline(encoder, make_binner(encoder))
    with pytest.raises(ValueError, match="frames .*seq_nums"):
        pipe.process(frames(2), [1], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"positions\['x'\] has 1 values, expected 2"):
        pipe.process(frames(2), [1, 2], [0.0, 0.0], {"x": [0.0]})


def test_binner_for_another_model_is_refused(encoder):
    binner = make_binner(encoder)
    binner.model_sha256 = "ab" * 32
    card = dict(encoder.card, sha256="cd" * 32)
    other = Encoder(encoder.model, card, "cpu")
    with pytest.raises(ValueError, match="use make_binner"):
        BinningPipeline(other, binner)


def test_process_and_write_through_store(encoder, tiled_client, tmp_path):
    pipe = BinningPipeline(encoder, make_binner(encoder))
    store = DerivedStore(tiled_client, backup_dir=tmp_path / "backup")
    writer = pipe.open_writer(store, "raw-uid-1", scan_id=3, motors=["x"])
    batch = list(frames(3)) + [np.zeros(4)]
    pipe.process_and_write(writer, batch, [1, 2, 3, 4], np.arange(4.0), {"x": np.arange(4.0)})
    writer.finish("complete")
    ds = writer.read()
    assert ds["seq_num"].values.tolist() == [1, 2, 3, 4]
    assert ds["bin_id"].values[-1] == UNPROCESSED_BIN
    assert ds.attrs["raw_uid"] == "raw-uid-1" and ds.attrs["model"]["name"] == "untrained"
    assert any("wrong ndim 1" in e for e in ds.attrs["errors"])
    np.testing.assert_allclose(ds["x"].values, [0, 1, 2, 3])


def test_degenerate_frames_are_refused_and_open_no_bin(encoder):
    """An all-gap frame (every pixel -1), a constant frame and a float64 frame of 1e308 get
    UNPROCESSED rows with the reason; they open no bin and the good frames bin as usual."""
    pipe = BinningPipeline(encoder, make_binner(encoder))
    good = frames(2)
    all_gap = np.full(SHAPE, -1, np.int32)
    constant = np.full(SHAPE, 7, np.int32)
    huge = good[0].astype(np.float64)
    huge[10:20, 10:20] = 1e308
    result = pipe.process([good[0], all_gap, constant, huge, good[1]], [1, 2, 3, 4, 5],
                          np.arange(5.0))
    rows = result.rows
    assert rows["bin_id"].tolist()[1:4] == [UNPROCESSED_BIN] * 3
    assert (rows["bin_id"][[0, 4]] >= 0).all()
    assert np.isfinite(rows["latent"][[0, 4]]).all()
    errors = " | ".join(result.errors)
    assert "frame seq_num=2: no data pixel (all 18200 pixels are gaps" in errors
    assert "frame seq_num=3: no signal (all 18200 data pixels are 7)" in errors
    assert "frame seq_num=4: pixel values up to 1e+308 exceed the float32 range" in errors
    assert sum(pipe.binner.summary()["counts"]) == 2  # only the good frames joined bins


def test_non_finite_latents_are_not_binned(encoder):
    """A model pass that returns NaN for one frame (a fault no real frame here provokes): that
    frame's row is UNPROCESSED with the reason, the binner never sees the NaN."""

    class NaNEncoder(Encoder):
        def encode_inputs(self, x, **kwargs):
            out = super().encode_inputs(x, **kwargs)
            out.latent[1] = np.nan
            return out

    torch.manual_seed(0)
    enc = NaNEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    pipe = BinningPipeline(enc, make_binner(enc))
    result = pipe.process(frames(3), [1, 2, 3], np.arange(3.0))
    assert result.rows["bin_id"][1] == UNPROCESSED_BIN and (result.rows["bin_id"][[0, 2]] >= 0).all()
    assert any("non-finite latents for frames seq_num=[2]" in e for e in result.errors)
    assert sum(pipe.binner.summary()["counts"]) == 2
