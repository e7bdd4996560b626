"""The metrics observer against values computed independently from a small stream.

A small stream with known content goes through the real ``Pipeline``; every
exported value is then compared with what the test computes on its own from
the records it generated: counts per topic and outcome, predictions per
learner, accuracy / log loss (exact) and ROC AUC (Mann-Whitney) of a fixed
predictor, label counters, latency buckets, lag from a librdkafka statistics
document, data-drift scores of the sampled windows. ``promtool check metrics``
(the real binary) must find nothing to report.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream.config import parse_config
from stream.drift import ConceptDrift, ks, psi
from stream.evaluation import Evaluation
from stream.learners import Learner, build_learner
from stream.metrics import LATENCY_BUCKETS, PipelineMetrics, new_registry, serve_metrics
from stream.pipeline import Pipeline
from stream.recording import RecordedMessage

NOW = 1_800_000_000.0  # the observer's clock, epoch seconds
WINDOW = 50  # rolling quality window
TOPIC = "scores"
CLICKS = "t-clicks"


def rec(topic: str, value: bytes, offset: int, key: bytes = b"u") -> RecordedMessage:
    """A consumed record (the pipeline's ``Record`` protocol), stamped now."""
    return RecordedMessage(topic, 0, offset, (1, int(NOW * 1000)), key, value)


class ListSink:
    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.records.append(args)


class FixedLearner(Learner):
    """A binary learner whose prediction is a fixed function of ``x`` (so the test
    can compute its quality on its own), with label counters and a drift monitor."""

    kind = "test"

    def __init__(self, name: str, topic: str, flip_at: int | None = None) -> None:
        super().__init__(name, f"{name}-out", frozenset({topic}))
        self.evaluation = Evaluation.for_binary(window=WINDOW, drift=ConceptDrift("adwin"))
        self.labels: Counter[str] = Counter()
        self._p = 0.5

    def predict(self, event: Any) -> dict[str, float]:
        x = event["x"]
        if not isinstance(x, (int, float)):
            raise TypeError("x is not a number")
        self._p = 1.0 / (1.0 + math.exp(-x))
        return {"probability": self._p}

    def learn(self, event: Any) -> None:
        if "y" not in event:
            raise KeyError("y")
        self.labels["received"] += 1
        if event.get("late"):
            self.labels["expired"] += 1
        self.evaluation.binary(bool(event["y"]), self._p, ts=event["ts"])
        self.n_learned += 1

    def label_stats(self) -> Mapping[str, int]:
        return self.labels


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


#: Families that carry a ``task`` label (one pipeline attached without a task: task "0").
TASKED = frozenset(
    {
        "stream_model_quality", "stream_model_version", "stream_model_events_learned_total", "stream_labels_total",
        "stream_concept_drift_detections_total", "stream_concept_drift_last_detection_timestamp_seconds",
        "stream_model_switches_total", "stream_model_candidate_active",
    }
)  # fmt: skip


def value(got: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    if name in TASKED:
        labels.setdefault("task", "0")
    return got[(name, frozenset(labels.items()))]


def roc_auc_mann_whitney(pairs: list[tuple[float, bool]]) -> float:
    """Exact ROC AUC: the probability a random positive scores above a random negative."""
    pos = [p for p, y in pairs if y]
    neg = [p for p, y in pairs if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


# -- the stream ------------------------------------------------------------------------


def make_stream(seed: int = 11) -> tuple[list[RecordedMessage], dict[str, Any]]:
    """Records of two topics, and what the test expects from them, computed here."""
    rng = random.Random(seed)
    records: list[RecordedMessage] = []
    expect: dict[str, Any] = {
        "outcomes": Counter(),
        "pairs": [],
        "published": Counter(),
        "prices": [],
        "received": 0,
        "expired": 0,
        "learned": Counter(),
    }
    ts = int(NOW * 1000) - 2000  # every event is 2 s old when predicted
    for i in range(300):
        kind = rng.choices(["ok", "decode", "predict", "learn"], weights=[90, 4, 3, 3])[0]
        x = rng.gauss(0, 1.5)
        y = rng.random() < 1 / (1 + math.exp(-x))
        doc: dict[str, Any] = {
            "event_id": f"e{i}",
            "ts": ts,
            "user_id": f"user-{i}",
            "x": x,
            "y": y,
            "late": i % 7 == 0,
        }
        if kind == "decode":
            value = b"{not json"
        elif kind == "predict":
            value = json.dumps({**doc, "x": "boom"}).encode()
        elif kind == "learn":
            del doc["y"]
            value = json.dumps(doc).encode()
        else:
            value = json.dumps(doc).encode()
        records.append(rec(TOPIC, value, i, key=f"user-{i}".encode()))
        expect["outcomes"][(TOPIC, "ok" if kind == "ok" else f"dead_letter_{kind}")] += 1
        if kind in ("ok", "learn"):  # predicted (and published) before learn failed
            expect["published"]["fixed"] += 1
        if kind == "ok":
            expect["pairs"].append((1 / (1 + math.exp(-x)), y))
            expect["received"] += 1
            expect["expired"] += doc["late"]
            expect["learned"]["fixed"] += 1
    for i in range(220):
        kind = "validate" if i % 25 == 3 else "ok"
        price = round(rng.uniform(5, 50) if i < 100 else rng.uniform(40, 90), 2)  # shifts at i = 100
        doc = {
            "event_id": f"c{i}",
            "ts": ts,
            "user_id": f"user-{i}",
            "item_id": f"item-{i}",
            "category": rng.choice(["a", "b"]),
            "price": price,
        }
        if kind == "validate":
            del doc["item_id"]
        records.append(rec(CLICKS, json.dumps(doc).encode(), i))
        expect["outcomes"][(CLICKS, "ok" if kind == "ok" else "dead_letter_validate")] += 1
        if kind == "ok":
            expect["published"]["click_price"] += 1
            expect["learned"]["click_price"] += 1
            expect["prices"].append(price)
    # Interleave the two topics deterministically, keeping each topic's order.
    scores, clicks = records[:300], records[300:]
    mixed = [r for pair in zip(scores[:220], clicks, strict=True) for r in pair] + scores[220:]
    return mixed, expect


def build(feature_window: int = 100, **metrics_cfg: Any) -> tuple[CollectorRegistry, PipelineMetrics, Pipeline]:
    config = parse_config(
        {
            "topics": {"clicks": CLICKS},
            "metrics": {"feature_sample_every": 1, "feature_window": feature_window, **metrics_cfg},
            "learners": {
                "click_price": {
                    "kind": "custom",
                    "input": "clicks",
                    "output_topic": "click-out",
                    "label": "price",
                    "task": "regression",
                    "features": ["category"],
                    "model": {"class": "linear_model.LinearRegression"},
                }
            },
        }
    )
    learners = [
        FixedLearner("fixed", TOPIC),
        build_learner("click_price", config.learners["click_price"], config.input_topics()),
    ]
    registry = new_registry()
    metrics = PipelineMetrics(registry, config.metrics, clock=lambda: NOW)
    pipeline = Pipeline(
        learners, ListSink(), contract_topics=config.input_topics(), dead_letter_topic="dl", observer=metrics
    )
    return registry, metrics, pipeline


@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[dict[Any, float], dict[str, Any], str]]:
    registry, metrics, pipeline = build()
    records, expect = make_stream()
    for record in records:
        pipeline.process(record)
    metrics.batch_processed(len(records), 0.26)
    metrics.checkpoint_saved(ts=NOW - 30)
    metrics.kafka_stats(json.dumps(LIBRDKAFKA_STATS))
    yield samples(registry), expect, generate_latest(registry).decode()


# -- counts -------------------------------------------------------------------------------


def test_events_per_topic_and_outcome(scraped: Any) -> None:
    got, expect, _ = scraped
    for topic in (TOPIC, CLICKS):
        for outcome in ("ok", "dead_letter_decode", "dead_letter_validate", "dead_letter_predict", "dead_letter_learn"):
            assert (
                value(got, "stream_events_consumed_total", topic=topic, outcome=outcome)
                == expect["outcomes"][(topic, outcome)]
            ), (topic, outcome)
    assert sum(expect["outcomes"].values()) == 520


def test_predictions_events_learned_and_labels(scraped: Any) -> None:
    got, expect, _ = scraped
    for learner in ("fixed", "click_price"):
        assert value(got, "stream_predictions_published_total", learner=learner) == expect["published"][learner]
        assert value(got, "stream_model_events_learned_total", learner=learner) == expect["learned"][learner]
        assert value(got, "stream_model_version", learner=learner) == 1
    assert value(got, "stream_labels_total", learner="fixed", outcome="received") == expect["received"]
    assert value(got, "stream_labels_total", learner="fixed", outcome="expired") == expect["expired"]
    assert not any(name == "stream_labels_total" and dict(labels)["learner"] == "click_price" for name, labels in got)


# -- quality --------------------------------------------------------------------------------


def test_quality_matches_an_independent_computation(scraped: Any) -> None:
    got, expect, _ = scraped
    pairs = expect["pairs"]

    def q(metric: str, window: str) -> float:
        return value(got, "stream_model_quality", learner="fixed", metric=metric, window=window)

    def acc(ps: list[tuple[float, bool]]) -> float:
        return sum((p >= 0.5) == y for p, y in ps) / len(ps)

    def logloss(ps: list[tuple[float, bool]]) -> float:
        return sum(-math.log(p if y else 1 - p) for p, y in ps) / len(ps)

    assert q("accuracy", "cumulative") == pytest.approx(acc(pairs), abs=1e-9)
    assert q("accuracy", "rolling") == pytest.approx(acc(pairs[-WINDOW:]), abs=1e-9)
    assert q("log_loss", "cumulative") == pytest.approx(logloss(pairs), rel=1e-9)
    assert q("log_loss", "rolling") == pytest.approx(logloss(pairs[-WINDOW:]), rel=1e-9)
    assert q("predicted_rate", "cumulative") == pytest.approx(sum(p for p, _ in pairs) / len(pairs), rel=1e-9)
    assert q("observed_rate", "rolling") == pytest.approx(sum(y for _, y in pairs[-WINDOW:]) / WINDOW, rel=1e-9)
    # River's ROCAUC integrates over 10 thresholds (an approximation of the exact
    # Mann-Whitney AUC): equal within a few hundredths, and the same ordering.
    exact_cumulative, exact_rolling = roc_auc_mann_whitney(pairs), roc_auc_mann_whitney(pairs[-WINDOW:])
    assert q("roc_auc", "cumulative") == pytest.approx(exact_cumulative, abs=0.03)
    assert q("roc_auc", "rolling") == pytest.approx(exact_rolling, abs=0.05)
    # The regression learner's quality is there too.
    assert value(got, "stream_model_quality", learner="click_price", metric="mae", window="cumulative") > 0


# -- latency, processing time, lag ---------------------------------------------------------------


def test_event_to_prediction_latency_buckets(scraped: Any) -> None:
    got, expect, _ = scraped
    n = expect["published"]["fixed"]
    assert value(got, "stream_event_to_prediction_seconds_count", learner="fixed") == n
    assert value(got, "stream_event_to_prediction_seconds_sum", learner="fixed") == pytest.approx(2.0 * n)
    for bound in LATENCY_BUCKETS:
        expected = n if bound >= 2.0 else 0  # every event was exactly 2 s old
        assert value(got, "stream_event_to_prediction_seconds_bucket", learner="fixed", le=str(bound)) == expected
    assert value(got, "stream_event_to_prediction_seconds_bucket", learner="fixed", le="+Inf") == n


def test_processing_time_is_amortised_per_record(scraped: Any) -> None:
    got, _, _ = scraped
    assert value(got, "stream_record_processing_seconds_count") == 520
    assert value(got, "stream_record_processing_seconds_sum") == pytest.approx(0.26)
    # 0.26 s / 520 records = 0.5 ms each: all in the 0.5 ms bucket, none below.
    assert value(got, "stream_record_processing_seconds_bucket", le="0.0005") == 520
    assert value(got, "stream_record_processing_seconds_bucket", le="0.00025") == 0


#: The part of a librdkafka consumer statistics document the observer reads
#: (shape from a real confluent-kafka 2.x consumer; see tests/test_prometheus.py for the live one).
LIBRDKAFKA_STATS = {
    "name": "stream#consumer-1",
    "type": "consumer",
    "topics": {
        "t-clicks": {
            "topic": "t-clicks",
            "partitions": {
                "0": {
                    "partition": 0,
                    "desired": True,
                    "hi_offset": 120,
                    "ls_offset": 100,
                    "lo_offset": 0,
                    "app_offset": 70,
                    "committed_offset": 50,
                },
                "1": {
                    "partition": 1,
                    "desired": True,
                    "hi_offset": 10,
                    "ls_offset": 10,
                    "lo_offset": 2,
                    "app_offset": -1001,
                    "committed_offset": -1001,
                },
                "2": {"partition": 2, "desired": False, "hi_offset": 99, "ls_offset": 99, "app_offset": 0},
                "-1": {"partition": -1, "desired": False, "hi_offset": -1, "ls_offset": -1},
            },
        },
        "scores": {
            "topic": "scores",
            "partitions": {
                "0": {
                    "partition": 0,
                    "desired": True,
                    "hi_offset": 300,
                    "ls_offset": 300,
                    "app_offset": -1001,
                    "committed_offset": 280,
                }
            },
        },
    },
}


def test_consumer_lag_from_librdkafka_statistics(scraped: Any) -> None:
    got, _, _ = scraped
    lag = {
        dict(labels)["topic"] + "/" + dict(labels)["partition"]: v
        for (name, labels), v in got.items()
        if name == "stream_consumer_lag_records"
    }
    # last stable offset minus: the app position; else the committed offset; else the log start.
    assert lag == {"t-clicks/0": 30, "t-clicks/1": 8, "scores/0": 20}


def _client_stats(client: str, **lags: tuple[int, int]) -> str:
    """Statistics of consumer ``client``: per ``topic_partition``, (log end, position)."""
    topics: dict[str, Any] = {}
    for tp, (end, position) in lags.items():
        topic, partition = tp.rsplit("_", 1)
        part = {"desired": True, "ls_offset": end, "hi_offset": end, "app_offset": position}
        topics.setdefault(topic, {"partitions": {}})["partitions"][partition] = part
    return json.dumps({"name": client, "type": "consumer", "topics": topics})


def test_lag_of_every_task_consumer_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each task has its own consumer: one's statistics must not replace another's. A partition
    # both read (a global table) shows the slowest; a closed consumer's lag expires.
    registry, metrics, _ = build()
    now = [1000.0]
    monkeypatch.setattr("stream.metrics.time.monotonic", lambda: now[0])

    def lag() -> dict[str, float]:
        got = samples(registry).items()
        return {f"{dict(labels)['topic']}/{dict(labels)['partition']}": v
                for (name, labels), v in got if name == "stream_consumer_lag_records"}  # fmt: skip

    metrics.kafka_stats(_client_stats("task-0", clicks_0=(100, 90), prices_0=(50, 45)))
    metrics.kafka_stats(_client_stats("task-1", clicks_1=(100, 60), prices_0=(50, 20)))
    assert lag() == {"clicks/0": 10, "clicks/1": 40, "prices/0": 30}
    metrics.kafka_stats(_client_stats("task-1", clicks_1=(100, 70)))  # replaces task-1's own report only
    assert lag() == {"clicks/0": 10, "clicks/1": 30, "prices/0": 5}
    now[0] += 3600  # task-0 closed long ago; task-1 reports on
    metrics.kafka_stats(_client_stats("task-1", clicks_1=(100, 80)))
    assert lag() == {"clicks/1": 20}


def test_lag_of_revoked_partitions_disappears() -> None:
    registry, metrics, _ = build()
    metrics.kafka_stats(json.dumps(LIBRDKAFKA_STATS))
    metrics.kafka_stats(json.dumps({"name": LIBRDKAFKA_STATS["name"], "type": "consumer", "topics": {}}))
    assert not any(name == "stream_consumer_lag_records" for name, _ in samples(registry))
    metrics.kafka_stats("not json")
    metrics.kafka_stats(json.dumps({"type": "producer", "topics": {}}))


# -- data drift, checkpoints, info -----------------------------------------------------------------


def test_data_drift_scores_of_the_sampled_windows(scraped: Any) -> None:
    got, expect, _ = scraped
    prices = expect["prices"]
    assert len(prices) >= 200  # two full windows of 100
    reference, recent = prices[-200:-100], prices[-100:]
    assert value(got, "stream_data_drift_score", topic=CLICKS, feature="price", method="psi") == pytest.approx(
        psi(reference, recent), rel=1e-9
    )
    assert value(got, "stream_data_drift_score", topic=CLICKS, feature="price", method="ks") == pytest.approx(
        ks(reference, recent), rel=1e-9
    )
    # Only numeric, non-id fields are features: not ts, not the ids, not the label-like bools.
    features = {
        (dict(labels)["topic"], dict(labels)["feature"]) for name, labels in got if name == "stream_data_drift_score"
    }
    assert features == {(CLICKS, "price"), (TOPIC, "x")}


def test_data_drift_shows_a_shift_then_settles() -> None:
    registry, _metrics, pipeline = build(feature_window=500)
    rng = random.Random(2)
    scores = {}
    for i in range(1, 2501):
        price = rng.uniform(5, 50) if i <= 1500 else rng.uniform(30, 75)  # shifts after 1500
        doc = {"event_id": f"c{i}", "ts": 1, "user_id": "u", "item_id": "i", "price": price}
        pipeline.process(rec(CLICKS, json.dumps(doc).encode(), i))
        if i == 999:
            assert not any(n == "stream_data_drift_score" for n, _ in samples(registry)), "windows not full yet"
        if i % 250 == 0 and i >= 1000:
            scores[i] = value(samples(registry), "stream_data_drift_score", topic=CLICKS, feature="price", method="psi")
    # Windows of 500: stable before the shift, large while the two windows straddle
    # it, stable again once both hold the new data.
    assert scores[1000] < 0.1 and scores[1250] < 0.1 and scores[1500] < 0.1, scores
    assert min(scores[1750], scores[2000], scores[2250]) > 0.25, scores
    assert scores[2500] < 0.1, scores


def test_feature_labels_are_bounded() -> None:
    registry, metrics, pipeline = build(max_features=3)
    for i in range(200):
        doc = {"event_id": str(i), "ts": 1, "x": 1.0, "y": True, f"f{i}": float(i), "order_id": 5}
        pipeline.process(rec(TOPIC, json.dumps(doc).encode(), i))
    features = {dict(labels)["feature"] for name, labels in samples(registry) if name == "stream_data_drift_score"}
    assert len(metrics._features[TOPIC].windows) == 3 and features <= {"x", "f0", "f1"}


def test_checkpoint_and_build_info(scraped: Any) -> None:
    got, _, _ = scraped
    assert value(got, "stream_checkpoint_last_success_timestamp_seconds") == NOW - 30
    assert value(got, "stream_checkpoints_total") == 1
    info = [dict(labels) for name, labels in got if name == "stream_build_info"]
    assert len(info) == 1 and info[0]["river_version"] == "0.26.1"


def test_no_checkpoint_series_before_the_first_checkpoint() -> None:
    registry, _, _ = build()
    assert not any(name == "stream_checkpoint_last_success_timestamp_seconds" for name, _ in samples(registry))


def test_label_values_never_carry_ids(scraped: Any) -> None:
    got, _, _ = scraped
    values = {v for _, labels in got for _, v in labels}
    assert not any(v.startswith(("user-", "item-", "e1", "c1")) for v in values)


# -- drift shown -------------------------------------------------------------------------------------


def test_injected_concept_drift_is_detected_and_exported() -> None:
    """A predictor that is right, then (abrupt change at event 1500) wrong."""
    registry = new_registry()
    learner = FixedLearner("fixed", TOPIC)
    metrics = PipelineMetrics(registry, clock=lambda: NOW)
    pipeline = Pipeline([learner], ListSink(), contract_topics={}, dead_letter_topic="dl", observer=metrics)
    before = samples(registry)
    assert value(before, "stream_concept_drift_detections_total", learner="fixed", direction="worse") == 0
    rng = random.Random(4)
    for i in range(3000):
        x = rng.gauss(0, 2)
        y = (x > 0) if i < 1500 else (x <= 0)
        doc = {"event_id": str(i), "ts": 1_000_000 + i, "x": x, "y": y}
        pipeline.process(rec(TOPIC, json.dumps(doc).encode(), i))
    got = samples(registry)
    assert value(got, "stream_concept_drift_detections_total", learner="fixed", direction="worse") >= 1
    last = value(got, "stream_concept_drift_last_detection_timestamp_seconds", learner="fixed")
    assert 1_000_000 + 1500 <= last * 1000 < 1_000_000 + 1700
    assert value(got, "stream_model_quality", learner="fixed", metric="accuracy", window="rolling") < 0.2


def test_drift_switch_of_a_configured_learner_is_exported() -> None:
    config = parse_config(
        {
            "learners": {
                "clf": {
                    "kind": "custom",
                    "input": TOPIC,
                    "output_topic": "out",
                    "label": "y",
                    "task": "binary",
                    "features": ["a", "b"],
                    "model": {"class": "naive_bayes.GaussianNB"},
                    "drift": {"detector": "adwin", "reaction": "switch"},
                }
            }
        }
    )
    learner = build_learner("clf", config.learners["clf"], config.input_topics())
    registry = new_registry()
    metrics = PipelineMetrics(registry, config.metrics, clock=lambda: NOW)
    pipeline = Pipeline([learner], ListSink(), contract_topics={}, dead_letter_topic="dl", observer=metrics)
    rng = random.Random(8)
    for i in range(4000):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        y = (a + b > 0) if i < 2000 else (a - b > 0)
        pipeline.process(rec(TOPIC, json.dumps({"event_id": str(i), "ts": i, "a": a, "b": b, "y": y}).encode(), i))
    got = samples(registry)
    assert value(got, "stream_model_switches_total", learner="clf", reason="drift") == 1
    assert value(got, "stream_model_switches_total", learner="clf", reason="rollback") == 0
    assert value(got, "stream_model_candidate_active", learner="clf") == 0
    assert value(got, "stream_model_version", learner="clf") == 2
    assert value(got, "stream_concept_drift_detections_total", learner="clf", direction="worse") >= 1


# -- robustness and serving ------------------------------------------------------------------------


class BrokenQuality(FixedLearner):
    def quality(self) -> Iterator[tuple[str, str, float]]:
        raise RuntimeError("dictionary changed size during iteration")


def test_a_learner_failing_at_scrape_time_does_not_break_the_scrape() -> None:
    registry = new_registry()
    metrics = PipelineMetrics(registry)
    Pipeline(
        [BrokenQuality("broken", TOPIC), FixedLearner("fine", TOPIC)],
        ListSink(),
        contract_topics={},
        dead_letter_topic="dl",
        observer=metrics,
    )
    got = samples(registry)
    assert value(got, "stream_model_version", learner="broken") == 1
    assert not any(n == "stream_model_quality" and dict(lb)["learner"] == "broken" for n, lb in got)
    assert any(n == "stream_model_quality" and dict(lb)["learner"] == "fine" for n, lb in got)


def test_serves_metrics_over_http() -> None:
    registry = new_registry()
    metrics = PipelineMetrics(registry)
    port = metrics.serve(0, addr="127.0.0.1", registry=registry)
    try:
        metrics.dead_lettered("x", "decode")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'stream_events_consumed_total{outcome="dead_letter_decode",topic="x"} 1.0' in body
        assert "process_cpu_seconds_total" in body and "python_gc_objects_collected_total" in body
    finally:
        metrics.close()


def test_consumer_properties_turn_on_librdkafka_statistics() -> None:
    metrics = PipelineMetrics(None, parse_config({"metrics": {"stats_interval_s": 2.5}}).metrics)
    props = metrics.consumer_properties()
    assert props["statistics.interval.ms"] == 2500 and props["stats_cb"] == metrics.kafka_stats


# -- promtool ------------------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package `prometheus`; tests/run.sh installs it)"
        if os.environ.get("STREAM_REQUIRE_KAFKA") == "1":
            pytest.fail(f"{message} (STREAM_REQUIRE_KAFKA=1)", pytrace=False)
        pytest.skip(message)
    return path


def test_promtool_check_metrics_reports_nothing(scraped: Any) -> None:
    _, _, text = scraped
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_serve_metrics_registers_once_per_registry_and_only_when_served() -> None:
    registry = CollectorRegistry()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(OSError):
            serve_metrics(parse_config({"metrics": {"port": taken}}), registry)
    assert registry.get_sample_value("stream_checkpoints_total") is None  # nothing registered
    first = serve_metrics(parse_config({"metrics": {"port": 0}}), registry)
    first.checkpoint_saved(ts=1.0)
    second = serve_metrics(parse_config({"metrics": {"port": 0}}), registry)  # replaces, no duplicate error
    assert registry.get_sample_value("stream_checkpoints_total") == 0
    assert second is not first


# -- tasks: each task's copies of the learners, under its own label ----------------------------------------


def feed(pipeline: Pipeline, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        x = rng.gauss(0, 1.5)
        doc = {"event_id": f"{seed}-{i}", "ts": 1_000_000 + i, "x": x, "y": rng.random() < 1 / (1 + math.exp(-x))}
        pipeline.process(rec(TOPIC, json.dumps(doc).encode(), i))


def tasks_of(got: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> set[str]:
    return {dict(labels)["task"] for n, labels in got if n == name}


def test_two_tasks_export_their_own_learners_and_a_revoked_task_disappears() -> None:
    """Two tasks of one instance, each with its own copy of the learner: one series per task
    (not whichever was attached last), so a query can sum or max over tasks; revoking a
    task removes its series, and a stale pipeline cannot remove its successor's."""
    registry = new_registry()
    metrics = PipelineMetrics(registry, clock=lambda: NOW)
    pipelines = {}
    for task, n in ((1, 120), (3, 70)):
        pipelines[task] = Pipeline([FixedLearner("fixed", TOPIC)], ListSink(), contract_topics={},
                                   dead_letter_topic="dl", observer=metrics, task=task)  # fmt: skip
        feed(pipelines[task], n, seed=task)
    got = samples(registry)
    assert tasks_of(got, "stream_model_events_learned_total") == {"1", "3"}
    assert value(got, "stream_model_events_learned_total", learner="fixed", task="1") == 120
    assert value(got, "stream_model_events_learned_total", learner="fixed", task="3") == 70
    assert value(got, "stream_labels_total", learner="fixed", task="1", outcome="received") == 120
    assert value(got, "stream_labels_total", learner="fixed", task="3", outcome="received") == 70
    q1 = value(got, "stream_model_quality", learner="fixed", task="1", metric="log_loss", window="cumulative")
    q3 = value(got, "stream_model_quality", learner="fixed", task="3", metric="log_loss", window="cumulative")
    assert q1 != q3  # different records: each task's own evaluation
    for name in TASKED - {"stream_concept_drift_last_detection_timestamp_seconds", "stream_model_switches_total",
                          "stream_model_candidate_active"}:  # fmt: skip
        assert tasks_of(got, name) == {"1", "3"}, name
    # Prediction counters stay per learner (summed over the tasks: the hot path knows no task).
    assert value(got, "stream_predictions_published_total", learner="fixed") == 190

    metrics.detach_task(3, pipelines[1])  # not task 3's pipeline: nothing removed
    assert tasks_of(samples(registry), "stream_model_version") == {"1", "3"}
    metrics.detach_task(3, pipelines[3])
    got = samples(registry)
    assert all(tasks_of(got, name) <= {"1"} for name in TASKED)
    assert value(got, "stream_model_events_learned_total", learner="fixed", task="1") == 120
    metrics.detach_task(1, pipelines[1])
    assert not any(name in TASKED for name, _ in samples(registry))


def test_a_task_state_attaches_its_pipeline_on_start_and_detaches_it_on_close(tmp_path: Any) -> None:
    from stream.pipeline import DeadLetterBudget
    from stream.state import CheckpointStore, LocalStorage
    from stream.task_state import TaskState

    registry = new_registry()
    metrics = PipelineMetrics(registry, clock=lambda: NOW)
    config = parse_config({"learners": {}})
    store = CheckpointStore(LocalStorage(tmp_path))
    ts = TaskState(2, config, store, [(TOPIC, 2)], (), metrics, None, lambda *a, **k: None)
    ts.learners = [FixedLearner("fixed", TOPIC)]
    ts.start(ListSink(), metrics, DeadLetterBudget(), None)
    assert ts.pipeline is not None
    feed(ts.pipeline, 30, seed=2)
    assert value(samples(registry), "stream_model_events_learned_total", learner="fixed", task="2") == 30
    ts.close()
    assert not any(name in TASKED for name, _ in samples(registry))
