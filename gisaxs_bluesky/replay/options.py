"""What a replay is told (ReplayOptions) and what it reports per run (RunSummary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..runtime import DEFAULT_ROOT, RuntimeConfig

SUMMARY_STATUSES = ("complete", "up-to-date", "partial", "interrupted", "failed", "missing",
                    "no-image", "busy")


class ReplayError(RuntimeError):
    """A replay problem that stops one run (message names the run and field)."""


# --------------------------------------------------------------------------------- results
@dataclass
class RunSummary:
    """Outcome of replaying one run."""

    uid: str
    status: str = "failed"
    scan_id: int | None = None
    node_key: str | None = None
    model_id: str | None = None
    n_frames: int | None = None  # frames in the raw run (None when unknown)
    frames_written: int = 0  # rows appended by this replay
    frames_skipped: int = 0  # seq_nums already stored (not re-read)
    frames_failed: int = 0  # frames that could not be read (no row written)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("complete", "up-to-date")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayOptions:
    """Settings shared by every run of a replay (picklable: sent to Dask workers)."""

    model: str = "pretrained"  # "pretrained", a checkpoint path, or "untrained[:seed]"
    device: str = "cpu"
    root: str = DEFAULT_ROOT
    backup_dir: str | None = None
    method: str = "auto"  # auto | arrays | documents | callback
    stream: str = "primary"
    image_key: str | None = None
    chunk_size: int = 16
    batch_size: int = RuntimeConfig.batch_size
    binner_state: str | None = None  # initial binner (JSON from OnlineBinner.save)
    max_frames: int | None = None  # stop a run after this many new rows (partial replay)
    # wait this long (s) for another writer of the same node on this machine (another replay,
    # the live callback) before reporting the run "busy"
    lock_timeout: float = 0.0
    # the frames' geometry (a q-grid model needs it): an InstrumentGeometry, a mapping of
    # gisaxs_geometry keys or a PONI / JSON path, before the run's own; and fields to assume
    # where neither gives them (see gisaxs_bluesky.frames.FrameGeometry)
    geometry: Any = None
    geometry_fallback: Any = None

    def __post_init__(self) -> None:
        if self.method not in ("auto", "arrays", "documents", "callback"):
            raise ValueError(
                f"method={self.method!r}: expected auto, arrays, documents or callback"
            )
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} must be >= 1")


# -------------------------------------------------------------------------------- selection
