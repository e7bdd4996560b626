"""The contract every learner kind keeps, checked for each of them (no broker, seconds).

A new learner kind (or a new shape of a custom one) gets the whole contract by
adding one ``Case`` to ``CASES``: its ``[learners.NAME]`` table as in TOML, the
prediction fields README.md documents for it, and, if its labels arrive later,
the stream they arrive on. The events are the simulator's (``stream.simulate``),
read through the learner's ``reads`` like the pipeline does.

1. the same events give the same predictions and the same pickled state;
2. a pickle taken mid-stream predicts exactly like the learner it was taken of;
3. nothing depends on the wall clock;
4. through ``Pipeline``, every output is the documented ``Output`` envelope;
5. ``stream.state.swap_model`` bumps ``model_version`` (and the envelope says so);
6. ``label_stats()`` keeps its documented vocabulary, counts up, and counts labels.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import itertools
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from river import proba

from stream.config import parse_config
from stream.events import EVENT_TYPES, Decoder
from stream.learners import Learner, build_learner
from stream.pipeline import Output, Pipeline
from stream.recording import RecordedMessage
from stream.simulate import SimConfig, simulate
from stream.state import swap_model

README = Path(__file__).resolve().parents[1] / "README.md"

# -- the documented predictions (README.md, "Predictions by learner") -----------------------


class ScoredItem(msgspec.Struct):
    item_id: str
    score: float


class RecommendationFields(msgspec.Struct):
    items: list[ScoredItem]
    source: Literal["model", "popularity"]


class PricingFields(msgspec.Struct):
    conversion_probability: float
    recommended_price: float
    bound_by: str | None


class RiskFields(msgspec.Struct):
    fraud_probability: float
    decision: Literal["approve", "review", "block"]
    source: Literal["model", "anomaly"]


class DemandInterval(msgspec.Struct):
    low: float
    high: float
    level: float


class DemandForecast(msgspec.Struct):
    item_id: str
    horizon_s: float
    expected_units: float
    interval: DemandInterval
    stock: int | None
    hours_of_cover: float | None
    stockout_probability: float | None
    reorder_suggestion: int
    source: Literal["model", "rate", "baseline", "combined"]
    stockout_risk: float | None
    warning: bool


class DemandFields(msgspec.Struct):
    forecasts: list[DemandForecast]


class RegressionFields(msgspec.Struct):
    value: float


class BinaryFields(msgspec.Struct):
    probability: float


class RankedFields(msgspec.Struct):
    item_id: str
    score: float
    p_click: float


class RankingFields(msgspec.Struct):
    request_id: str
    kind: Literal["search", "ads"]
    items: list[RankedFields]
    source: Literal["model", "original"]
    explored: int


class MulticlassFields(msgspec.Struct):
    label: str | None
    probabilities: dict[str, float]


# -- the learners under contract --------------------------------------------------------------


#: A small shop with frequent price moves, a high fraud rate and quick labels, so every
#: learner sees its whole life (cold start, labels joined, the model serving) in ~3k events.
SHOP = SimConfig(
    seed=3,
    events=3_000,
    n_users=200,
    n_items=120,
    n_categories=6,
    base_conversion=0.08,
    fraud_rate=0.08,
    label_delay_median_s=120.0,
    legit_label_rate=0.3,
    price_test_every_s=300.0,
    random_move_share=0.05,
)


@dataclass(frozen=True)
class Case:
    #: Test id and learner name (``[learners.NAME]``).
    name: str
    #: The ``[learners.NAME]`` table, as TOML would give it.
    spec: dict[str, Any]
    #: The prediction's documented fields and types (README.md, "Predictions by learner").
    prediction: type[msgspec.Struct]
    #: The stream (``[topics]`` key) whose events are labels of earlier predictions, if any.
    labels: str | None = None
    #: The events: the simulator's, of the streams the learner reads.
    events: SimConfig = field(default=SHOP)

    def __str__(self) -> str:
        return self.name


#: Learners defined in config, one per task and label path (same event, joined from another topic).
FRAUD_GUESS = {"kind": "custom", "input": "purchases", "output_topic": "fraud-guess", "label": "is_fraud",
               "label_topic": "fraud_labels", "join_on": "order_id", "label_window_s": 3_600, "task": "binary",
               "features": ["unit_price", "quantity", "payment_method", "account_age_days"],
               "model": {"class": "forest.ARFClassifier", "params": {"n_models": 3}}}  # fmt: skip
BASKET_SIZE = {"kind": "custom", "input": "purchases", "output_topic": "basket-size", "label": "quantity",
               "task": "regression", "features": ["unit_price", "category", "payment_method"],
               "model": [{"class": "preprocessing.StandardScaler"},
                         {"class": "linear_model.LinearRegression"}]}  # fmt: skip
NEXT_CATEGORY = {"kind": "custom", "input": "clicks", "output_topic": "next-category", "label": "category",
                 "task": "multiclass", "features": ["price", "source"],
                 "model": {"class": "tree.HoeffdingTreeClassifier"}}  # fmt: skip

#: The same shop with search and ads requests.
SEARCHES = dataclasses.replace(SHOP, searches_per_session=1.0, search_candidates=30)

#: Every learner under contract: one line each.
CASES = [
    Case("recommendation", {"kind": "recommendation", "max_items": 500}, RecommendationFields),
    Case("pricing", {"kind": "pricing", "min_outcomes": 100, "label_window_s": 300}, PricingFields, labels="purchases"),
    Case("risk", {"kind": "risk", "min_labels": 20, "min_fraud_labels": 3}, RiskFields, labels="fraud_labels"),
    Case("custom_binary_joined", FRAUD_GUESS, BinaryFields, labels="fraud_labels"),
    Case("custom_regression", BASKET_SIZE, RegressionFields),
    Case("demand", {"kind": "demand", "min_outcomes": 20, "horizons_s": [600, 3600], "bucket_s": 300}, DemandFields),
    Case("custom_multiclass", NEXT_CATEGORY, MulticlassFields),
    Case("ranking", {"kind": "ranking", "min_requests": 20, "label_window_s": 300}, RankingFields, "clicks", SEARCHES),
]


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


# -- driving a learner --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fed:
    """One input record, as the pipeline would read it, and its decoded event."""

    stream: str | None
    record: RecordedMessage
    event: Any


def build(case: Case) -> Learner:
    """The learner, the way ``stream run`` builds it from its config file."""
    config = parse_config({"learners": {case.name: case.spec}}, f"<{case.name}>")
    return build_learner(case.name, config.learners[case.name], config.input_topics())


@cache
def _simulated(config: SimConfig) -> tuple[tuple[str, bytes | None, bytes, int], ...]:
    return tuple(simulate(config))


def inputs(case: Case) -> list[Fed]:
    """The simulated events of the topics the learner reads, in order, one offset per topic."""
    config = parse_config({"learners": {case.name: case.spec}})
    topic_of = config.input_topics()
    reads = build(case).reads
    decoders = {s: Decoder(EVENT_TYPES[s]).decode for s in topic_of}
    offsets: dict[str, int] = {}
    fed = []
    for stream, key, value, ts in _simulated(case.events):
        topic = topic_of[stream]
        if topic not in reads:
            continue
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        fed.append(Fed(stream, RecordedMessage(topic, 0, offset, (1, ts), key, value), decoders[stream](value)))
    assert fed, f"{case.name} reads none of the simulated streams"
    return fed


def run(learner: Learner, fed: list[Fed]) -> list[bytes | None]:
    """Test-then-train, as the pipeline does; each event's prediction, JSON-encoded."""
    out: list[bytes | None] = []
    for f in fed:
        prediction = learner.predict(f.event)
        learner.learn(f.event)
        out.append(None if prediction is None else msgspec.json.encode(prediction))
    return out


def served(predictions: list[bytes | None]) -> list[bytes]:
    return [p for p in predictions if p is not None]


class _StatePickler(pickle.Pickler):
    """Pickles like a checkpoint does, but leaves out the sampling rng of River's
    distributions (``proba.Gaussian()`` in tree splitters): River seeds it from the
    OS, and only ``sample()``, which no learner calls, reads it."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, proba.base.Distribution) and "_rng" in vars(obj):
            return type(obj), (), {k: v for k, v in vars(obj).items() if k != "_rng"}
        return NotImplemented


def state(learner: Learner) -> bytes:
    """The learner's pickled state, comparable with ``==``."""
    buffer = io.BytesIO()
    _StatePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(learner)
    return buffer.getvalue()


def snapshot(learner: Learner) -> bytes:
    """What a learner says about itself besides predictions, comparable with ``==``."""
    quality = sorted((m, w, v) for m, w, v in learner.quality())
    return msgspec.json.encode([learner.model_version, learner.n_learned, dict(learner.label_stats()), quality])


class Recorder:
    """A sink keeping what the pipeline produces."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, Any]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        self.records.append((topic, key, value, headers))


PREDICTED_AT_S = 1_800_000_000.25


def pipeline(learner: Learner, sink: Recorder) -> Pipeline:
    return Pipeline(
        [learner],
        sink,
        contract_topics=parse_config({}).input_topics(),
        dead_letter_topic="dead-letters",
        clock=lambda: PREDICTED_AT_S,
    )


# -- 1. same inputs, same outputs -------------------------------------------------------------


def test_same_events_give_the_same_predictions_and_state(case: Case) -> None:
    fed = inputs(case)
    a, b = build(case), build(case)
    first = run(a, fed)
    assert first == run(b, fed)
    assert state(a) == state(b)
    assert snapshot(a) == snapshot(b)
    # Not vacuous: the learner did predict, and not one constant.
    assert len(set(served(first))) > 10, f"{case.name} predicted too little to compare"


# -- 2. a pickle predicts like its original -----------------------------------------------------


@pytest.mark.parametrize("at", [0.3, 0.7])
def test_pickle_round_trip_mid_stream_restores_identical_behaviour(case: Case, at: float) -> None:
    fed = inputs(case)
    cut = int(len(fed) * at)
    learner = build(case)
    run(learner, fed[:cut])
    restored = pickle.loads(pickle.dumps(learner))
    assert type(restored) is type(learner) and snapshot(restored) == snapshot(learner)
    rest = run(learner, fed[cut:])
    assert run(restored, fed[cut:]) == rest
    assert served(rest), f"{case.name} predicted nothing after the cut"
    assert snapshot(restored) == snapshot(learner)


# -- 3. no wall clock -------------------------------------------------------------------------


class _Absurd:
    """Clocks far in the future that jump a year and some hours per call (so the time of
    day moves too)."""

    def __init__(self) -> None:
        self.calls = 0
        self._s = itertools.count(4e9, 31_557_600 + 12_345.678)

    def seconds(self) -> float:
        self.calls += 1
        return next(self._s)

    def nanoseconds(self) -> int:
        return int(self.seconds() * 1e9)


def test_predictions_do_not_depend_on_the_wall_clock(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = inputs(case)
    expected = run(build(case), fed)
    learner = build(case)  # built on the real clock: only learning and predicting are under test
    clock = _Absurd()
    for name in ("time", "monotonic", "perf_counter", "process_time"):
        monkeypatch.setattr(time, name, clock.seconds)
    for name in ("time_ns", "monotonic_ns", "perf_counter_ns"):
        monkeypatch.setattr(time, name, clock.nanoseconds)

    class AbsurdDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return cls.fromtimestamp(clock.seconds(), tz)

        @classmethod
        def utcnow(cls) -> Any:
            return cls.now()

        @classmethod
        def today(cls) -> Any:
            return cls.now()

    monkeypatch.setattr(datetime, "datetime", AbsurdDatetime)
    got = run(learner, fed)
    monkeypatch.undo()
    assert got == expected, f"{case.name}: predictions changed with the wall clock ({clock.calls} clock reads)"


# -- 4. the output envelope -------------------------------------------------------------------

ENVELOPE = {"event_id", "source", "learner", "model_version", "prediction", "predicted_at"}


def predictions_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("Predictions by learner")
    return text[start : text.index("\n#", start)]


def test_every_output_is_the_documented_envelope(case: Case) -> None:
    fed = inputs(case)
    learner, sink = build(case), Recorder()
    pipe = pipeline(learner, sink)
    expected = run(build(case), fed)
    published = []
    for f, prediction in zip(fed, expected, strict=True):
        before = len(sink.records)
        pipe.process(f.record)
        out = sink.records[before:]
        assert [t for t, *_ in out] == ([learner.output_topic] if prediction is not None else []), (
            f"{case.name} on {f.record.topic()}@{f.record.offset()}: {out}"
        )
        if not out:
            continue
        _, key, value, headers = out[0]
        assert key == f.record.key() and headers is None and value is not None
        doc = msgspec.json.decode(value)
        assert set(doc) == ENVELOPE
        envelope = msgspec.json.decode(value, type=Output)
        assert envelope.event_id == f.event.event_id
        assert (envelope.source.topic, envelope.source.partition, envelope.source.offset) == (
            f.record.topic(), 0, f.record.offset()
        )  # fmt: skip
        assert envelope.learner == case.name and envelope.model_version == learner.model_version == 1
        assert envelope.predicted_at == int(PREDICTED_AT_S * 1000)
        assert msgspec.json.encode(envelope.prediction) == prediction, "the pipeline publishes what predict returned"
        msgspec.convert(envelope.prediction, case.prediction)  # the documented fields, of the documented types
        published.append(envelope)
    assert published, f"{case.name} published nothing"
    section = predictions_section()
    undocumented = [f for f in case.prediction.__struct_fields__ if f"`{f}`" not in section]
    assert not undocumented, f"README.md's 'Predictions by learner' does not name {undocumented}"


# -- 5. model_version --------------------------------------------------------------------------


def test_swap_model_bumps_model_version_and_the_envelope_carries_it(case: Case) -> None:
    fed = inputs(case)
    cut, checkpoint = len(fed) // 3, 2 * len(fed) // 3
    learner, sink = build(case), Recorder()
    pipe = pipeline(learner, sink)
    expected = run(build(case), fed)
    for f in fed[:cut]:
        pipe.process(f.record)
    n_before = len(sink.records)
    assert learner.model_version == 1
    # The same model again (as a warm start from this learner's own checkpoint would):
    # the version moves, what is served does not, also after learning on and a checkpoint.
    swap_model(learner, copy.deepcopy(learner.model))  # type: ignore[attr-defined]
    assert learner.model_version == 2
    for f in fed[cut:checkpoint]:
        pipe.process(f.record)
    learner = pickle.loads(pickle.dumps(learner))
    assert learner.model_version == 2
    pipe = pipeline(learner, sink)
    for f in fed[checkpoint:]:
        pipe.process(f.record)
    outputs = [msgspec.json.decode(v, type=Output) for _, _, v, _ in sink.records]
    assert {o.model_version for o in outputs[:n_before]} == {1}
    assert {o.model_version for o in outputs[n_before:]} == {2}
    assert [msgspec.json.encode(o.prediction) for o in outputs] == served(expected)
    swap_model(learner, copy.deepcopy(learner.model))  # type: ignore[attr-defined]
    assert learner.model_version == 3


# -- 6. label stats -----------------------------------------------------------------------------

#: ``Learner.label_stats`` keys (base.py, and ``stream.labels.LabelJoin.stats``).
LABEL_OUTCOMES = {"received", "joined", "unmatched", "late", "expired", "evicted"}


def test_label_stats_are_present_and_consistent(case: Case) -> None:
    learner = build(case)
    before: Mapping[str, int] = dict(learner.label_stats())
    n_labels = 0
    for f in inputs(case):
        learner.predict(f.event)
        learner.learn(f.event)
        stats = dict(learner.label_stats())
        assert set(stats) <= LABEL_OUTCOMES and len(stats) <= 16, stats
        assert all(type(v) is int and v >= 0 for v in stats.values()), stats
        assert all(stats.get(k, 0) >= v for k, v in before.items()), ("a counter went down", before, stats)
        is_label = case.labels is not None and f.stream == case.labels
        n_labels += is_label
        assert stats.get("received", 0) - before.get("received", 0) == int(is_label), (f.event, before, stats)
        before = stats
    quality = list(learner.quality())
    assert quality and all(w in ("cumulative", "rolling") and isinstance(v, float) for _, w, v in quality)
    if case.labels is None:
        return
    assert n_labels > 0 and before["received"] == n_labels
    assert before["joined"] > 0, f"{case.name} joined none of {n_labels} labels"
    assert before["joined"] + before["unmatched"] == before["received"]
    assert before.get("late", 0) <= before["unmatched"]
