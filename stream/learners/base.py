"""The interface between the stream and a learner.

A learner reads some topics, predicts first and learns second
(test-then-train). The pipeline calls ``predict`` then ``learn`` for every
event of a topic in ``reads`` (decoded into its contract type, or a dict for
topics outside the contracts), in partition order, and publishes what
``predict`` returns (if anything) to ``output_topic`` inside the common output
envelope. Labels that arrive later are just more events the learner reads;
the learner joins them with what it predicted (see ``stream.labels``).

Everything a learner decides depends only on the events and their ``ts``
(event time), never on the wall clock, and its random choices are seeded, so
the same events in the same order give the same predictions live or replayed.
A learner's whole state is its pickled self: checkpoints save and restore it.

With scale-out each task runs its own copy of every learner; what is global by
nature (linear weights, scaler statistics, label counters, item factors, ...)
is read with ``global_params`` and merged across the copies by model sync
(``stream.sync``, ``stream.sync_topic``), then set back with
``set_global_params``. The default covers the linear models and standard
scalers of the learner's River ``model``; learners add their own counters.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from stream.evaluation import Evaluation
from stream.events import Event
from stream.sync import Params, assign_model_params, model_params

__all__ = ["Learner"]


class Learner(abc.ABC):
    #: The learner's kind, as written in config (``kind = "risk"``).
    kind: ClassVar[str]

    def __init__(self, name: str, output_topic: str, reads: frozenset[str]) -> None:
        self.name = name
        self.output_topic = output_topic
        self.reads = reads
        #: Bumped when the serving model is replaced (import, rollback, drift switch).
        self.model_version = 1
        #: Events learned from; with ``model_version`` it identifies the model.
        self.n_learned = 0

    @abc.abstractmethod
    def predict(self, event: Event) -> Any | None:
        """Score ``event`` with the current model, before learning from it.

        Returns the ``prediction`` object to publish (msgspec-encodable: a
        Struct or a dict), or None when this event yields no output (a label,
        or an event the learner only learns from)."""

    @abc.abstractmethod
    def learn(self, event: Event) -> None:
        """Update the model and its state with ``event`` (after ``predict``)."""

    def quality(self) -> Iterator[tuple[str, str, float]]:
        """Current prequential quality as ``(metric, window, value)``, window in
        {cumulative, rolling}; read by the metrics collector at scrape time,
        never on the hot path. Learners keep an ``Evaluation`` and yield its values."""
        evaluation: Evaluation | None = getattr(self, "evaluation", None)
        if evaluation is not None:
            yield from evaluation.values()

    def label_stats(self) -> Mapping[str, int]:
        """Cumulative label-join counters, read by the metrics collector at scrape
        time as ``stream_labels_total{learner, outcome}``. Learners whose labels
        arrive later override it; keys are a small fixed vocabulary (at most 16
        are exported, never ids): ``received`` (label records read), ``joined``
        (matched a pending prediction), ``unmatched`` (no pending prediction:
        too late or unknown), ``expired`` (a prediction's label window closed
        without a label), ``evicted`` (a pending prediction pushed out by the
        capacity bound). Default: none."""
        return {}

    def replace_model(self, model: Any) -> None:
        """Serve ``model`` from now on (warm start, rollback, drift switch)."""
        raise NotImplementedError(f"{type(self).__name__} does not support replacing its model")

    def global_params(self) -> Params:
        """The parameters model sync merges across tasks (``stream.sync.Params``). Default: the
        weights and intercepts of the linear models and the moments of the standard scalers in
        ``self.model`` (none for a learner without one). Read between events, never on the hot path."""
        model = getattr(self, "model", None)
        return model_params(model) if model is not None else Params()

    def set_global_params(self, params: Params) -> None:
        """Continue from the merged ``params`` (what ``global_params`` returns, merged over every task)."""
        model = getattr(self, "model", None)
        if model is not None:
            assign_model_params(model, params)
