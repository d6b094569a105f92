"""Reality check: the measured GALAXI Pilatus 1M frame against the simulator."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .geometry import Geometry
from .physics import scattered_intensity
from .sample import Sample

__all__ = ["GALAXI_GEOMETRY", "GALAXI_SAMPLE", "yoneda_row", "galaxi_yoneda_check", "find_real_data"]

#: BornAgain example fit61_Galaxi: 1730 mm, 0.134 nm, 0.463 deg, beam at (597.1, 323.4) from
#: the bottom-left, i.e. array row 1043 - 323.4 = 719.6 from the top
GALAXI_GEOMETRY = Geometry(distance_mm=1730.0, wavelength_nm=0.134, incidence_deg=0.463,
                           beam_center_px=(719.6, 597.1))
#: Ag spheres R ~ 5.75 nm (log-normal 0.4) in a radial paracrystal D ~ 53.6 nm on Si;
#: delta of Si at 0.134 nm (9.25 keV) is 5.75e-6, of Ag 2.4e-5
GALAXI_SAMPLE = Sample("spheres_paracrystal", radius_nm=5.75, distance_nm=53.6,
                       polydispersity=0.4, disorder=0.3, delta_substrate=5.75e-6,
                       beta_substrate=1.0e-7, delta_particle=2.4e-5, beta_particle=1.8e-6)


def yoneda_row(image: np.ndarray, cols: slice, rows: slice, valid: np.ndarray | None = None) -> int:
    """Row of the Yoneda maximum: the brightest row of a column band, in a row window."""
    band = image[rows, cols].astype(np.float64)
    if valid is not None:
        band = np.where(valid[rows, cols], band, np.nan)
    profile = np.nanmean(np.clip(band, 0, None), axis=1)
    return int(rows.start + np.nanargmax(profile))


def find_real_data() -> Path | None:
    """../shared/data/real relative to the repository (tests skip when it is absent)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data" / "real"
        if candidate.is_dir():
            return candidate
    return None


def galaxi_yoneda_check(path: str | Path) -> dict:
    """Measured vs simulated Yoneda row on the GALAXI frame, in a band beside the specular rod."""
    import tifffile

    with gzip.open(path) as f:
        measured = tifffile.imread(f)
    g = GALAXI_GEOMETRY
    beam_col = int(round(g.beam_center_px[1]))
    # off the specular rod, where the diffuse scattering carries the Yoneda band
    cols = slice(beam_col + 30, beam_col + 120)
    spec_row = int(round(g.row_of_alpha_f(g.incidence_deg)))
    horizon = int(round(g.horizon_row()))
    rows = slice(spec_row + 10, horizon)  # between specular and horizon
    rr = np.arange(measured.shape[0], dtype=float)[:, None]
    cc = np.arange(cols.start, cols.stop, dtype=float)[None, :]
    simulated = np.zeros(measured.shape, dtype=np.float64)
    simulated[:, cols] = scattered_intensity(g, GALAXI_SAMPLE, rr, cc)
    measured_row = yoneda_row(measured, cols, rows, valid=measured >= 0)
    simulated_row = yoneda_row(simulated, cols, rows)
    alpha_c = np.rad2deg(np.sqrt(2 * GALAXI_SAMPLE.delta_substrate))
    return {
        "measured_row": measured_row,
        "simulated_row": simulated_row,
        "critical_angle_row": round(float(g.row_of_alpha_f(alpha_c)), 1),
        "difference_px": simulated_row - measured_row,
        "columns": [cols.start, cols.stop],
    }
