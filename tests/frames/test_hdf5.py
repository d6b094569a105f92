"""Live HDF5 frame reading: a detector file written in this process (read through its writer)
and one written by another process (SWMR, as a real detector's file writer)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from gisaxs_bluesky.frames.hdf5 import SwmrFrameReader, local_writer
from gisaxs_bluesky.sim.detector import DATA_PATH, SUM_PATH, _FrameFile

SHAPE = (64, 48)


def _frame(i: int) -> np.ndarray:
    return np.full(SHAPE, i + 1, dtype=np.int32)


def test_in_process_writer_is_read_through_its_own_handle(tmp_path):
    path = tmp_path / "det.h5"
    writer = _FrameFile(path, SHAPE, np.dtype(np.int32))
    assert local_writer(str(path)) is writer
    n = 40
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}

    def write():
        for i in range(n):
            writer.append(_frame(i))
            time.sleep(0.002)

    def read(name: str, reader: SwmrFrameReader):
        for i in range(n):
            got[name].append(reader.read(str(path), DATA_PATH, i))

    readers = {k: SwmrFrameReader(timeout=10) for k in got}
    threads = [threading.Thread(target=write)] + [
        threading.Thread(target=read, args=(k, r)) for k, r in readers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, frames in got.items():
        assert [int(f[0, 0]) for f in frames] == list(range(1, n + 1)), name
        assert all(f.shape == SHAPE and (f == f[0, 0]).all() for f in frames), name
    # never opened a second HDF5 handle on the writer's file
    assert all(r._files == {} for r in readers.values())
    assert readers["a"].read(str(path), SUM_PATH, 3) == pytest.approx(4 * SHAPE[0] * SHAPE[1])

    writer.close()
    assert local_writer(str(path)) is None
    # after the writer closed its file, readers open it like any other
    np.testing.assert_array_equal(readers["a"].read(str(path), DATA_PATH, n - 1), _frame(n - 1))
    assert list(readers["a"]._files) == [str(path)]
    for r in readers.values():
        r.close()


def test_missing_frame_times_out_naming_file_and_count(tmp_path):
    path = tmp_path / "det.h5"
    writer = _FrameFile(path, SHAPE, np.dtype(np.int32))
    writer.append(_frame(0))
    reader = SwmrFrameReader(timeout=0.2)
    with pytest.raises(TimeoutError, match=r"frame index 5 of .*det\.h5:/entry/data/data"):
        reader.read(str(path), DATA_PATH, 5)
    writer.close()
    with pytest.raises(TimeoutError, match="holds 1 frames"):
        reader.read(str(path), DATA_PATH, 5)
    reader.close()
    with pytest.raises(TimeoutError, match="No such file"):
        SwmrFrameReader(timeout=0.1).read(str(tmp_path / "absent.h5"), DATA_PATH, 0)


def test_file_written_by_another_process_is_read_live_with_swmr(tmp_path):
    """The real-detector case: a separate writer process, frames read while it appends."""
    path = tmp_path / "ioc.h5"
    n = 12
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from pathlib import Path
        from gisaxs_bluesky.sim.detector import _FrameFile
        w = _FrameFile(Path({str(path)!r}), {SHAPE!r}, np.dtype(np.int32))
        print("open", flush=True)
        sys.stdin.readline()
        for i in range({n}):
            w.append(np.full({SHAPE!r}, i + 1, dtype=np.int32))
            time.sleep(0.03)
        w.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        reader = SwmrFrameReader(timeout=20)
        assert local_writer(str(path)) is None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        frames = [reader.read(str(path), DATA_PATH, i) for i in range(n)]
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert [int(f[0, 0]) for f in frames] == list(range(1, n + 1))
    assert all((f == f[0, 0]).all() for f in frames)
    reader.close()
