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

With the label in another topic, each prediction waits (its features and the
prediction made) under its ``join_on`` id until a record of ``label_topic``
with that id brings the label, within ``label_window_s`` of event time; then
the prediction is evaluated and the model learns. Predictions whose window
closes unlabelled are dropped (counted ``expired`` in ``label_stats()``).

>>> spec = CustomSpec(input="orders", output_topic="returns-risk", label="returned", task="binary",
...     features=["amount"], label_topic="returns", join_on="order_id", label_window_s=60,
...     model={"class": "linear_model.LogisticRegression"})
>>> learner = spec.build("returns", {})
>>> for record in [{"order_id": "o1", "ts": 0, "amount": 90.0}, {"order_id": "o2", "ts": 10, "amount": 5.0}]:
...     learner.predict(record); learner.learn(record)
{'probability': 0.5}
{'probability': 0.5}
>>> label = {"order_id": "o1", "ts": 5_000, "returned": True}
>>> learner.predict(label) is None
True
>>> learner.learn(label)
>>> learner.learn({"order_id": "o3", "ts": 90_000, "amount": 1.0})   # o2's window closed meanwhile
>>> learner.n_learned, learner.label_stats()["joined"], learner.label_stats()["expired"]
(1, 1, 1)
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from river import base, compose

from stream.bounded import FeatureBound, model_feature_names, model_table_sizes
from stream.drift import AdaptiveModel, DriftMonitor, DriftSpec, Switch
from stream.evaluation import Evaluation
from stream.events import EVENT_TYPES
from stream.labels import LabelJoin
from stream.learners.base import Learner
from stream.models import build_model, with_seed

__all__ = ["ConfiguredLearner", "CustomSpec", "accepts_sample_weight", "as_dict", "field"]

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
    #: A record is told to be a label by its topic's contract type; when neither topic
    #: is a contract stream, by carrying the ``label`` field (input records must not).
    #: Records of both topics need ``ts`` (event time, epoch ms) and the ``join_on`` id.
    label_topic: str | None = None
    join_on: str | None = None
    #: How long (event time) a prediction waits for its label before it is dropped.
    label_window_s: float = 3600.0
    #: Bounds on predictions waiting for labels.
    max_pending: int = 100_000
    #: Features the model keeps state for (weights, optimizer and scaler statistics), least
    #: recently used forgotten first: one-hot features (``field=value``) are named by the
    #: data, so each distinct value would add state for good. Every one-hot feature counts,
    #: and every numeric one too when ``features`` is empty (field names from the data).
    max_one_hot: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    #: Concept drift on the prediction errors: ``{ detector = "adwin", reaction = "report" | "switch" }``
    #: (see ``stream.drift.DriftSpec``); absent: quality is measured, drift is not watched.
    drift: DriftSpec | None = None
    #: Rolling window (outcomes) of the rolling quality metrics.
    evaluation_window: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    #: Given to every (nested) model that takes a ``seed`` and has none.
    seed: int = 42

    def validate(self, name: str) -> None:
        if (self.label_topic is None) != (self.join_on is None):
            raise ValueError("`label_topic` and `join_on` go together")
        if self.label_topic is not None and self.label_topic == self.input:
            raise ValueError("`label_topic` is the input topic: leave it out (the label is a field of the same event)")
        if self.label_window_s <= 0 or self.max_pending < 1:
            raise ValueError("`label_window_s` and `max_pending` must be positive")
        if self.drift is not None:
            self.drift.validate()
        model = build_model(with_seed(self.model, self.seed), "model")
        expected = {"binary": base.Classifier, "multiclass": base.Classifier, "regression": base.Regressor}[self.task]
        if not isinstance(model, expected):
            raise ValueError(f"model: a {self.task} task needs a River {expected.__name__}, got {type(model).__name__}")

    def build(self, name: str, topics: Mapping[str, str]) -> ConfiguredLearner:
        return ConfiguredLearner(name, self, topics)


def as_dict(event: Any) -> Mapping[str, Any]:
    return event if isinstance(event, Mapping) else msgspec.structs.asdict(event)


def field(event: Any, name: str) -> Any:
    """A field of a decoded event, read where it is (no conversion to a dict): an attribute of a
    contract struct, a key of a JSON object; None when absent.

    >>> field({"quantity": 2}, "quantity"), field({}, "quantity")
    (2, None)
    """
    return getattr(event, name, None) if isinstance(event, msgspec.Struct) else event.get(name)


@functools.lru_cache(maxsize=64)
def _struct_features(cls: type, excluded: frozenset[str]) -> tuple[str, ...]:
    """The fields of a contract struct that are features when none are listed (in field order)."""
    return tuple(k for k in cls.__struct_fields__ if k not in excluded)  # type: ignore[attr-defined]


def accepts_sample_weight(model: Any) -> bool:
    """Whether ``learn_one`` of the final estimator (of a pipeline, of an
    ``AdaptiveModel``) takes a sample weight ``w``.

    >>> from river import linear_model, naive_bayes, preprocessing
    >>> accepts_sample_weight(preprocessing.StandardScaler() | linear_model.LogisticRegression())
    True
    >>> accepts_sample_weight(naive_bayes.GaussianNB())
    False
    """
    while True:
        if isinstance(model, AdaptiveModel):
            model = model.current
        elif isinstance(model, compose.Pipeline):
            model = list(model.steps.values())[-1]
        else:
            break
    try:
        return "w" in inspect.signature(model.learn_one).parameters
    except (TypeError, ValueError):
        return False


class ConfiguredLearner(Learner):
    kind = "custom"
    # Checkpoints from before labels could be joined from another topic lack these three
    # (their learners take the label from the same event): the class defaults stand in.
    joins: LabelJoin[Any, tuple[dict[str, float], Any]] | None = None
    _input_type: type | None = None
    _label_type: type | None = None

    def __init__(self, name: str, spec: CustomSpec, topics: Mapping[str, str]) -> None:
        self.input_topic = topics.get(spec.input, spec.input)
        self.label_topic = topics.get(spec.label_topic, spec.label_topic) if spec.label_topic else None
        reads = {self.input_topic} | ({self.label_topic} if self.label_topic else set())
        super().__init__(name, spec.output_topic, frozenset(reads))
        self.spec = spec
        model = build_model(with_seed(spec.model, spec.seed))
        # With reaction "switch" the model is an AdaptiveModel that is also the monitor.
        self.model: Any = model
        monitor: DriftMonitor | None = None
        if spec.drift is not None:
            self.model, monitor = spec.drift.build(model, task=spec.task, name=name, on_switch=self._model_switched)
        self.evaluation = _EVALUATIONS[spec.task](spec.evaluation_window, drift=monitor)
        #: The last event predicted, its features and its prediction: ``learn`` evaluates
        #: (same-event label) or parks (joined label) what ``predict`` made. Fields are read
        #: from the event as decoded (``field``): a contract struct is never converted to a dict.
        self._scored: tuple[Any, dict[str, float], Any] | None = None
        self._excluded = frozenset({spec.label, *spec.exclude, *([spec.key] if spec.key else [])}) | _IDS
        #: Predictions waiting for their label from ``label_topic`` (None: same-event labels).
        self.joins = None
        self._input_type = None
        self._label_type = None
        if self.label_topic is not None and spec.join_on is not None:
            self._excluded |= {spec.join_on}
            contract = {topic: EVENT_TYPES[stream] for stream, topic in topics.items() if stream in EVENT_TYPES}
            self._input_type = contract.get(self.input_topic)
            self._label_type = contract.get(self.label_topic)
            # Unlabelled predictions past the window are dropped: no on_expire.
            self.joins = LabelJoin(int(spec.label_window_s * 1000), spec.max_pending, on_label=self._joined)
        #: Feature names with state in the model, bounded (``max_one_hot``).
        self._vocabulary = FeatureBound(spec.max_one_hot, self._serving)

    def features(self, event: Any) -> dict[str, float]:
        """Numbers as they are, strings one-hot (``field=value``), booleans as 0/1.
        The names the data makes up are counted against ``max_one_hot``."""
        listed = bool(self.spec.features)
        if isinstance(event, msgspec.Struct):
            names = self.spec.features or _struct_features(type(event), self._excluded)
            values = [getattr(event, k, None) for k in names]
        else:
            names = self.spec.features or [k for k in event if k not in self._excluded]
            values = [event.get(k) for k in names]
        touch = self._vocabulary.touch
        x: dict[str, float] = {}
        for k, v in zip(names, values, strict=True):
            if v is None:
                continue
            if isinstance(v, bool):
                x[k] = float(v)
            elif isinstance(v, (int, float)):
                if math.isfinite(v):
                    x[k] = float(v)
            elif isinstance(v, str):
                name = f"{k}={v}"
                x[name] = 1.0
                touch(name)
                continue
            else:
                continue
            if not listed:
                touch(k)
        return x

    def predict(self, event: Any) -> dict[str, Any] | None:
        if self.joins is not None and self._is_label(event):
            return None
        x = self.features(event)
        if self.spec.task == "regression":
            value = float(self.model.predict_one(x))
            self._scored = (event, x, value)
            return {"value": value}
        proba = self.model.predict_proba_one(x)
        self._scored = (event, x, proba)
        if self.spec.task == "binary":
            return {"probability": float(proba.get(True, 0.0))}
        label = max(proba, key=proba.__getitem__) if proba else None
        return {"label": label, "probabilities": {str(k): float(v) for k, v in proba.items()}}

    def learn(self, event: Any) -> None:
        scored, self._scored = self._scored, None
        joins = self.joins
        if joins is not None:
            ts = _event_time(event)
            key = self._join_key(event)
            if self._is_label(event):
                joins.label(key, self._target(event), ts)
                return
            if scored is None or scored[0] is not event:
                self.predict(event)  # predict failed or was skipped: score it now, as it would have been
                scored = self._scored
                self._scored = None
            assert scored is not None
            joins.add(key, (scored[1], scored[2]), ts)
            return
        y = self._target(event)
        if scored is not None and scored[0] is event:
            x = scored[1]
            self._evaluate(y, scored[2], field(event, "ts") or 0)
        else:
            x = self.features(event)
        self.model.learn_one(x, y)
        self.n_learned += 1

    def label_stats(self) -> Mapping[str, int]:
        return self.joins.stats() if self.joins is not None else {}

    # -- labels -------------------------------------------------------------------------

    def _is_label(self, event: Any) -> bool:
        """Whether ``event`` is a record of ``label_topic`` (see ``CustomSpec.label_topic``)."""
        if self._label_type is not None:
            return type(event) is self._label_type
        if self._input_type is not None:
            return type(event) is not self._input_type
        return self.spec.label in event

    def _join_key(self, event: Any) -> Any:
        key = field(event, self.spec.join_on)  # type: ignore[arg-type]
        if key is None or isinstance(key, (bool, float)) or not isinstance(key, (str, int)):
            raise ValueError(f"join field `{self.spec.join_on}` is missing or not a string or integer id")
        return key

    def _target(self, event: Any) -> Any:
        y = field(event, self.spec.label)
        if y is None:
            raise ValueError(f"label field `{self.spec.label}` is missing")
        if self.spec.task == "binary":
            return bool(y)
        if self.spec.task == "regression":
            return float(y)
        return y

    def _joined(self, payload: tuple[dict[str, float], Any], y: Any, ts: int) -> None:
        x, prediction = payload
        # Learned later than predicted: names forgotten meanwhile must be counted again.
        vocabulary = self._vocabulary
        for name in x:
            if name not in vocabulary and (not self.spec.features or name not in self.spec.features):
                vocabulary.touch(name)
        self._evaluate(y, prediction, ts)
        self.model.learn_one(x, y)
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_vocabulary" not in state:
            # A checkpoint from before the bound: its model's data-named features are adopted.
            self._vocabulary = FeatureBound(self.spec.max_one_hot, self._serving)
            self._vocabulary.adopt(
                name for name in model_feature_names(self.model) if isinstance(name, str) and "=" in name
            )

    def _serving(self) -> Any:
        """The model (an ``AdaptiveModel`` holds its candidate and fallback too)."""
        return self.model

    # -- introspection (tests, the flood bench; not for the hot path) -------------------------

    def state_sizes(self) -> dict[str, int]:
        """Entries held by every per-key structure, and the model's largest table."""
        return {
            "pending": len(self.joins) if self.joins is not None else 0,
            "features": len(self._vocabulary),
            "model_table": max(model_table_sizes(self.model).values(), default=0),
        }


def _event_time(event: Any) -> int:
    ts = field(event, "ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise ValueError("field `ts` (event time, epoch ms) is missing: joining labels needs it")
    return int(ts)


_EVALUATIONS = {
    "binary": Evaluation.for_binary,
    "multiclass": Evaluation.for_multiclass,
    "regression": Evaluation.for_regression,
}
