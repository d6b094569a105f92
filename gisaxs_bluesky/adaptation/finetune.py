"""Fine-tune a DAE on one beamtime's unlabelled frames (Noise2Noise on thinned halves).

Each frame (photon counts; an integrating detector's ADU converted with an estimated gain)
is split by binomial thinning into two independent Poisson halves, ``thinnings`` times with
fresh random splits. For a pair of halves (a, b):

* Noise2Noise: the decoder's pattern from a must match b's log intensity (64 x 64), and the
  denoiser's 256 x 256 output from a must match b's (each direction, a -> b and b -> a). The
  halves share the expected intensity and have independent noise, so the best prediction of
  b from a is the clean pattern, never a's own noise.
* Identity: the halves' identity latents are pulled together (mean squared distance over the
  base model's calibrated within-identity spread squared).
* Anchor: the training losses of :mod:`gisaxs_bluesky.models.losses` on a small simulated set
  (reconstruction, noise kinds, structure, sizes, consistency, denoiser), so that what the
  model learnt from labelled simulations stays.

Batch-norm statistics stay those of the base model (its layers run in eval mode, the affine
weights train): a few hundred frames of one beamtime must not re-centre features that the
whole simulated set shaped. Afterwards the binner is calibrated on the halves
(:mod:`.calibration`) and everything lands in the checkpoint's card (``adaptation``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.inference import Encoder, resolve_device
from ..models.loading import list_adapted, model_cache_dir, resolve_model
from ..models.losses import training_losses
from ..models.steps import Precision, add_losses, optimizer_step, start_run
from ..models.train_config import TrainConfig
from ..models.training_data import TrainingData
from ..sim.noise_transfer import NoiseModel
from .adapt_config import TRAINABLE, AdaptConfig
from .anchor import anchor_latents, anchor_set
from .calibration import calibrate_from_groups
from .errors import AdaptationError
from .gain import GainEstimate
from .halves import build_pairs
from .n2n import pair_losses
from .noise_model import NoiseModelFitter
from .sources import FileSource, FrameSource, _geometry_dict

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "adapt",
    "model_cache_dir",
    "resolve_model",
    "load_adapted",
    "list_adapted",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptResult:
    path: Path
    card: dict
    #: the beamtime's noise model (``adapt(..., fit_noise=True)``), else None
    noise_model: NoiseModel | None = None


def load_adapted(spec: str | Path = "pretrained", device: str | torch.device = "auto") -> Encoder:
    """Encoder of :func:`resolve_model` ``(spec)``: the shipped model, a file, or a cached name."""
    model, card, _ = load_checkpoint(resolve_model(spec))
    return Encoder(model, card, device)


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _as_sources(sources: Any, geometry: Any, require_geometry: bool) -> list[FrameSource]:
    if isinstance(sources, str | Path):
        sources = [sources]
    out: list[FrameSource] = []
    paths: list[str | Path] = []
    for s in sources:
        if isinstance(s, str | Path):
            paths.append(s)
        else:
            out.append(s)
    if paths:
        out.insert(0, FileSource(paths, geometry=geometry, require_geometry=require_geometry))
    return out


def _geometry_summary(frames: Sequence[dict]) -> list[dict]:
    counts = Counter(json.dumps(f["geometry"], sort_keys=True, default=str) for f in frames)
    return [{"geometry": json.loads(k), "frames": n} for k, n in counts.items()]


def adapt(
    sources: FrameSource | str | Path | Iterable[FrameSource | str | Path],
    out: str | Path | None = None,
    *,
    name: str | None = None,
    base: str | Path = "pretrained",
    config: AdaptConfig | None = None,
    geometry: Any = None,
    require_geometry: bool = False,
    gain: GainEstimate | float | None = None,
    anchor: TrainingData | str | Path | None = None,
    max_frames: int | None = None,
    device: str = "auto",
    progress: bool = True,
    fit_noise: bool = False,
) -> AdaptResult:
    """Fine-tune ``base`` on the frames of ``sources`` and write an adapted checkpoint.

    ``sources``: FrameSource objects (:class:`FileSource`, :class:`RunSource`) and/or paths of
    detector files and folders. ``out`` (.pt, a .json card beside it) defaults to
    ``<model_cache_dir()>/<name>.pt``, so that the model loads by ``name``. ``geometry`` is
    recorded for frames whose source gives none (else "unknown"; ``require_geometry`` makes
    that an error). ``gain`` (ADU per photon, or a GainEstimate) skips the gain estimate of an
    integrating detector. ``anchor``: a binned simulated set (path or TrainingData) instead
    of the cached one of ``config.anchor_identities`` identities. ``fit_noise``: also fit
    the beamtime's noise model (:func:`~gisaxs_bluesky.adaptation.fit_noise_model`) in the
    same read of the frames, its noise head and latents those of the adapted model
    (``AdaptResult.noise_model``).
    """
    cfg = config or AdaptConfig()
    t0 = time.time()
    if out is None:
        if not name:
            raise AdaptationError("give out=PATH or name=NAME (written to the user cache)")
        out = model_cache_dir() / f"{name}.pt"
    out = Path(out)
    name = name or out.stem
    dev = resolve_device(device)
    rng = start_run(cfg.seed, cfg.num_threads)

    base_path = resolve_model(base)
    model, base_card, _ = load_checkpoint(base_path, map_location=dev)
    spread0 = float(base_card.get("binner", {}).get("spread", 1.0))
    src_list = _as_sources(sources, geometry, require_geometry)
    encoder = Encoder(model, base_card, dev)  # the preprocessing of the base model's card
    fitter = (NoiseModelFitter(detector=cfg.detector, gain=gain, gain_frames=cfg.gain_frames)
              if fit_noise else None)
    pairs, frames, detector_report = build_pairs(
        src_list, encoder, cfg, gain, _check_geometry_arg(geometry), require_geometry,
        max_frames, progress, on_frame=None if fitter is None else fitter.add)
    anchor_data = _anchor(anchor, cfg, progress)

    model.to(dev, memory_format=torch.channels_last)
    modules = TRAINABLE[cfg.trainable]
    for n, p in model.named_parameters():
        p.requires_grad_(modules is None or n.split(".")[0] in modules)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    distill_ref = anchor_latents(model, anchor_data, dev) if (
        anchor_data is not None and cfg.w_distill > 0) else None
    held = _held_out(len(frames), cfg)
    by_draw = [np.flatnonzero((pairs.draw == d) & ~held[pairs.group])
               for d in range(cfg.thinnings)]
    steps = math.ceil(int((~held).sum()) / cfg.batch_frames)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr,
                                                    total_steps=cfg.epochs * steps, pct_start=0.2)
    precision = Precision(cfg.precision, dev)
    train_cfg = TrainConfig()
    base_params = [p.detach().clone() for p in params] if cfg.w_base > 0 else None
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        _freeze_batchnorm(model)
        pool = by_draw[epoch % cfg.thinnings]
        order = torch.from_numpy(pool[rng.permutation(len(pool))])
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"adapt {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress)
        for step in bar:
            idx = order[step * cfg.batch_frames : (step + 1) * cfg.batch_frames]
            with precision.autocast():
                losses = pair_losses(model, pairs, idx, cfg, spread0, dev, rng)
                total = losses["total"]
                if anchor_data is not None and cfg.w_anchor > 0:
                    ids = torch.from_numpy(rng.choice(anchor_data.n_identities, min(
                        cfg.anchor_batch_identities, anchor_data.n_identities), replace=False))
                    sim = training_losses(model, anchor_data, anchor_data.batch(ids), train_cfg,
                                          dev, flip=bool(rng.random() < 0.5), rng=rng)
                    losses.update({f"anchor_{k}": v for k, v in sim.items()})
                    total = total + cfg.w_anchor * sim["total"]
                    if distill_ref is not None:
                        aidx = anchor_data.batch(ids)
                        xa = anchor_data.inputs[aidx].to(dev).float()
                        za = model.to_identity(model.features(xa)[0])
                        ref_z = distill_ref[aidx.to(dev)]
                        losses["anchor_distill"] = ((za.float() - ref_z) ** 2).sum(
                            1).mean() / spread0**2
                        total = total + cfg.w_distill * losses["anchor_distill"]
                if base_params is not None:
                    losses["base_l2"] = sum(((p - p0) ** 2).sum() for p, p0
                                            in zip(params, base_params, strict=True))
                    total = total + cfg.w_base * losses["base_l2"]
            optimizer_step(total, optimizer, scheduler, precision.scaler)
            add_losses(sums, losses)
            bar.set_postfix(n2n=f"{float(losses['n2n_decoder'].detach()):.3f}",
                            id=f"{float(losses['identity'].detach()):.3f}")
        entry = {"epoch": epoch + 1, "thinning": epoch % cfg.thinnings,
                 "loss": {k: round(v / steps, 5) for k, v in sums.items()},
                 "elapsed_s": round(time.time() - t0, 1)}
        history.append(entry)
        log.info("adapt epoch %d: %s", epoch + 1, entry["loss"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)

    # calibration on every half of every thinning, with the adapted weights
    adapted = Encoder(model, base_card, dev)
    z, err = _encode(adapted, pairs.x)  # a halves, then b halves
    z_whole, err_whole, noise_whole = _encode(adapted, [pairs.whole], noise=True)
    group = np.concatenate([pairs.group, pairs.group])
    draw = np.concatenate([pairs.draw, pairs.draw])
    repeat = [f["group"] if f["group"] is not None else f"#{i}" for i, f in enumerate(frames)]
    identity = np.unique(repeat, return_inverse=True)[1][group]  # per latent
    binner, calibration = calibrate_from_groups(
        z, err, group, draw, identity=identity, frame_latent=z_whole,
        frame_recon_error=err_whole, config=cfg.calibration, held_out=held)
    calibration["calibrated_on"] = "the adaptation frames below (whole and split halves)"

    card = {k: v for k, v in base_card.items() if k not in ("sha256", "binner", "metrics")}
    card.update(
        name=name,
        version=time.strftime("%Y.%m.%d.%H%M%S"),
        base_metrics=base_card.get("metrics", {}),
        binner={**binner.state_dict(), "calibrated_on": ["adaptation set of " + name]},
        adaptation={
            "base": {"name": base_card.get("name"), "version": base_card.get("version"),
                     "sha256": base_card.get("sha256"), "path": str(base_path)},
            "sources": [s.describe() for s in src_list],
            "frames": len(frames),
            "repeat_groups": len({f["group"] for f in frames if f["group"] is not None}),
            "frame_ids": [f["source"] for f in frames][:2000],
            "geometry": _geometry_summary(frames),
            "detector": detector_report,
            "split_fraction": cfg.split_fraction,
            "thinnings": cfg.thinnings,
            "config": _config_dict(cfg),
            "anchor": None if anchor_data is None else {
                "path": str(anchor_data.path), "frames": len(anchor_data),
                "identities": anchor_data.n_identities, "spec": anchor_data.description},
            "history": history,
            "losses": history[-1]["loss"] if history else {},
            "calibration": calibration,
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1),
        },
    )
    card = save_checkpoint(out, model, card)
    log.info("adapted model %s written to %s (%.0f s)", name, out, time.time() - t0)
    noise_model = None
    if fitter is not None:
        fitter.set_noise(*noise_whole, adapted.noise_kinds)
        noise_model = fitter.result(src_list, seconds=time.time() - t0, model={
            "name": name, "version": card["version"], "sha256": card["sha256"]})
    return AdaptResult(out, card, noise_model)


def _held_out(n_frames: int, cfg: AdaptConfig) -> np.ndarray:
    """Which frames the fine-tuning leaves for the thresholds (none when fewer than 2 would
    be, or fewer than 4 left to train on); drawn apart from the training's random stream."""
    n = int(round(cfg.threshold_holdout * n_frames))
    held = np.zeros(n_frames, dtype=bool)
    if n >= 2 and n_frames - n >= 4:
        held[np.random.default_rng([cfg.seed, 1]).choice(n_frames, n, replace=False)] = True
    return held


def _encode(encoder: Encoder, inputs: Sequence[torch.Tensor], batch: int = 64,
            noise: bool = False) -> tuple:
    """Identity latents and reconstruction errors of float16 inputs, in order; with ``noise``
    also (noise-head probabilities, noise latents)."""
    z, err, prob, zn = [], [], [], []
    for x in inputs:
        for s in range(0, len(x), batch):
            out = encoder.encode_preprocessed(x[s : s + batch].float().numpy())
            z.append(out["latent"][:, : encoder.identity_dim])
            err.append(out["recon_error"])
            if noise:
                prob.append(out["noise_prob"])
                zn.append(out["latent"][:, encoder.identity_dim :])
    if noise:
        return (np.concatenate(z), np.concatenate(err),
                (np.concatenate(prob), np.concatenate(zn)))
    return np.concatenate(z), np.concatenate(err)


def _check_geometry_arg(geometry: Any) -> dict | None:
    return _geometry_dict(geometry)


def _anchor(anchor, cfg: AdaptConfig, progress: bool) -> TrainingData | None:
    if isinstance(anchor, TrainingData):
        return anchor
    if anchor is not None:
        return TrainingData(anchor)
    if cfg.anchor_identities == 0 or cfg.w_anchor == 0:
        return None
    return anchor_set(cfg.anchor_identities, progress=progress)


def _config_dict(cfg: AdaptConfig) -> dict:
    d = asdict(cfg)
    d["calibration"] = cfg.calibration.to_dict()
    return d
