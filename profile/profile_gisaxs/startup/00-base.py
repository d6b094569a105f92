"""GISAXS beamline session, part 0: import path, logging, RunEngine."""
# ruff: noqa: E402
import logging
import os
import sys
from pathlib import Path

try:  # a source checkout works without `pip install -e .`
    _REPO = Path(__file__).resolve().parents[3]
    if (_REPO / "gisaxs_bluesky").is_dir() and str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))
except NameError:  # __file__ is set by IPython for startup files; be safe anyway
    pass

logging.basicConfig(level=os.environ.get("GISAXS_LOG_LEVEL", "WARNING"),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
from bluesky import RunEngine
from bluesky.callbacks.best_effort import BestEffortCallback

RE = RunEngine({})
bec = BestEffortCallback()
bec.disable_plots()
RE.subscribe(bec)
RE.md.setdefault("beamline", os.environ.get("GISAXS_BEAMLINE", "gisaxs-sim"))
