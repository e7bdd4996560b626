"""Validation of a model before it serves: its prequential error on a holdout.

``stream model import`` and ``rollback`` score the candidate and the current
learner on the recent input records a checkpoint keeps (its holdout), and
refuse a candidate that does clearly worse (``[checkpoints] max_degradation``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stream.checkpoint import StoredRecord
from stream.learners import Learner
from stream.learners.configured import as_dict
from stream.pipeline import Pipeline

__all__ = ["HoldoutScore", "holdout_error"]


class _ErrorMean:
    """Stands in for a drift detector: an ``Evaluation`` reports every prediction's error to it."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0

    def update(self, error: float, ts: Any = None, outcome: tuple[bool, float] | None = None) -> bool:
        if math.isfinite(error):
            self.n += 1
            self.total += error
        return False


class _NullSink:
    """Swallows outputs; counts dead letters (records the learner failed on)."""

    def __init__(self) -> None:
        self.failed = 0

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        if headers is not None:
            self.failed += 1


@dataclass(frozen=True)
class HoldoutScore:
    """Mean per-prediction error over ``n`` scored records; ``failed`` records made the learner raise."""

    mean: float
    n: int
    failed: int


_EPS = 1e-15


def _spec_error(spec: Any, prediction: Any, record: Mapping[str, Any]) -> float | None:
    """The error of a config-defined learner's prediction, from its spec's label and task."""
    y = record.get(spec.label)
    if y is None or prediction is None:
        return None
    if spec.task == "regression":
        return abs(float(y) - float(prediction["value"]))
    if spec.task == "binary":
        p = min(max(float(prediction["probability"]), _EPS), 1 - _EPS)
        return -math.log(p if bool(y) else 1 - p)
    return 0.0 if prediction.get("label") == y else 1.0


def holdout_error(learner: Learner, records: Iterable[StoredRecord], config: Any) -> HoldoutScore | None:
    """Mean prequential error (predict, score, learn) of a copy of ``learner``
    over ``records``; None when the learner offers no way to score itself.

    Learners that keep an ``Evaluation`` are scored by the error stream it
    feeds to its drift detector (the same numbers the drift monitor sees), so
    this works for every kind; a config-defined learner without one is scored
    from its spec's label and task. The incumbent has already learned these
    records once, so the comparison favours it: the guard is conservative."""
    lr = copy.deepcopy(learner)
    acc = _ErrorMean()
    sink = _NullSink()
    pipe = Pipeline(
        [lr],
        sink,
        contract_topics=config.input_topics(),
        dead_letter_topic="-",
        max_value_bytes=config.processing.max_value_bytes,
    )
    evaluation = getattr(lr, "evaluation", None)
    if evaluation is not None and hasattr(evaluation, "drift"):
        evaluation.drift = acc
        if hasattr(evaluation, "order_outcomes"):
            # Every error as it comes: holding outcomes back to prediction order (for drift
            # detection) would leave the last label window of the holdout unscored.
            evaluation.order_outcomes(0)
        for r in records:
            if r.topic() in pipe.routes:
                pipe.process(r)
        return HoldoutScore(acc.total / acc.n if acc.n else math.nan, acc.n, sink.failed)
    spec = getattr(lr, "spec", None)
    if spec is None or not hasattr(spec, "label") or not hasattr(spec, "task"):
        return None
    for r in records:
        route = pipe.routes.get(r.topic())
        if route is None:
            continue
        try:
            event = route.decode(r.value())  # type: ignore[arg-type]
        except Exception:  # undecodable records are dead-lettered live; they do not count here
            continue
        try:
            prediction = lr.predict(event)
            err = _spec_error(spec, prediction, as_dict(event))
            lr.learn(event)
        except Exception:
            sink.failed += 1
            continue
        if err is not None:
            acc.update(err)
    return HoldoutScore(acc.total / acc.n if acc.n else math.nan, acc.n, sink.failed)
