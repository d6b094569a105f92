"""Inference: frames -> latents, noise-kind probabilities, reconstruction error, identity."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..config import PreprocessConfig
from ..sim.noise import NOISE_KINDS
from ..sim.sample import STRUCTURES
from .checkpoint import CheckpointError, load_checkpoint
from .dae import GisaxsDAE
from .preprocess import preprocess, preprocess_fine, preprocess_with_scale

__all__ = [
    "EncodeResult",
    "Encoder",
    "load_encoder",
    "load_pretrained",
    "pretrained_path",
    "resolve_device",
    "recon_error",
    "to_detector_resolution",
]

PRETRAINED_NAME = "gisaxs-dae-small"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} requested but CUDA is not available on this machine")
    return device


def recon_error(recon: torch.Tensor, inputs: torch.Tensor, pool: int = 4) -> torch.Tensor:
    """Robust reconstruction error per frame: median |difference| over coarse valid blocks.

    Both sides are averaged over pool x pool blocks of the 64 x 64 reconstruction (16 x 16 blocks),
    which averages photon noise away; the median ignores sparse artefacts (hot pixels, zingers),
    so what stays is a pattern the model cannot explain.
    """
    log_i = torch.nn.functional.avg_pool2d(inputs[:, :1], 2)[:, 0]
    valid = torch.nn.functional.avg_pool2d(inputs[:, 1:2], 2)[:, 0]
    weight = torch.nn.functional.avg_pool2d(valid[:, None], pool)[:, 0]
    a = torch.nn.functional.avg_pool2d((recon * valid)[:, None], pool)[:, 0]
    b = torch.nn.functional.avg_pool2d((log_i * valid)[:, None], pool)[:, 0]
    diff = (a - b).abs() / weight.clamp_min(1e-3)
    diff = torch.where(weight > 0.5, diff, torch.full_like(diff, float("nan")))
    return torch.nanmedian(diff.flatten(1), dim=1).values.nan_to_num(0.0)


def to_detector_resolution(image: np.ndarray, valid: np.ndarray, shape: tuple[int, int]
                           ) -> np.ndarray:
    """A (h, w) block image (e.g. ``EncodeResult.denoised[i]``) on the (H, W) detector pixels.

    Bilinear between block centres, normalised by the interpolated ``valid`` (h, w) weights,
    so masked blocks (gaps, beamstop) do not bleed into their neighbours; 0 where no valid
    block is near.
    """
    from scipy import ndimage

    h, w = image.shape
    rows = (np.arange(shape[0], dtype=np.float32) + 0.5) * h / shape[0] - 0.5
    cols = (np.arange(shape[1], dtype=np.float32) + 0.5) * w / shape[1] - 0.5
    coords = np.meshgrid(rows, cols, indexing="ij")
    weight = np.asarray(valid, dtype=np.float32)
    num = ndimage.map_coordinates(np.asarray(image, np.float32) * weight, coords, order=1,
                                  mode="nearest")
    den = ndimage.map_coordinates(weight, coords, order=1, mode="nearest")
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0).astype(np.float32)


@dataclass
class EncodeResult:
    """Per-frame results of :meth:`Encoder.encode` (N frames)."""

    latent: np.ndarray  # (N, identity_dim + noise_dim) float32, identity part first
    identity_dim: int
    noise_prob: np.ndarray  # (N, n_noise_kinds) float32
    recon_error: np.ndarray  # (N,) float32
    structure_prob: np.ndarray  # (N, n_structures) float32
    radius_nm: np.ndarray  # (N,) float32
    distance_nm: np.ndarray  # (N,) float32
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    structures: tuple[str, ...] = STRUCTURES
    #: (N, 256, 256) clean log1p(I / median) at the denoiser's resolution (return_denoised=True)
    denoised: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.latent)

    @property
    def identity_latent(self) -> np.ndarray:
        return self.latent[:, : self.identity_dim]

    @property
    def noise_latent(self) -> np.ndarray:
        return self.latent[:, self.identity_dim :]

    @property
    def structure(self) -> np.ndarray:
        return np.asarray(self.structures)[self.structure_prob.argmax(axis=1)]

    def noise_detected(self, threshold: float = 0.5) -> list[list[str]]:
        return [[k for k, p in zip(self.noise_kinds, row, strict=True) if p >= threshold]
                for row in self.noise_prob]


class Encoder:
    """A loaded DAE ready for batched inference on CPU or CUDA.

    Frames are preprocessed on ``preprocess_threads`` threads (default: one per CPU core, 2 to
    8; the compiled passes release the GIL). On a GPU the preprocessing is the CPU's share of
    the work, so more cores mean more frames/s there.
    """

    def __init__(self, model: GisaxsDAE, card: dict, device: str | torch.device = "auto",
                 *, preprocess_threads: int | None = None) -> None:
        self.device = resolve_device(device)
        # channels-last: oneDNN / cuDNN convolutions run faster on it (~10 % on CPU)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.card = card
        self.preprocess_config = PreprocessConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in card.get("preprocess", {}).items()}
        )
        self.noise_kinds = tuple(card.get("noise_kinds", NOISE_KINDS))
        self.structures = tuple(card.get("structures", STRUCTURES))
        if preprocess_threads is None:
            preprocess_threads = min(8, max(2, os.cpu_count() or 2))
        if preprocess_threads < 1:
            raise ValueError(f"preprocess_threads must be >= 1, got {preprocess_threads}")
        self.preprocess_threads = int(preprocess_threads)
        self._pool = ThreadPoolExecutor(max_workers=self.preprocess_threads,
                                        thread_name_prefix="gisaxs-preprocess")

    @property
    def name(self) -> str:
        return self.card.get("name", PRETRAINED_NAME)

    @property
    def version(self) -> str:
        return str(self.card.get("version", "0"))

    @property
    def sha256(self) -> str:
        return self.card.get("sha256", "")

    @property
    def latent_dim(self) -> int:
        return self.model.config.latent_dim

    @property
    def identity_dim(self) -> int:
        return self.model.config.identity_dim

    def info(self) -> dict:
        """Model identity as written next to every derived result."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def preprocess(self, frames, mask: np.ndarray | None = None) -> np.ndarray:
        """(N, H, W) frames (any numeric dtype) -> (N, 8, h, w) float32, on the thread pool."""
        frames = _as_frames(frames)
        cfg = self.preprocess_config
        if len(frames) == 1:
            # one frame: its two halves on two threads (the compiled passes release the GIL)
            return preprocess_with_scale(frames[0], mask, cfg, pool=self._pool)[0][None]
        return np.stack(list(self._pool.map(lambda f: preprocess(f, mask, cfg), frames)))

    def preprocess_with_fine(self, frames, mask: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Model input and the denoiser's (N, 2, 256, 256) input of the same frames."""
        cfg = self.preprocess_config

        def one(frame):
            x, scale = preprocess_with_scale(frame, mask, cfg)
            return x, preprocess_fine(frame, scale, mask, cfg.fine_shape)

        pairs = list(self._pool.map(one, _as_frames(frames)))
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def encode(
        self,
        frames,
        mask: np.ndarray | None = None,
        *,
        batch_size: int = 64,
        return_denoised: bool = False,
    ) -> EncodeResult:
        """Encode (N, H, W) frames (or one (H, W) frame); returns arrays with N rows."""
        frames = _as_frames(frames)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            if return_denoised:
                x, fine = self.preprocess_with_fine(chunk, mask)
                parts.append(self.encode_preprocessed(x, fine=fine, return_denoised=True))
            else:
                parts.append(self.encode_preprocessed(self.preprocess(chunk, mask)))
        return self._result(parts)

    def encode_inputs(self, x: np.ndarray, *, batch_size: int = 64) -> EncodeResult:
        """Encode already preprocessed (N, 8, h, w) inputs (:meth:`preprocess`), in batches."""
        if len(x) == 0:
            raise ValueError("inputs are empty: nothing to encode")
        return self._result([self.encode_preprocessed(x[s : s + batch_size])
                             for s in range(0, len(x), batch_size)])

    def _result(self, parts: list[dict[str, np.ndarray]]) -> EncodeResult:
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return EncodeResult(
            identity_dim=self.identity_dim,
            noise_kinds=self.noise_kinds,
            structures=self.structures,
            denoised=merged.pop("denoised", None),
            **merged,
        )

    @torch.inference_mode()
    def encode_preprocessed(self, x: np.ndarray, *, fine: np.ndarray | None = None,
                            return_denoised: bool = False) -> dict:
        """Model pass on preprocessed (n, 8, h, w) input; returns a dict of numpy arrays.

        ``denoised`` (with return_denoised) is the denoiser's output when ``fine`` (the
        :meth:`preprocess_with_fine` input) is given, else the decoder's (n, 64, 64) pattern.
        """
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=use_amp, dtype=torch.float16):
            out = self.model(t)
        err = recon_error(out["recon"].float(), t)
        result = {
            "latent": torch.cat([out["z_identity"], out["z_noise"]], 1).float(),
            "noise_prob": torch.sigmoid(out["noise_logits"].float()),
            "recon_error": err,
            "structure_prob": torch.softmax(out["structure_logits"].float(), 1),
            "radius_nm": torch.exp(out["log_radius"].float()),
            "distance_nm": torch.exp(out["log_distance"].float()),
        }
        if return_denoised:
            if fine is not None:
                f = torch.from_numpy(np.ascontiguousarray(fine, dtype=np.float32)).to(self.device)
                with torch.autocast(self.device.type, enabled=use_amp, dtype=torch.float16):
                    result["denoised"] = self.model.denoise(out["recon"], f).float()
            else:
                result["denoised"] = out["recon"].float()
        return {k: v.cpu().numpy().astype(np.float32) for k, v in result.items()}


def _as_frames(frames) -> np.ndarray | list:
    if isinstance(frames, list | tuple):
        frames = [np.asarray(f) for f in frames]
        if not frames:
            raise ValueError("frames is empty: nothing to encode")
        return frames
    frames = np.asarray(frames)
    if frames.ndim == 2:
        return frames[None]
    if frames.ndim != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (N, H, W) with N >= 1 or one (H, W) frame, got {frames.shape}")
    return frames


def pretrained_path() -> Path:
    """Location of the weights shipped inside the package."""
    return Path(str(resources.files("gisaxs_bluesky.models") / "pretrained" / f"{PRETRAINED_NAME}.pt"))


def load_encoder(path: str | Path, device: str | torch.device = "auto") -> Encoder:
    """Encoder from a checkpoint file (raises CheckpointError when unusable)."""
    model, card, _ = load_checkpoint(path)
    return Encoder(model, card, device)


def load_pretrained(device: str | torch.device = "auto") -> Encoder:
    """The small pretrained DAE shipped with the package."""
    path = pretrained_path()
    if not path.is_file():
        raise CheckpointError(
            f"pretrained weights {path} are missing: reinstall gisaxs-bluesky or train them with "
            "`gisaxs-bluesky train --out gisaxs_bluesky/models/pretrained/gisaxs-dae-small.pt`"
        )
    return load_encoder(path, device)
