"""A learner defined entirely in configuration.

A team names the input topic, the feature fields (or all fields but the label
and the ids), the label, the task and a River model, and gets predictions,
metrics and checkpoints exactly like the built-in learners. The label is a
field of the same event (known at once), or of a record of another topic
joined by an id within an event-time window (see ``stream.labels``).

>>> from stream.models import build_model
>>> spec = CustomSpec(input="purchases", output_topic="big-orders", label="quantity",
...     task="regression", features=["unit_price"],
...     model={"class": "linear_model.LinearRegression"})
>>> spec.validate("orders")
>>> learner = spec.build("orders", {"purchases": "purchases"})
>>> learner.predict({"unit_price": 10.0, "quantity": 3})
{'value': 0.0}
>>> learner.learn({"unit_price": 10.0, "quantity": 3})
>>> learner.n_learned
1
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from river import base

from stream.drift import DriftMonitor, DriftSpec, Switch
from stream.evaluation import Evaluation
from stream.learners.base import Learner
from stream.models import build_model

__all__ = ["ConfiguredLearner", "CustomSpec"]

Task = Literal["binary", "multiclass", "regression"]
_IDS = frozenset({"event_id", "ts", "user_id", "item_id", "order_id", "session_id", "device_id"})


class CustomSpec(msgspec.Struct, tag="custom", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    #: Input topic: a contract stream name (``purchases``) or any topic of JSON objects.
    input: str
    output_topic: str
    #: Field holding the label (in the input event, or in ``label_topic``'s records).
    label: str
    task: Task
    #: River model: ``{class, params}`` or a list of them composed into a pipeline.
    model: dict[str, Any] | list[dict[str, Any]]
    #: Feature fields; empty means every field except the label and the ids.
    features: list[str] = []
    #: Fields never used as features (in addition to the label and the well-known ids).
    exclude: list[str] = []
    #: Field naming the entity (record key); excluded from features.
    key: str | None = None
    #: When the label arrives in another topic: that topic and the id joining the two.
    label_topic: str | None = None
    join_on: str | None = None
    #: How long (event time) a prediction waits for its label before it is dropped.
    label_window_s: float = 3600.0
    #: Bounds on predictions waiting for labels.
    max_pending: int = 100_000
    #: Concept drift on the prediction errors: ``{ detector = "adwin", reaction = "report" | "switch" }``
    #: (see ``stream.drift.DriftSpec``); absent: quality is measured, drift is not watched.
    drift: DriftSpec | None = None

    def validate(self, name: str) -> None:
        if (self.label_topic is None) != (self.join_on is None):
            raise ValueError("`label_topic` and `join_on` go together")
        if self.label_window_s <= 0 or self.max_pending < 1:
            raise ValueError("`label_window_s` and `max_pending` must be positive")
        if self.drift is not None:
            self.drift.validate()
        model = build_model(self.model, "model")
        expected = {"binary": base.Classifier, "multiclass": base.Classifier, "regression": base.Regressor}[self.task]
        if not isinstance(model, expected):
            raise ValueError(f"model: a {self.task} task needs a River {expected.__name__}, got {type(model).__name__}")

    def build(self, name: str, topics: Mapping[str, str]) -> ConfiguredLearner:
        return ConfiguredLearner(name, self, topics)


def _as_dict(event: Any) -> Mapping[str, Any]:
    return event if isinstance(event, Mapping) else msgspec.structs.asdict(event)


class ConfiguredLearner(Learner):
    kind = "custom"

    def __init__(self, name: str, spec: CustomSpec, topics: Mapping[str, str]) -> None:
        self.input_topic = topics.get(spec.input, spec.input)
        self.label_topic = topics.get(spec.label_topic, spec.label_topic) if spec.label_topic else None
        reads = {self.input_topic} | ({self.label_topic} if self.label_topic else set())
        super().__init__(name, spec.output_topic, frozenset(reads))
        self.spec = spec
        model = build_model(spec.model)
        # With reaction "switch" the model is an AdaptiveModel that is also the monitor.
        self.model: Any = model
        monitor: DriftMonitor | None = None
        if spec.drift is not None:
            self.model, monitor = spec.drift.build(model, task=spec.task, name=name, on_switch=self._model_switched)
        self.evaluation = _EVALUATIONS[spec.task](_QUALITY_WINDOW, drift=monitor)
        #: The last event predicted and its prediction: the label is in the same
        #: event, so ``learn`` evaluates the prediction ``predict`` just made.
        self._scored: tuple[Any, Any] | None = None
        self._excluded = frozenset({spec.label, *spec.exclude, *([spec.key] if spec.key else [])}) | _IDS
        if spec.label_topic is not None:
            raise NotImplementedError("joined labels are added with stream.labels")

    def features(self, record: Mapping[str, Any]) -> dict[str, float]:
        """Numbers as they are, strings one-hot (``field=value``), booleans as 0/1."""
        names = self.spec.features or [k for k in record if k not in self._excluded]
        x: dict[str, float] = {}
        for k in names:
            v = record.get(k)
            if v is None:
                continue
            if isinstance(v, bool):
                x[k] = float(v)
            elif isinstance(v, (int, float)):
                if math.isfinite(v):
                    x[k] = float(v)
            elif isinstance(v, str):
                x[f"{k}={v}"] = 1.0
        return x

    def predict(self, event: Any) -> dict[str, Any] | None:
        record = _as_dict(event)
        x = self.features(record)
        if self.spec.task == "regression":
            value = float(self.model.predict_one(x))
            self._scored = (event, value)
            return {"value": value}
        proba = self.model.predict_proba_one(x)
        self._scored = (event, proba)
        if self.spec.task == "binary":
            return {"probability": float(proba.get(True, 0.0))}
        label = max(proba, key=proba.__getitem__) if proba else None
        return {"label": label, "probabilities": {str(k): float(v) for k, v in proba.items()}}

    def learn(self, event: Any) -> None:
        record = _as_dict(event)
        y = record.get(self.spec.label)
        if y is None:
            raise ValueError(f"label field `{self.spec.label}` is missing")
        if self.spec.task == "binary":
            y = bool(y)
        elif self.spec.task == "regression":
            y = float(y)
        scored, self._scored = self._scored, None
        if scored is not None and scored[0] is event:
            self._evaluate(y, scored[1], record.get("ts") or 0)
        self.model.learn_one(self.features(record), y)
        self.n_learned += 1

    def _evaluate(self, y: Any, prediction: Any, ts: int) -> None:
        if self.spec.task == "binary":
            self.evaluation.binary(y, float(prediction.get(True, 0.0)), ts)
        elif self.spec.task == "multiclass":
            self.evaluation.multiclass(y, prediction, ts)
        else:
            self.evaluation.regression(y, prediction, ts)

    def _model_switched(self, switch: Switch) -> None:
        self.model_version += 1


#: Rolling window (outcomes) of the windowed quality metrics.
_QUALITY_WINDOW = 10_000
_EVALUATIONS = {
    "binary": Evaluation.for_binary,
    "multiclass": Evaluation.for_multiclass,
    "regression": Evaluation.for_regression,
}
