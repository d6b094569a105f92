"""Accepted suggestions become plans in the bluesky Queue Server; decisions go to Tiled.

A suggestion (a row of ``/gisaxs_derived/<raw_uid>-suggestions/suggestions``, see
:mod:`gisaxs_bluesky.adaptive.tiled_io`) is identified by :func:`suggestion_id`, a hash of its
round, reason and position, so the id survives re-reads in any order. Accepting one adds a plan
to the Queue Server queue (:func:`~gisaxs_bluesky.qserver_plans.measure_suggestion` of the
configured detectors at the suggested motor position by default) whose ``md`` carries
``gisaxs_suggestion_id``, ``gisaxs_raw_uid`` and ``gisaxs_reason``; rejecting one queues
nothing. Either way the decision (who, when, accepted/rejected, queue item uid) is appended to
the ``decisions`` table of the same suggestions node. Nothing is queued without a decision
unless auto-approval is switched on with a point budget per raw run
(:meth:`QueueBridge.auto_approve`).

Safety: a suggestion is decided once. Before queueing, the decisions in Tiled, the decisions
kept locally (Tiled unreachable at the time) and the Queue Server's queue, running item and
history are checked for the id; a second accept raises :class:`DecisionError` naming the first
one and queues nothing. A decision that cannot reach Tiled after its plan was queued is kept in
a local JSON-lines file and re-sent by the next call, so nothing is lost.
"""

from .bridge import QueueBridge
from .cli import add_arguments, run
from .decisions import (
    DECISIONS_TABLE,
    DecisionError,
    read_decisions,
    read_suggestions_with_ids,
    suggestion_id,
)

__all__ = [
    "DECISIONS_TABLE",
    "DecisionError",
    "QueueBridge",
    "suggestion_id",
    "read_suggestions_with_ids",
    "read_decisions",
    "add_arguments",
    "run",
]
