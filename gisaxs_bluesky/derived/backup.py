"""The local backup of derived rows and metadata Tiled could not take (yet)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import RuntimeConfig

__all__ = ["LocalBackup", "default_backup_dir", "jsonable", "safe_key"]


def default_backup_dir() -> Path:
    """Per-user cache dir for rows that could not reach Tiled."""
    return RuntimeConfig().backup_path


def safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


class LocalBackup:
    """Append-only local store of rows (npz chunks) and pending metadata for one node."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz")) if self.dir.exists() else []

    def write_open_params(self, params: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.dir / "open.json", params)

    def add_rows(self, cols: Mapping[str, np.ndarray]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"chunk-{time.time_ns():020d}-{os.getpid()}.npz"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in cols.items()})
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def seq_nums(self) -> set[int]:
        out: set[int] = set()
        for p in self.chunks():
            with np.load(p, allow_pickle=False) as z:
                out.update(int(s) for s in z["seq_num"])
        return out

    def pending_metadata(self) -> dict[str, Any]:
        p = self.dir / "metadata.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def set_pending_metadata(self, md: Mapping[str, Any]) -> None:
        p = self.dir / "metadata.json"
        if md:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_json(p, md)
        elif p.exists():
            p.unlink()

    def fault(self) -> str | None:
        p = self.dir / "fault.txt"
        return p.read_text() if p.exists() else None

    def set_fault(self, reason: str | None) -> None:
        """Why rows wait here (e.g. Tiled refused the key), for the user who looks in the dir."""
        p = self.dir / "fault.txt"
        if reason:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(reason + "\n")
            os.replace(tmp, p)
        elif p.exists():
            p.unlink()

    def cleanup(self) -> None:
        """Remove the directory when nothing is pending."""
        if self.dir.exists() and not self.chunks() and not (self.dir / "metadata.json").exists():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def jsonable(md: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(md), default=_json_default))
