"""Real-noise transfer: a per-instrument noise model fitted from measured frames, applied to
simulated ones.

A :class:`NoiseModel` holds, per detector (frame shape) of a beamtime, what its frames show
(fitted by :func:`gisaxs_bluesky.adaptation.noise_model.fit_noise_model`):

* the detector kind, gain (ADU per photon), offset and read noise (ADU);
* the dose: median photons per valid pixel, log-normal over the frames;
* the background floor as a fraction of the median (10th percentile of 16 x 16 block means);
* hot pixels (fraction of valid pixels, log10 level in photons) and isolated dead pixels
  (fraction of pixels bright enough that reading 0 cannot be chance);
* the inactive area (pixels without data in every frame) and the value it reads;
* the noise head's mean probability of each noise kind, and the noise latent's mean and
  standard deviation (a fingerprint to compare simulated frames against).

:func:`apply_noise_model` turns the expected photons of a clean simulated frame into what that
detector would write; :func:`simulate_with_noise_model` is :func:`~.simulate.simulate` with it.
The model is a JSON file (scalars, provenance, sha256 of the arrays) with a ``.npz`` beside it
(masks, latent statistics); :func:`load_noise_model` names the file and the fault when one is
missing or corrupt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import noise as _noise
from .geometry import Geometry
from .noise import NOISE_KINDS, OVERFLOW_COUNTS, NoiseSpec
from .sample import Sample
from .simulate import SimResult, simulate

__all__ = [
    "NOISE_MODEL_VERSION",
    "InstrumentNoise",
    "NoiseModel",
    "NoiseModelError",
    "apply_noise_model",
    "background_level",
    "load_noise_model",
    "noise_model_paths",
    "save_noise_model",
    "simulate_with_noise_model",
]

NOISE_MODEL_VERSION = 1
#: kinds the model applies from its physics estimates; the others are drawn with the noise
#: head's probability (they change the expected pattern or are rare events)
PHYSICAL_KINDS = ("poisson", "readout", "hot_pixels", "dead_pixels", "gaps")
_PATTERN_KINDS = ("beamstop", "parasitic", "misalignment")  # applied by simulate()
BLOCK_PX = 16
BACKGROUND_QUANTILE = 0.1


class NoiseModelError(ValueError):
    """A noise-model file that is missing, corrupt, of another version or incomplete."""


@dataclass(frozen=True)
class InstrumentNoise:
    """What the frames of one detector (one frame shape) show; see the module docstring."""

    shape: tuple[int, int]
    detector: str  # "counting" | "integrating"
    frames: int
    gain_adu_per_photon: float = 1.0
    offset_adu: float = 0.0
    read_noise_adu: float = 0.0
    dose_log_mean: float = float(np.log(10.0))  # log of median photons per valid pixel
    dose_log_std: float = 0.0
    dose_range: tuple[float, float] = (10.0, 10.0)
    background_fraction: float = 0.02
    hot_pixel_fraction: float = 0.0
    hot_log10_mean: float = 4.0
    hot_log10_std: float = 0.5
    dead_pixel_fraction: float = 0.0
    inactive_value: float = -1.0
    kind_probability: dict = field(default_factory=dict)  # noise head, mean over frames
    inactive: np.ndarray | None = field(default=None, repr=False, compare=False)
    noise_latent_mean: np.ndarray | None = field(default=None, repr=False, compare=False)
    noise_latent_std: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.detector not in ("counting", "integrating"):
            raise ValueError(f"detector={self.detector!r}: expected counting or integrating")
        if not self.gain_adu_per_photon > 0:
            raise ValueError(f"gain_adu_per_photon={self.gain_adu_per_photon} must be > 0")
        for name in ("hot_pixel_fraction", "dead_pixel_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.inactive is not None and tuple(self.inactive.shape) != tuple(self.shape):
            raise ValueError(f"inactive mask shape {self.inactive.shape} is not {self.shape}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dose_range", tuple(float(d) for d in self.dose_range))

    def scalars(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k not in ("inactive", "noise_latent_mean", "noise_latent_std")}
        d["shape"] = list(self.shape)
        d["dose_range"] = list(self.dose_range)
        d["inactive_fraction"] = (0.0 if self.inactive is None
                                  else round(float(self.inactive.mean()), 6))
        return d


@dataclass(frozen=True)
class NoiseModel:
    """Per-instrument noise of one beamtime; ``provenance`` names frames and model."""

    instruments: tuple[InstrumentNoise, ...]
    provenance: dict = field(default_factory=dict)
    version: int = NOISE_MODEL_VERSION

    def __post_init__(self) -> None:
        if not self.instruments:
            raise ValueError("a noise model needs at least one instrument")
        object.__setattr__(self, "instruments", tuple(self.instruments))

    def draw(self, rng: np.random.Generator) -> InstrumentNoise:
        """One instrument, with the probability of its share of the fitted frames."""
        w = np.array([i.frames for i in self.instruments], dtype=np.float64)
        return self.instruments[int(rng.choice(len(w), p=w / w.sum()))]


# ------------------------------------------------------------------------------------ file
def noise_model_paths(path: str | Path) -> tuple[Path, Path]:
    """(JSON, NPZ) of a model written at ``path`` (``x``, ``x.json`` or ``x.npz``)."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".npz") else path
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".npz")


def save_noise_model(model: NoiseModel, path: str | Path) -> Path:
    """Write the JSON and its ``.npz``; returns the JSON path."""
    jpath, npath = noise_model_paths(path)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for i, inst in enumerate(model.instruments):
        for key in ("inactive", "noise_latent_mean", "noise_latent_std"):
            value = getattr(inst, key)
            if value is not None:
                arrays[f"{key}_{i}"] = np.asarray(value)
    tmp = npath.with_name(npath.name + ".partial.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(npath)
    doc = {
        "format": "gisaxs-bluesky noise model",
        "version": model.version,
        "arrays": {"file": npath.name, "sha256": _sha256(npath), "keys": sorted(arrays)},
        "instruments": [inst.scalars() for inst in model.instruments],
        "provenance": model.provenance,
    }
    jpath.write_text(json.dumps(doc, indent=2, default=_json_default))
    return jpath


def load_noise_model(path: str | Path) -> NoiseModel:
    """Read a model written by :func:`save_noise_model`; faults raise NoiseModelError."""
    jpath, npath = noise_model_paths(path)
    if not jpath.is_file():
        raise NoiseModelError(f"noise model {jpath}: file not found")
    try:
        doc = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NoiseModelError(f"noise model {jpath}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != "gisaxs-bluesky noise model":
        raise NoiseModelError(f"noise model {jpath}: not a gisaxs-bluesky noise model "
                              "(key 'format' missing or different)")
    if doc.get("version") != NOISE_MODEL_VERSION:
        raise NoiseModelError(f"noise model {jpath}: version {doc.get('version')!r}, this "
                              f"package reads version {NOISE_MODEL_VERSION}")
    for key in ("arrays", "instruments"):
        if key not in doc:
            raise NoiseModelError(f"noise model {jpath}: key {key!r} missing")
    npath = jpath.with_name(doc["arrays"].get("file", npath.name))
    if not npath.is_file():
        raise NoiseModelError(f"noise model {jpath}: its arrays file {npath} is not found")
    if doc["arrays"].get("sha256") != _sha256(npath):
        raise NoiseModelError(f"noise model arrays {npath}: sha256 does not match the one in "
                              f"{jpath.name} (corrupt or replaced)")
    try:
        with np.load(npath) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile / pickle errors of a damaged file
        raise NoiseModelError(f"noise model arrays {npath}: unreadable ({exc})") from exc
    required = ("shape", "detector", "frames", "gain_adu_per_photon", "read_noise_adu",
                "dose_log_mean", "background_fraction", "hot_pixel_fraction",
                "dead_pixel_fraction")
    fields = set(InstrumentNoise.__dataclass_fields__)
    instruments = []
    for i, entry in enumerate(doc["instruments"]):
        missing = [k for k in required if k not in entry]
        if missing:
            raise NoiseModelError(f"noise model {jpath}: instrument {i} lacks {missing}")
        kw = {k: v for k, v in entry.items() if k in fields}
        for key in ("inactive", "noise_latent_mean", "noise_latent_std"):
            if f"{key}_{i}" in arrays:
                kw[key] = arrays[f"{key}_{i}"].astype(bool if key == "inactive" else np.float32)
        try:
            instruments.append(InstrumentNoise(**kw))
        except (TypeError, ValueError) as exc:
            raise NoiseModelError(f"noise model {jpath}: instrument {i}: {exc}") from exc
    if not instruments:
        raise NoiseModelError(f"noise model {jpath}: no instruments")
    return NoiseModel(tuple(instruments), doc.get("provenance", {}), doc["version"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------------- statistics
def background_level(photons: np.ndarray, valid: np.ndarray, block: int = BLOCK_PX,
                     quantile: float = BACKGROUND_QUANTILE) -> float:
    """The floor of a frame: the ``quantile`` of the means of its fully valid blocks (photons).

    The same estimator reads the fitted frames and the simulated expected intensity, so the
    background that :func:`apply_noise_model` adds is what the fit would find."""
    h, w = (s // block * block for s in photons.shape)
    x = np.where(valid, photons, 0)[:h, :w].astype(np.float64)
    ok = valid[:h, :w]
    hb, wb = h // block, w // block
    sums = x.reshape(hb, block, wb, block).sum(axis=(1, 3))
    n = ok.reshape(hb, block, wb, block).sum(axis=(1, 3))
    full = n >= 0.75 * block * block
    if not full.any():
        return 0.0
    return float(np.quantile(sums[full] / n[full], quantile))


def resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask (a model fitted on another frame size)."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    zoom = (shape[0] / mask.shape[0], shape[1] / mask.shape[1])
    out = ndimage.zoom(mask.astype(np.uint8), zoom, order=0, grid_mode=True, mode="nearest")
    return out[: shape[0], : shape[1]].astype(bool)


# --------------------------------------------------------------------------------- apply
def noise_spec(inst: InstrumentNoise, rng: np.random.Generator,
               dose_counts: float | None = None) -> NoiseSpec:
    """The labels of a frame made with ``inst``: its physical kinds, and the other kinds drawn
    with the noise head's probability (severity uniform in 0.3-1, as random_noise draws)."""
    if dose_counts is None:
        lo, hi = inst.dose_range
        # log-normal over the fitted frames, kept within the doses they had
        d = float(np.exp(rng.normal(inst.dose_log_mean, inst.dose_log_std)))
        dose_counts = float(np.clip(d, lo, hi))
    kinds: dict[str, float] = {"poisson": 1.0}
    if inst.detector == "integrating":
        kinds["readout"] = float(np.clip((inst.read_noise_adu / inst.gain_adu_per_photon - 0.5)
                                         / 4.0, 0.05, 1.0))
    if inst.hot_pixel_fraction > 0:
        kinds["hot_pixels"] = float(np.clip(inst.hot_pixel_fraction * 1e3, 0.05, 1.0))
    if inst.dead_pixel_fraction > 0:
        kinds["dead_pixels"] = float(np.clip(inst.dead_pixel_fraction * 50, 0.05, 1.0))
    if inst.inactive is not None and inst.inactive.any():
        kinds["gaps"] = 1.0
    for kind in NOISE_KINDS:
        if kind in PHYSICAL_KINDS:
            continue
        if rng.random() < float(inst.kind_probability.get(kind, 0.0)):
            kinds[kind] = float(rng.uniform(0.3, 1.0))
    return NoiseSpec(dose_counts=max(dose_counts, 1e-3), kinds=kinds)


def apply_noise_model(expected: np.ndarray, inst: InstrumentNoise, rng: np.random.Generator,
                      *, valid: np.ndarray | None = None, reference: np.ndarray | None = None,
                      spec: NoiseSpec | None = None) -> np.ndarray:
    """What ``inst``'s detector writes for ``expected`` photons per pixel (a clean frame).

    Background raised to ``background_fraction`` x the median (the pattern scaled so that the
    median stays), Poisson photons, hot and
    dead pixels, zingers / saturation when ``spec`` has them, then ADU = gain x photons +
    offset + read noise for an integrating detector (float32; int32 for a counting one), and
    the inactive area (resized to the frame) set to ``inactive_value``. ``valid``: pixels
    that hold data in ``expected`` (default: > 0); ``reference``: those whose median is the
    dose (default: ``valid`` outside the inactive area; simulate() scales off the beamstop)."""
    expected = np.asarray(expected, dtype=np.float32)
    valid = expected > 0 if valid is None else np.asarray(valid, dtype=bool)
    inactive = None if inst.inactive is None else resized(inst.inactive, expected.shape)
    if reference is None:
        reference = valid if inactive is None else valid & ~inactive
    lam = expected.copy()
    if reference.any():
        # lam = a * expected + b on valid pixels, so that its median stays the dose D (the
        # median of ``expected``) and its floor is background_fraction x D, as measured
        dose = float(np.median(expected[reference]))
        floor = background_level(expected, reference)
        f = min(inst.background_fraction, 0.99)
        if f * dose > floor and dose > floor:
            a = dose * (1 - f) / (dose - floor)
            lam[valid] = np.float32(a) * expected[valid] + np.float32(f * dose - a * floor)
    counts = rng.poisson(lam).astype(np.float32)
    flat = np.flatnonzero(valid)
    if inst.hot_pixel_fraction > 0 and flat.size:
        n = rng.binomial(flat.size, inst.hot_pixel_fraction)
        idx = rng.choice(flat, n, replace=False)
        counts.flat[idx] = 10 ** rng.normal(inst.hot_log10_mean, inst.hot_log10_std, n)
    if inst.dead_pixel_fraction > 0 and flat.size:
        n = rng.binomial(flat.size, inst.dead_pixel_fraction)
        counts.flat[rng.choice(flat, n, replace=False)] = 0
    if spec is not None and spec.has("zingers"):
        _noise.add_zingers(counts, rng, spec.severity("zingers"))
    if spec is not None and spec.has("saturation") and flat.size:
        _noise.add_saturation(counts, spec.severity("saturation"), valid)
    if inst.detector == "integrating":
        adu = counts * np.float32(inst.gain_adu_per_photon) + np.float32(inst.offset_adu)
        adu += rng.normal(0.0, inst.read_noise_adu, adu.shape).astype(np.float32)
        out = adu
    else:
        out = np.rint(np.minimum(counts, OVERFLOW_COUNTS)).astype(np.int32)
    if inactive is not None:
        out[inactive] = inst.inactive_value
    return out


def simulate_with_noise_model(
    sample: Sample,
    geometry: Geometry,
    model: NoiseModel,
    rng: np.random.Generator,
    *,
    compute_binning: int = 1,
    dose_counts: float | None = None,
) -> tuple[SimResult, NoiseSpec]:
    """One frame of ``sample`` with the noise of one of ``model``'s instruments (drawn).

    The pattern kinds (beamstop off its place, parasitic scattering, misalignment) go through
    :func:`simulate`; the detector's own noise through :func:`apply_noise_model`. Returns the
    result (labels: the applied kinds) and its NoiseSpec."""
    inst = model.draw(rng)
    spec = noise_spec(inst, rng, dose_counts)
    pattern = NoiseSpec(spec.dose_counts, {k: v for k, v in spec.kinds.items()
                                           if k in _PATTERN_KINDS})
    clean = simulate(sample, geometry, pattern, rng, compute_binning=compute_binning)
    valid = ~geometry.detector.gap_mask()
    reference = ~clean.mask  # gaps and the nominal beamstop: simulate() scales off them
    if inst.inactive is not None:
        reference &= ~resized(inst.inactive, clean.expected.shape)
    counts = apply_noise_model(clean.expected, inst, rng, valid=valid, reference=reference,
                               spec=spec)
    if inst.detector == "counting" and spec.has("gaps"):
        counts[~valid] = -1
    labels = {**clean.labels, "noise": spec.labels(), "noise_vector": spec.label_vector(),
              "noise_model": {"shape": list(inst.shape), "detector": inst.detector}}
    return replace(clean, counts=counts, labels=labels), spec
