"""Part 3: the denoising-autoencoder binning callback, subscribed to the RunEngine.

Model: GISAXS_MODEL = "pretrained" (default), a checkpoint path, or "untrained[:seed]"
(plumbing only). Falls back to an untrained model, loudly, when the weights are missing.
"""
from gisaxs_bluesky.callbacks import DAEBinningCallback
from gisaxs_bluesky.replay import load_model as _load_model

MODEL = os.environ.get("GISAXS_MODEL", "pretrained")
try:
    encoder = _load_model(MODEL, os.environ.get("GISAXS_DEVICE", "auto"))
except Exception as _exc:  # noqa: BLE001
    print(f"WARNING: model {MODEL!r} unavailable ({_exc}); using an UNTRAINED model "
          "(bins are meaningless)")
    encoder = _load_model("untrained", "cpu")
dae_callback = DAEBinningCallback(tiled_client, encoder=encoder, write_lock=tiled_write_lock)
dae_token = RE.subscribe(dae_callback)
print(f"DAE binning: model {encoder.name}-{encoder.version} -> "
      f"/{dae_callback.config.root}/<uid>-{encoder.name}-{encoder.version}")
