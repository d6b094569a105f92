"""How the live callback, ``serve`` and replay run: one configuration, each default once.

Callback keyword arguments and CLI flags map onto :class:`RuntimeConfig`; the defaults below
are the only place they are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ROOT", "RuntimeConfig", "add_runtime_arguments", "cache_dir"]

#: top-level Tiled container of the derived nodes
DEFAULT_ROOT = "gisaxs_derived"


def cache_dir() -> Path:
    """The per-user cache of the package (binner states, backups, spilled frames, models)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gisaxs_bluesky"


@dataclass(frozen=True)
class RuntimeConfig:
    """Runtime settings (not model numbers: those are in :mod:`gisaxs_bluesky.config`).

    root: Tiled container of the derived nodes. backup_dir: rows Tiled could not take
    (default ``<cache>/derived_backup``). spill_dir: frames spilled from a full queue
    (default ``<cache>/spill``). batch_size / batch_timeout: frames encoded together, or
    whatever arrived within that many seconds. write_interval / max_write_rows: a run's rows
    go to Tiled at most once per interval (its first batch at once), sooner when that many
    wait. summary_interval: the node's bin summary follows at most this often.
    max_queue / put_timeout: in-memory frames waiting for the worker, and how long the
    RunEngine thread may wait for room before a frame is spilled to disk. frame_timeout: how
    long to wait for a frame that lags behind its document. probe_timeout: the reachability
    probe of Tiled. torch_threads: CPU threads for inference ("auto": all cores but one).
    """

    root: str = DEFAULT_ROOT
    backup_dir: Path | None = None
    spill_dir: Path | None = None
    batch_size: int = 16
    batch_timeout: float = 0.5
    write_interval: float = 1.0
    max_write_rows: int = 256
    summary_interval: float = 1.0
    max_queue: int = 64
    put_timeout: float = 0.0
    frame_timeout: float = 5.0
    probe_timeout: float = 2.0
    torch_threads: int | str | None = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"root={self.root!r} must be a non-empty string")
        for name in ("batch_size", "max_queue", "max_write_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_timeout <= 0:
            raise ValueError(f"batch_timeout={self.batch_timeout} must be > 0")
        for name in ("write_interval", "summary_interval", "put_timeout", "frame_timeout",
                     "probe_timeout"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        t = self.torch_threads
        if t is not None and t != "auto" and (not str(t).isdigit() or int(t) < 1):
            raise ValueError(f"torch_threads={t!r} must be >= 1, 'auto' or None")
        for name in ("backup_dir", "spill_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    @property
    def backup_path(self) -> Path:
        return self.backup_dir if self.backup_dir is not None else cache_dir() / "derived_backup"

    @property
    def spill_path(self) -> Path:
        return self.spill_dir if self.spill_dir is not None else cache_dir() / "spill"

    @property
    def n_torch_threads(self) -> int | None:
        """Threads for torch on CPU (None: leave torch as it is)."""
        if self.torch_threads is None:
            return None
        if self.torch_threads == "auto":
            return max(1, (os.cpu_count() or 2) - 1)
        return int(self.torch_threads)

    def replace(self, **changes: Any) -> RuntimeConfig:
        """A copy with ``changes``; TypeError names a setting that does not exist."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown runtime setting(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: RuntimeConfig | None = None
                  ) -> RuntimeConfig:
        """The settings given on a command line made by :func:`add_runtime_arguments`."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return (base or cls()).replace(**given)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags for the runtime settings (default: the RuntimeConfig defaults)."""
    d = RuntimeConfig()
    g = parser.add_argument_group("runtime")
    g.add_argument("--root", default=None, help=f"Tiled container of derived nodes ({d.root})")
    g.add_argument("--backup-dir", default=None,
                   help="rows Tiled could not take (default: user cache)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"frames encoded together ({d.batch_size})")
    g.add_argument("--write-interval", type=float, default=None,
                   help=f"seconds between a run's Tiled writes ({d.write_interval})")
    g.add_argument("--frame-timeout", type=float, default=None,
                   help=f"seconds to wait for a lagging frame ({d.frame_timeout})")
    g.add_argument("--torch-threads", default=None,
                   help=f"CPU threads for inference ({d.torch_threads!r}: all cores but one)")
