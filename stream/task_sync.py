"""The seam between the application's tasks and model sync.

With scale-out, each task (one partition number of a learner's co-partitioned
inputs) runs its own copy of every learner. Parameters that are global by
nature (linear weights, scaler statistics, item factors, popularity counts,
anomaly-detector masses, label counts) drift apart between the copies;
a ``TaskSync`` merges them: between the tasks of this instance and, through a
compacted model-sync topic, with the tasks other instances own.

The application calls ``tick`` after each batch it processed, with the
learners of every task it owns now (tasks come and go with rebalances), and
stamps each output with ``version(task)``. ``NoSync`` is the one-task case
and ``[sync] enabled = false``: each task learns alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from stream.learners.base import Learner

__all__ = ["NoSync", "TaskSync"]


class TaskSync(Protocol):
    def tick(self, tasks: Mapping[int, Sequence[Learner]], events: int) -> None:
        """Merge when due (every ``sync`` events or seconds). ``tasks`` maps each task this instance
        owns to its learners, in config order; ``events`` is how many events were processed since the
        last call. Never raises for a broker hiccup: a merge that cannot happen now happens later."""

    def version(self, task: int) -> int:
        """The model-sync version the task's learners reflect (0 before any merge)."""

    def close(self) -> None:
        """Flush what is pending and release the clients."""


class NoSync:
    """Each task learns alone: nothing merged, every version 0.

    >>> s = NoSync(); s.tick({0: []}, 10); s.version(0)
    0
    """

    def tick(self, tasks: Mapping[int, Sequence[Learner]], events: int) -> None:
        return None

    def version(self, task: int) -> int:
        return 0

    def close(self) -> None:
        return None
