"""The plan an accepted suggestion queues; import it in the Queue Server's startup code.

    from gisaxs_bluesky.qserver_plans import measure_suggestion  # in the startup script

Annotations are real objects (no ``from __future__ import annotations``): the Queue Server
reads them to validate a queued item and to turn device names into devices.
"""

from collections.abc import Sequence
from typing import Any, Optional

from bluesky import plans as bp
from bluesky.protocols import Movable, Readable

__all__ = ["measure_suggestion"]


def measure_suggestion(
    detectors: Sequence[Readable],
    motors: Sequence[Movable],
    positions: Sequence[float],
    *,
    md: Optional[dict[str, Any]] = None,  # noqa: UP045 - the Queue Server reads it
):
    """Move ``motors`` to ``positions`` and read ``detectors`` once (one run, tagged ``md``)."""
    if len(motors) != len(positions):
        raise ValueError(f"{len(motors)} motors for {len(positions)} positions")
    args: list[Any] = []
    for motor, x in zip(motors, positions, strict=True):
        args += [motor, [float(x)]]
    return (yield from bp.list_scan(list(detectors), *args, md=md))
