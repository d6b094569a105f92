"""One writer per derived node on a machine: a file lock beside the local backup."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .backup import safe_key

__all__ = ["NodeBusyError", "NodeLock"]

logger = logging.getLogger("gisaxs_bluesky.store")


class NodeLock:
    """Exclusive lock on one derived node among the writers of this machine (``flock`` on
    ``backup_dir/.locks/<key>.lock``; released by :meth:`release` or when the process ends).

    Without it, two replays of one run (or a replay of a run the live callback is still
    writing) each read the stored seq_nums, then both append the rest: duplicate rows.
    """

    def __init__(self, directory: Path, key: str) -> None:
        self.path = directory / ".locks" / f"{safe_key(key)}.lock"
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def holder(self) -> str:
        """Who holds the lock (``pid@host`` as written by the holder), or ``?``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` s; True when held (also when the backup
        directory cannot be written: the lock is then only advisory and not taken)."""
        import fcntl

        if self._file is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 - held open while locked
        except OSError as exc:
            logger.warning("cannot create lock %s (%s); writing without it", self.path, exc)
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.close()
                    return False
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}@{socket.gethostname()}\n")
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        """Release (never raises)."""
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()  # closing the descriptor drops the flock


class NodeBusyError(RuntimeError):
    """Another writer on this machine holds the node (see :class:`NodeLock`)."""
