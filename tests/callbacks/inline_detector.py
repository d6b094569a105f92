"""A bluesky readable whose image goes inline into the event (for the callback tests)."""

from __future__ import annotations

import time


class InlineDetector:
    """Minimal bluesky readable whose image goes inline into the event (frames from a list)."""

    def __init__(self, frames, name: str = "cam", shape=(160, 150)) -> None:
        self.name, self.parent = name, None
        self.frames = list(frames)
        self.shape = list(shape)
        self.i = 0

    def describe(self):
        return {f"{self.name}_image": {"source": "sim", "dtype": "array", "shape": self.shape,
                                       "dtype_numpy": "<i4"}}

    def read(self):
        frame = self.frames[self.i % len(self.frames)]
        self.i += 1
        return {f"{self.name}_image": {"value": frame, "timestamp": time.time()}}

    def read_configuration(self):
        return {}

    def describe_configuration(self):
        return {}
