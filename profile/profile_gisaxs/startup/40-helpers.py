"""Part 4: query helpers, replay, and the adaptive plan (when that module is installed)."""
from gisaxs_bluesky.query import (
    derived_for_run,
    derived_nodes,
    frames_in_bin,
    outlier_frames,
    runs_with_bin,
)
from gisaxs_bluesky.replay import replay_runs, select_runs

try:
    import gisaxs_bluesky.adaptive as adaptive
    from gisaxs_bluesky.adaptive import *  # noqa: F403 - plans for interactive use
except Exception as _exc:  # noqa: BLE001 - module being written, or broken
    adaptive = None
    print(f"adaptive plan not available: gisaxs_bluesky.adaptive cannot be imported ({_exc})")

print("ready: RE, pilatus, sample_x, tiled_client, dae_callback; "
      "e.g. RE(bp.scan([pilatus], sample_x, 0, 40, 41)), then frames_in_bin(tiled_client, 0)")
