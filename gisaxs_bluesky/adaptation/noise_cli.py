"""`gisaxs-bluesky noise-fit`: a beamtime's noise model from its frames (real-noise transfer)."""

from __future__ import annotations

import argparse
import json
import sys

from ..models.checkpoint import CheckpointError
from ..sim.noise_transfer import save_noise_model
from .cli import add_detector_arguments, add_source_arguments, build_sources
from .errors import AdaptationError
from .finetune import load_adapted
from .noise_model import fit_noise_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("-o", "--out", required=True, metavar="FILE",
                        help="the noise model: FILE.json (scalars, provenance) + FILE.npz "
                        "(inactive area, noise-latent statistics)")
    parser.add_argument("--model", default="pretrained",
                        help="the model whose noise head and noise latent describe the frames: "
                        "'pretrained', a checkpoint .pt or an adapted model's name")
    parser.add_argument("--no-model", action="store_true",
                        help="physics estimates only (no noise-head probabilities: the "
                        "simulation then adds no zingers, parasitic scattering ...)")
    add_detector_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        sources, _ = build_sources(args)
        encoder = None if args.no_model else load_adapted(args.model, args.device)
        model = fit_noise_model(sources, encoder=encoder, detector=args.detector,
                                gain=args.gain, max_frames=args.max_frames,
                                progress=not args.no_progress)
        path = save_noise_model(model, args.out)
    except (AdaptationError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"noise_model": str(path), "frames": model.provenance["frames"],
                      "instruments": [{k: v for k, v in i.scalars().items()
                                       if k != "kind_probability"} for i in model.instruments],
                      "use": f"gisaxs-bluesky simulate OUT.h5 --noise-from {path}"}, indent=2))
    return 0
