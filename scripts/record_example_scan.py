"""Record the example document stream kept under tests/examples/list_scan/.

A `list_scan` of the simulated GISAXS detector (SWMR HDF5, stream_resource/stream_datum)
over `sample_x`, as the demo runs it, at a small frame size so that the recording stays
small: the run's documents as JSON lines and the detector's HDF5 file beside them.

    python scripts/record_example_scan.py tests/examples/list_scan
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import bluesky.plans as bp
import numpy as np
from bluesky import RunEngine

from gisaxs_bluesky.sim.detector import blob_frame_fn, make_gisaxs_detector, make_motors

SHAPE = (160, 150)
POSITIONS = [0.0, 0.4, 0.8, 1.2, 4.0, 4.4, 4.8, 5.2]


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj))


def main(out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        (sample_x,) = make_motors("sample_x")
        det = make_gisaxs_detector(Path(tmp), blob_frame_fn(SHAPE, width_motor="sample_x"),
                                   [sample_x], shape=SHAPE, dtype=np.int32)
        RE = RunEngine({})
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE(bp.list_scan([det], sample_x, POSITIONS), sample="example", scan_id=1)
        (h5,) = Path(tmp).glob("*.h5")
        shutil.copy(h5, out_dir / "pilatus.h5")
    with open(out_dir / "documents.jsonl", "w") as f:
        for name, doc in docs:
            if name == "stream_resource" and doc["uri"].endswith(".h5"):
                doc = {**doc, "uri": "file://localhost/EXAMPLE_DIR/pilatus.h5"}
            f.write(json.dumps([name, doc], default=_jsonable) + "\n")
    print(f"{len(docs)} documents, {len(POSITIONS)} frames -> {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/examples/list_scan")
