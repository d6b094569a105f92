"""Checkpoint integrity (issue 12): damaged weights without their card, NaN weights, and a bad
``untrained:<seed>`` model spec are refused with a message naming the fault."""

from __future__ import annotations

import logging

import pytest
import torch

from gisaxs_bluesky import replay
from gisaxs_bluesky.models import GisaxsDAE, ModelSpecError, save_checkpoint
from gisaxs_bluesky.models.checkpoint import CheckpointError, card_path, load_checkpoint


def saved(tmp_path, name="m.pt"):
    torch.manual_seed(0)
    model = GisaxsDAE()
    path = tmp_path / name
    save_checkpoint(path, model, {"name": "dae-test", "version": "1"})
    return path, model


def test_checkpoint_round_trip_is_checked_without_its_card(tmp_path, caplog):
    path, model = saved(tmp_path)
    card_path(path).unlink()
    loaded, card, payload = load_checkpoint(path)
    assert "weights_sha256" in payload
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_damaged_weights_without_card_are_refused(tmp_path):
    path, _ = saved(tmp_path)
    card_path(path).unlink()  # no card: only the digest inside the payload can tell
    data = bytearray(path.read_bytes())
    # flip bytes inside the largest tensor's data (the zip stores tensors uncompressed)
    state = torch.load(path, weights_only=True)["state_dict"]
    name, big = max(state.items(), key=lambda kv: kv[1].numel())
    needle = big.flatten()[100:116].numpy().tobytes()
    at = bytes(data).find(needle)
    assert at > 0, f"tensor {name} bytes not found in the file"
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_nan_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model = GisaxsDAE()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model, {"name": "dae-test", "version": "nan"})
    with pytest.raises(CheckpointError, match="non-finite values"):
        load_checkpoint(path)


def test_old_checkpoint_without_digest_or_card_warns(tmp_path, caplog):
    path, model = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["weights_sha256"]
    torch.save(payload, path)
    card_path(path).unlink()
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path)
    assert "integrity cannot be checked" in caplog.text


def test_untrained_seed_must_be_an_integer():
    with pytest.raises(ModelSpecError, match="seed after 'untrained:' must be an integer"):
        replay.load_model("untrained:abc")
    assert replay.load_model("untrained:3").version == "seed3"
