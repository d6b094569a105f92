# Queue Server startup code for the tests: a simulated motor and detector (ophyd.sim).
from bluesky import RunEngine
from bluesky.plans import count  # noqa: F401 - plans the queue may run
from ophyd.sim import SynAxis, SynGauss

from gisaxs_bluesky.qserver_plans import measure_suggestion  # noqa: F401

RE = RunEngine({})
sample_x = SynAxis(name="sample_x")
det = SynGauss("det", sample_x, "sample_x", center=20.0, Imax=1000.0, sigma=5.0)
