"""Print the simulated vs measured Yoneda row on the GALAXI Pilatus 1M frame."""

import json
import sys

from gisaxs_bluesky.sim.reality import find_real_data, galaxi_yoneda_check

real = find_real_data()
if real is None or not (real / "galaxi_pilatus1m.tif.gz").is_file():
    sys.exit("../shared/data/real/galaxi_pilatus1m.tif.gz not found")
print(json.dumps(galaxi_yoneda_check(real / "galaxi_pilatus1m.tif.gz"), indent=2))
