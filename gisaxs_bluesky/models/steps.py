"""What every training loop of the package does at the start of a run and at each step: threads
and seeds, the autocast dtype and its gradient scaler, one optimizer step, adding up losses.

`gisaxs-bluesky train` (:mod:`.train`), the refits (:mod:`.refit`) and `gisaxs-bluesky adapt`
(:mod:`gisaxs_bluesky.adaptation.finetune`) all step through these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["Precision", "add_losses", "autocast_dtype", "optimizer_step", "start_run"]


def start_run(seed: int, num_threads: int | None = None) -> np.random.Generator:
    """Torch threads (when given) and seed at the start of a run; the numpy generator that
    draws its batches, crops and flips."""
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return None
    if precision == "fp16" or (precision == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    native = device.type == "cpu" and torch.backends.mkldnn.is_available() and bool(
        getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return torch.bfloat16 if native else None


class Precision:
    """The autocast of one run (``precision`` as TrainConfig.precision) and the gradient
    scaler that float16 needs (a no-op otherwise)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, enabled=self.dtype is not None,
                              dtype=self.dtype or torch.float32)

    def __str__(self) -> str:
        if self.dtype is None:
            return "fp32"
        return f"{str(self.dtype).removeprefix('torch.')} autocast"


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Gradients of ``loss`` (through ``scaler`` when given), one optimizer and one scheduler
    step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()


def add_losses(sums: dict[str, float], losses: Mapping[str, torch.Tensor]) -> None:
    """Add one step's losses to the running ``sums`` (per name)."""
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach())
