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
* Anchor: the training losses of :mod:`gisaxs_bluesky.models.train` on a small simulated set
  (reconstruction, noise kinds, structure, sizes, consistency, denoiser), so that what the
  model learnt from labelled simulations stays.

Batch-norm statistics stay those of the base model (its layers run in eval mode, the affine
weights train): a few hundred frames of one beamtime must not re-centre features that the
whole simulated set shaped. Afterwards the binner is calibrated on the halves
(:mod:`.calibration`) and everything lands in the checkpoint's card (``adaptation``).
"""

from __future__ import annotations

import dataclasses
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
from torch.nn import functional as F  # noqa: N812 - as in models/train.py
from tqdm import tqdm

from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.dataset import DatasetSpec, generate
from ..models.inference import Encoder, resolve_device
from ..models.loading import list_adapted, model_cache_dir, resolve_model
from ..models.train import TrainConfig, TrainingData, _denoise_errors, _losses, autocast_dtype
from .calibration import CalibrationConfig, calibrate_from_groups
from .gain import GainError, GainEstimate, estimate_gain, looks_counting, to_photon_counts
from .sources import AdaptationError, FileSource, FrameSource, SourceFrame, iter_frames
from .thinning import binomial_split

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "adapt",
    "model_cache_dir",
    "resolve_model",
    "load_adapted",
    "list_adapted",
    "anchor_set",
]

log = logging.getLogger(__name__)

#: the modules of GisaxsDAE that learn, per AdaptConfig.trainable (None: all)
TRAINABLE = {
    "all": None,
    "decoder+identity": ("to_identity", "from_identity", "decoder", "refine"),
    "decoder": ("from_identity", "decoder", "refine"),
}

#: seed of the simulated anchor set: apart from the training sets (1-4) and evaluation (>= 10000)
ANCHOR_SEED = 7


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of :func:`adapt` (recorded in the card)."""

    split_fraction: float = 0.5  # p of the binomial thinning
    thinnings: int = 2  # independent splits per frame (epoch e trains on split e % thinnings)
    epochs: int = 3
    batch_frames: int = 8  # real frames per step, each with its two halves
    anchor_identities: int = 64  # simulated anchor set: identities x 2 frames
    anchor_batch_identities: int = 4  # anchor identities per step (2 frames each)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    w_n2n_decoder: float = 10.0  # as train's w_recon
    w_n2n_denoiser: float = 10.0  # as train's w_denoise
    w_identity: float = 1.0
    w_anchor: float = 1.0
    w_base: float = 0.0  # L2-SP: sum of squared weight changes from the base model
    # anchor frames' identity latents stay where the base model put them (over its spread^2):
    # the structure / size heads read them, so this keeps those heads' inputs
    w_distill: float = 30.0
    # which parts learn: "decoder+identity" (identity MLP, decoder, denoiser; the conv trunk,
    # the noise branch and the heads stay, so noise kinds are untouched), "decoder" (decoder
    # and denoiser only: latents and noise kinds untouched) or "all"
    trainable: str = "decoder+identity"
    denoise_crop: int = 64
    detector: str = "auto"  # "auto" | "counting" | "integrating"
    gain_frames: int = 4  # frames per shape whose single-frame gain estimates are averaged
    seed: int = 0
    precision: str = "auto"  # as TrainConfig.precision
    num_threads: int | None = None
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if not 0 < self.split_fraction < 1:
            raise ValueError(f"split_fraction={self.split_fraction} must be in (0, 1)")
        for name in ("thinnings", "epochs", "batch_frames", "anchor_batch_identities",
                     "gain_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.anchor_identities < 0:
            raise ValueError(f"anchor_identities={self.anchor_identities} must be >= 0")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}: expected one of {sorted(TRAINABLE)}")
        if self.detector not in ("auto", "counting", "integrating"):
            raise ValueError(f"detector={self.detector!r}: expected auto, counting or integrating")


@dataclass(frozen=True)
class AdaptResult:
    path: Path
    card: dict


# ------------------------------------------------------------------------------- resolver
def load_adapted(spec: str | Path = "pretrained", device: str | torch.device = "auto") -> Encoder:
    """Encoder of :func:`resolve_model` ``(spec)``: the shipped model, a file, or a cached name."""
    model, card, _ = load_checkpoint(resolve_model(spec))
    return Encoder(model, card, device)


# ---------------------------------------------------------------------------------- anchor
def anchor_set(n_identities: int, *, seed: int = ANCHOR_SEED, cache_dir: Path | None = None,
               workers: int = 1, progress: bool = True) -> TrainingData:
    """The simulated anchor set (binned, random artefacts and dose), made once and cached."""
    spec = DatasetSpec(n_identities=n_identities, frames_per_identity=2, seed=seed)
    cache_dir = cache_dir or model_cache_dir().parent / "anchors"
    path = cache_dir / f"anchor-{n_identities}x2-seed{seed}.h5"
    if not path.is_file():
        generate(path, spec, workers=workers, progress=progress)
    return TrainingData(path)


# ----------------------------------------------------------------------------- real pairs
class _Pairs:
    """Preprocessed halves of every frame and thinning (float16; about 1 MB per pair)."""

    def __init__(self) -> None:
        self.x = [[], []]  # halves a, b: (8, 128, 128)
        self.fine = [[], []]  # (2, *fine_shape)
        self.whole: list[torch.Tensor] = []  # (8, 128, 128) of each whole frame
        self.group: list[int] = []  # frame index
        self.draw: list[int] = []  # thinning index

    def add(self, x: np.ndarray, fine: np.ndarray, group: int, draw: int) -> None:
        for h in (0, 1):
            self.x[h].append(torch.from_numpy(x[h].astype(np.float16)))
            self.fine[h].append(torch.from_numpy(fine[h].astype(np.float16)))
        self.group.append(group)
        self.draw.append(draw)

    def freeze(self) -> None:
        self.x = [torch.stack(v) for v in self.x]
        self.whole = torch.stack(self.whole)
        self.fine = [torch.stack(v) for v in self.fine]
        self.group = np.asarray(self.group)
        self.draw = np.asarray(self.draw)


class _View:
    """What train._denoise_errors reads: an input half and the other half as the target."""

    def __init__(self, pairs: _Pairs, src: int) -> None:
        self.fine = pairs.fine[src]
        self.fine_target = pairs.fine[1 - src][:, 0]


def _counts_converter(frames: list[SourceFrame], cfg: AdaptConfig,
                      gain: GainEstimate | float | None) -> tuple[dict, dict]:
    """Per frame shape: the GainEstimate to convert ADU (None for a counting detector)."""
    by_shape: dict[tuple, list[SourceFrame]] = {}
    for f in frames:
        by_shape.setdefault(tuple(f.frame.shape), []).append(f)
    converters: dict[tuple, GainEstimate | None] = {}
    report: dict[str, Any] = {}
    for shape, items in by_shape.items():
        key = "x".join(map(str, shape))
        if isinstance(gain, GainEstimate | int | float) and not isinstance(gain, bool):
            est = gain if isinstance(gain, GainEstimate) else GainEstimate(
                float(gain), 0.0, 0.0, 0.0, "given", "given", 0, 0)
            converters[shape] = est
            report[key] = {"detector": "integrating", "gain": est.to_dict()}
            continue
        counting = cfg.detector == "counting" or (
            cfg.detector == "auto"
            and all(looks_counting(f.frame, f.mask) for f in items[: cfg.gain_frames])
            and _shape_is_counting(items, report, key))
        if counting:
            converters[shape] = None
            report.setdefault(key, {})["detector"] = "counting"
            continue
        estimates = []
        for f in items[: cfg.gain_frames]:
            try:
                estimates.append(estimate_gain(f.frame, f.mask))
            except GainError as exc:
                raise AdaptationError(f"{f.source}: cannot estimate the detector gain ({exc}); "
                                      "pass gain=... (--gain) or detector='counting'") from exc
        g = float(np.median([e.gain_adu_per_photon for e in estimates]))
        est = dataclasses.replace(estimates[0], gain_adu_per_photon=g,
                                  read_noise_adu=float(np.median([e.read_noise_adu
                                                                  for e in estimates])))
        converters[shape] = est
        report[key] = {"detector": "integrating", "gain": est.to_dict(),
                       "gain_per_frame": [round(e.gain_adu_per_photon, 4) for e in estimates]}
    return converters, report


def _shape_is_counting(items: list[SourceFrame], report: dict, key: str) -> bool:
    """Integer, non-negative frames are counting ones when their photon-transfer gain is ~1
    (a 16-bit CCD's ADU are integers too); frames too irregular for a gain estimate are taken
    as counting (they passed the integer check)."""
    try:
        est = estimate_gain(items[0].frame, items[0].mask)
    except GainError as exc:
        report[key] = {"gain_check": f"not possible ({exc}); integer counts taken as photons"}
        return True
    report[key] = {"gain_check": est.to_dict()}
    return 0.8 <= est.gain_adu_per_photon <= 1.25


def _build_pairs(src_list: list[FrameSource], encoder: Encoder, cfg: AdaptConfig,
                 gain: GainEstimate | float | None, fallback_geometry: dict | None,
                 require_geometry: bool, max_frames: int | None, progress: bool
                 ) -> tuple[_Pairs, list[dict], dict]:
    """Thin and preprocess every frame as it arrives (frames are not kept: a few hundred
    Pilatus 1M frames would be GBs); the first ``gain_frames`` of each shape decide how that
    shape converts to counts. Returns the pairs, each frame's (source, geometry), the
    detector report."""
    rng = np.random.default_rng(cfg.seed)
    pairs = _Pairs()
    meta: list[dict] = []
    converters: dict[tuple, GainEstimate | None] = {}
    report: dict[str, Any] = {}
    pending: dict[tuple, list[SourceFrame]] = {}
    bar = tqdm(desc="thinning + preprocessing", unit="frame", disable=not progress,
               total=max_frames)

    def process(item: SourceFrame) -> None:
        counts = item.frame
        est = converters[tuple(counts.shape)]
        if est is not None:
            counts = to_photon_counts(counts, est)
        for d in range(cfg.thinnings):
            pair = binomial_split(counts, cfg.split_fraction, mask=item.mask, rng=rng,
                                  name=item.source)
            x, fine = encoder.preprocess_with_fine([pair.a, pair.b], item.mask)
            pairs.add(x, fine, len(meta), d)
        pairs.whole.append(torch.from_numpy(encoder.preprocess([counts], item.mask)[0]
                                            .astype(np.float16)))
        meta.append({"source": item.source, "geometry": item.geometry, "group": item.group})
        bar.update(1)

    def flush(shape: tuple) -> None:
        items = pending.pop(shape)
        conv, rep = _counts_converter(items, cfg, gain)
        converters.update(conv)
        report.update(rep)
        for it in items:
            process(it)

    for item in iter_frames(src_list, max_frames=max_frames):
        if item.geometry == "unknown" and fallback_geometry is not None:
            item.geometry = fallback_geometry
        elif item.geometry == "unknown" and require_geometry:
            raise AdaptationError(f"{item.source}: no geometry; pass geometry=... (--geometry)")
        shape = tuple(item.frame.shape)
        if shape in converters:
            process(item)
            continue
        pending.setdefault(shape, []).append(item)
        if len(pending[shape]) >= cfg.gain_frames:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    bar.close()
    pairs.freeze()
    return pairs, meta, report


def _log_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 8, 128, 128) input -> the 64 x 64 valid-weighted log intensity and its valid weight
    (as models.dataset.pool2 makes the decoder's targets)."""
    valid = F.avg_pool2d(x[:, 1:2], 2)[:, 0]
    log_i = F.avg_pool2d(x[:, :1] * x[:, 1:2], 2)[:, 0] / valid.clamp_min(1e-6)
    return log_i, valid


def _real_losses(model, pairs: _Pairs, idx: torch.Tensor, cfg: AdaptConfig, spread: float,
                 device: torch.device, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    flip = bool(rng.random() < 0.5)
    xa, xb = (pairs.x[h][idx].to(device).float() for h in (0, 1))
    if flip:  # the mirror image is as physical as the frame (GISAXS is left-right symmetric)
        xa, xb = xa.flip(-1), xb.flip(-1)
    n = len(idx)
    x = torch.cat([xa, xb]).contiguous(memory_format=torch.channels_last)
    out = model(x)
    recon = out["recon"].float()
    z = out["z_identity"].float()
    log_i, valid = _log_pool(x.float())
    swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)  # a <-> b
    weight = ((valid > 0.5) & (valid[swap] > 0.5)).float()
    decoder = ((recon - log_i[swap]) ** 2 * weight).sum() / weight.sum().clamp_min(1)
    identity = ((z[:n] - z[n:]) ** 2).sum(1).mean() / spread**2
    err_sum, n_sum = 0.0, 0.0
    for src in (0, 1):
        prior = recon[src * n : (src + 1) * n].detach()
        err, _, nvalid = _denoise_errors(model, _View(pairs, src), idx, prior, cfg.denoise_crop,
                                         device, flip, rng)
        err_sum = err_sum + (err * nvalid).sum()
        n_sum = n_sum + nvalid.sum()
    denoiser = err_sum / n_sum.clamp_min(1)
    total = (cfg.w_n2n_decoder * decoder + cfg.w_n2n_denoiser * denoiser
             + cfg.w_identity * identity)
    return {"total": total, "n2n_decoder": decoder, "n2n_denoiser": denoiser,
            "identity": identity}


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
    import json

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
) -> AdaptResult:
    """Fine-tune ``base`` on the frames of ``sources`` and write an adapted checkpoint.

    ``sources``: FrameSource objects (:class:`FileSource`, :class:`RunSource`) and/or paths of
    detector files and folders. ``out`` (.pt, a .json card beside it) defaults to
    ``<model_cache_dir()>/<name>.pt``, so that the model loads by ``name``. ``geometry`` is
    recorded for frames whose source gives none (else "unknown"; ``require_geometry`` makes
    that an error). ``gain`` (ADU per photon, or a GainEstimate) skips the gain estimate of an
    integrating detector. ``anchor``: a binned simulated set (path or TrainingData) instead
    of the cached one of ``config.anchor_identities`` identities.
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
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    base_path = resolve_model(base)
    model, base_card, _ = load_checkpoint(base_path, map_location=dev)
    spread0 = float(base_card.get("binner", {}).get("spread", 1.0))
    src_list = _as_sources(sources, geometry, require_geometry)
    encoder = Encoder(model, base_card, dev)  # the preprocessing of the base model's card
    pairs, frames, detector_report = _build_pairs(
        src_list, encoder, cfg, gain, _check_geometry_arg(geometry), require_geometry,
        max_frames, progress)
    anchor_data = _anchor(anchor, cfg, progress)

    model.to(dev, memory_format=torch.channels_last)
    modules = TRAINABLE[cfg.trainable]
    for n, p in model.named_parameters():
        p.requires_grad_(modules is None or n.split(".")[0] in modules)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    distill_ref = _anchor_latents(model, anchor_data, dev) if (
        anchor_data is not None and cfg.w_distill > 0) else None
    by_draw = [np.flatnonzero(pairs.draw == d) for d in range(cfg.thinnings)]
    steps = math.ceil(len(frames) / cfg.batch_frames)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr,
                                                    total_steps=cfg.epochs * steps, pct_start=0.2)
    amp_dtype = autocast_dtype(cfg.precision, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
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
            with torch.autocast(dev.type, enabled=amp_dtype is not None,
                                dtype=amp_dtype or torch.float32):
                losses = _real_losses(model, pairs, idx, cfg, spread0, dev, rng)
                total = losses["total"]
                if anchor_data is not None and cfg.w_anchor > 0:
                    ids = torch.from_numpy(rng.choice(anchor_data.n_identities, min(
                        cfg.anchor_batch_identities, anchor_data.n_identities), replace=False))
                    sim = _losses(model, anchor_data, anchor_data.batch(ids), train_cfg, dev,
                                  flip=bool(rng.random() < 0.5), rng=rng)
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
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
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
    z_whole, err_whole = _encode(adapted, [pairs.whole])
    group = np.concatenate([pairs.group, pairs.group])
    draw = np.concatenate([pairs.draw, pairs.draw])
    repeat = [f["group"] if f["group"] is not None else f"#{i}" for i, f in enumerate(frames)]
    identity = np.unique(repeat, return_inverse=True)[1][group]  # per latent
    binner, calibration = calibrate_from_groups(
        z, err, group, draw, identity=identity, frame_latent=z_whole,
        frame_recon_error=err_whole, config=cfg.calibration)
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
    return AdaptResult(out, card)


def _encode(encoder: Encoder, inputs: Sequence[torch.Tensor], batch: int = 64
            ) -> tuple[np.ndarray, np.ndarray]:
    """Identity latents and reconstruction errors of float16 inputs, in order."""
    z, err = [], []
    for x in inputs:
        for s in range(0, len(x), batch):
            out = encoder.encode_preprocessed(x[s : s + batch].float().numpy())
            z.append(out["latent"][:, : encoder.identity_dim])
            err.append(out["recon_error"])
    return np.concatenate(z), np.concatenate(err)


@torch.no_grad()
def _anchor_latents(model, data: TrainingData, device: torch.device) -> torch.Tensor:
    """The base model's identity latents of every anchor frame (before any step)."""
    model.eval()
    return torch.cat([model.to_identity(model.features(data.inputs[s : s + 64].to(device)
                                                       .float())[0]).float()
                      for s in range(0, len(data), 64)])


def _check_geometry_arg(geometry: Any) -> dict | None:
    from .sources import _geometry_dict

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
