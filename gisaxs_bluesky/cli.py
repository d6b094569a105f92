"""`gisaxs-bluesky` command line: each sub-command lives in the module that does the work.

A module named here provides ``add_arguments(parser)`` and ``run(args) -> int``; it is
imported only when its sub-command runs, so `gisaxs-bluesky --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "SUBCOMMANDS"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gisaxs_bluesky.demo", "simulated scan into a local Tiled catalog, live binning, report"),
    "simulate": ("gisaxs_bluesky.models.dataset", "generate a labelled simulated dataset (HDF5)"),
    "train": ("gisaxs_bluesky.models.train", "train the denoising autoencoder"),
    "evaluate": ("gisaxs_bluesky.models.evaluate", "metrics on held-out simulation or real frames"),
    "replay": ("gisaxs_bluesky.replay", "re-bin catalogued runs with a model"),
    "serve": ("gisaxs_bluesky.serve_cli",
              "run the callback on documents from a 0MQ proxy or on runs streamed by Tiled"),
    "view": ("gisaxs_bluesky.view.server", "live web page of the bins, outliers, suggestions"),
    "suggestions": ("gisaxs_bluesky.qserver.cli",
                    "list / accept / reject suggestions (accepted -> Queue Server plan)"),
    "adapt": ("gisaxs_bluesky.adaptation.cli", "fine-tune the model on a beamtime's own frames"),
    "noise-fit": ("gisaxs_bluesky.adaptation.noise_cli",
                  "fit a beamtime's noise model from its frames (for simulate --noise-from)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gisaxs-bluesky", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    top, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if top.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("gisaxs_bluesky").setLevel(logging.DEBUG if top.verbose else logging.INFO)
    if top.command is None:
        parser.print_help()
        return 2
    module_name, help_text = SUBCOMMANDS[top.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"gisaxs-bluesky {top.command}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
