"""`gisaxs-bluesky adapt`: fine-tune the model on one beamtime's unlabelled frames."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .. import replay
from ..models.checkpoint import CheckpointError
from ..models.loading import model_cache_dir
from ..sim.noise_transfer import save_noise_model
from .adapt_config import TRAINABLE, AdaptConfig
from .calibration import CalibrationConfig
from .detector_files import read_detector_file
from .errors import AdaptationError
from .finetune import adapt
from .sources import FileSource, RunSource

__all__ = ["add_arguments", "add_detector_arguments", "add_source_arguments", "build_sources",
           "run"]


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The frame-source options of adapt (also those of noise-fit)."""
    src = parser.add_argument_group("frames (files and/or runs)")
    src.add_argument("paths", nargs="*", help="detector files or folders (TIFF, CBF, EDF, "
                     "their .gz, HDF5/NeXus, .npy; files named *mask* are masks)")
    src.add_argument("--tiled-uri", help="Tiled server with the runs (TiledWriter or "
                     "databroker/Mongo behind Tiled)")
    src.add_argument("--api-key", default=None)
    src.add_argument("--uid", action="append", default=[], help="run uid (repeatable)")
    src.add_argument("--scan-ids", metavar="LO:HI")
    src.add_argument("--plan-name")
    src.add_argument("--since")
    src.add_argument("--until")
    src.add_argument("--where", action="append", default=[], metavar="KEY=VALUE")
    src.add_argument("--limit", type=int, help="at most this many runs")
    src.add_argument("--stream", default="primary")
    src.add_argument("--image-key", default=None)
    src.add_argument("--max-frames-per-run", type=int)
    src.add_argument("--max-frames", type=int, help="at most this many frames in all")
    src.add_argument("--group-by", default="frame",
                     help="which frames are repeated measurements of one sample, for the "
                     "binner's spread: frame (none), file (a multi-frame file), folder, run, or "
                     "a start-document key of the runs (e.g. sample)")
    src.add_argument("--mask", help="detector mask file (non-zero = not data) for every frame")
    src.add_argument("--geometry", help="geometry as JSON or a JSON file, recorded for frames "
                     "whose source has none (e.g. '{\"distance_mm\": 1730, \"wavelength_nm\": "
                     "0.134}')")
    src.add_argument("--require-geometry", action="store_true",
                     help="a frame without geometry is an error (default: recorded 'unknown')")


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """How frames convert to photons (adapt and noise-fit)."""
    det = parser.add_argument_group("detector")
    det.add_argument("--detector", default=AdaptConfig.detector,
                     choices=["auto", "counting", "integrating"],
                     help="auto: integer frames with a photon-transfer gain of ~1 are counting, "
                     "others are converted with the estimated gain")
    det.add_argument("--gain", type=float, help="ADU per photon (skips the estimate)")


def _joint_quantile(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--joint-quantile {text}: a number in (0, 1] or 'off'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AdaptConfig()
    add_source_arguments(parser)
    add_detector_arguments(parser)
    out = parser.add_argument_group("model")
    out.add_argument("--base", default="pretrained",
                     help="'pretrained', a checkpoint .pt or an adapted model's name")
    out.add_argument("--name", help=f"name of the adapted model, written to {model_cache_dir()}"
                     "/NAME.pt unless --out")
    out.add_argument("--out", help="checkpoint path (.pt; a .json card beside it)")
    tr = parser.add_argument_group("training")
    tr.add_argument("--trainable", default=d.trainable, choices=sorted(TRAINABLE),
                    help="which parts learn: identity (the identity MLP only: decoder, "
                    "denoiser and noise branch stay the base model's), decoder+identity, "
                    "decoder, all")
    tr.add_argument("--split", type=float, default=d.split_fraction,
                    help="binomial thinning fraction p")
    tr.add_argument("--thinnings", type=int, default=d.thinnings)
    tr.add_argument("--epochs", type=int, default=d.epochs)
    tr.add_argument("--batch-frames", type=int, default=d.batch_frames)
    tr.add_argument("--lr", type=float, default=d.lr)
    tr.add_argument("--anchor-identities", type=int, default=d.anchor_identities,
                    help="simulated anchor set size (0: no anchor)")
    tr.add_argument("--anchor", help="a binned simulated set (`gisaxs-bluesky simulate`) as "
                    "the anchor instead")
    tr.add_argument("--threshold-holdout", type=float, default=d.threshold_holdout,
                    help="fraction of the frames left out of the fine-tuning, whose quantiles "
                    "are the outlier thresholds (0, the default: from all frames)")
    tr.add_argument("--recon-quantile", type=float,
                    default=CalibrationConfig.recon_quantile)
    tr.add_argument("--reference-quantile", type=float,
                    default=CalibrationConfig.reference_quantile)
    tr.add_argument("--joint-quantile", type=_joint_quantile,
                    default=CalibrationConfig.joint_quantile,
                    help="both thresholds widen until at most 1 - this of the frames are "
                    "flagged by either test (default %(default)s; 'off': each threshold at "
                    "its own quantile)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=int, help="torch threads")
    tr.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--noise-model-out", metavar="FILE",
                        help="also fit the frames' noise model with the adapted model and write "
                        "it (FILE.json + FILE.npz) for `simulate --noise-from`")
    parser.add_argument("--no-progress", action="store_true")


def _geometry(text: str | None):
    if not text:
        return None
    path = Path(text)
    try:
        return json.loads(path.read_text() if path.is_file() else text)
    except json.JSONDecodeError as exc:
        raise AdaptationError(f"--geometry {text!r}: not JSON nor a JSON file ({exc})") from exc


def build_sources(args: argparse.Namespace) -> tuple[list, dict | None]:
    """The FrameSources of :func:`add_source_arguments`' options, and the --geometry."""
    geometry = _geometry(args.geometry)
    mask = None
    if args.mask:
        mask = np.asarray(read_detector_file(args.mask)[0][0]) != 0
    sources = []
    if args.paths:
        sources.append(FileSource(
            args.paths, mask=mask, geometry=geometry, require_geometry=args.require_geometry,
            group_by=args.group_by if args.group_by in ("file", "folder") else "frame"))
    queries = replay.build_queries(
        scan_ids=replay.parse_range(args.scan_ids), plan_name=args.plan_name,
        since=args.since, until=args.until, metadata=replay.parse_where(args.where))
    if args.tiled_uri:
        catalog = replay.connect(args.tiled_uri, args.api_key)
        sources.append(RunSource(catalog, args.uid, queries, stream=args.stream,
                                 image_key=args.image_key, limit=args.limit,
                                 max_frames_per_run=args.max_frames_per_run, mask=mask,
                                 geometry=geometry, require_geometry=args.require_geometry,
                                 group_by=("frame" if args.group_by in ("file", "folder")
                                           else args.group_by)))
    elif args.uid or queries:
        raise AdaptationError("--uid / run queries need --tiled-uri")
    if not sources:
        raise AdaptationError("the adaptation set is empty: give detector files or folders, "
                              "or --tiled-uri with runs")
    return sources, geometry


def run(args: argparse.Namespace) -> int:
    try:
        sources, geometry = build_sources(args)
        if not args.out and not args.name:
            raise AdaptationError("give --name (written to the user cache) or --out PATH")
        cfg = AdaptConfig(
            split_fraction=args.split, thinnings=args.thinnings, epochs=args.epochs,
            batch_frames=args.batch_frames, lr=args.lr, anchor_identities=args.anchor_identities,
            detector=args.detector, seed=args.seed, precision=args.precision,
            num_threads=args.threads, trainable=args.trainable,
            threshold_holdout=args.threshold_holdout,
            calibration=CalibrationConfig(recon_quantile=args.recon_quantile,
                                          reference_quantile=args.reference_quantile,
                                          joint_quantile=args.joint_quantile))
        result = adapt(sources, args.out, name=args.name, base=args.base, config=cfg,
                       geometry=geometry, require_geometry=args.require_geometry,
                       gain=args.gain, anchor=args.anchor, max_frames=args.max_frames,
                       device=args.device, progress=not args.no_progress,
                       fit_noise=bool(args.noise_model_out))
        noise_model = None
        if args.noise_model_out:  # fitted in adapt's read of the frames, with its model
            noise_model = str(save_noise_model(result.noise_model, args.noise_model_out))
    except (AdaptationError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a = result.card["adaptation"]
    print(json.dumps({
        "checkpoint": str(result.path), "name": result.card["name"],
        "sha256": result.card["sha256"], "base_sha256": a["base"]["sha256"],
        "frames": a["frames"], "seconds": a["seconds"], "losses": a["losses"],
        "calibration": a["calibration"],
        "noise_model": noise_model,
        "use": f"--model {result.path}" + (f"  (or by name: {result.card['name']})"
                                           if result.path.parent == model_cache_dir() else ""),
    }, indent=2))
    return 0
