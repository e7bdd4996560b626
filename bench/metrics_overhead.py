"""Per-event cost of the metrics observer: events/s through ``Pipeline.process``
with no observer, with ``PipelineMetrics``, and with a naive observer built on
``prometheus_client`` Counter/Histogram children (for comparison).

    .venv/bin/python bench/metrics_overhead.py [events] [repetitions]

No broker: records are pre-encoded in memory and outputs go to a list, so the
numbers isolate the pipeline + observer (the Kafka client adds its own cost).
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from stream.config import parse_config
from stream.learners import build_learner
from stream.metrics import LATENCY_BUCKETS, PipelineMetrics, new_registry
from stream.pipeline import BaseObserver, Pipeline
from stream.recording import RecordedMessage


def rec(topic: str, value: bytes, offset: int) -> RecordedMessage:
    return RecordedMessage(topic, 0, offset, (1, 0), b"u1", value)


class ListSink:
    def __init__(self) -> None:
        self.n = 0

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.n += 1


class NaiveObserver(BaseObserver):
    """What a straightforward prometheus_client observer costs: locked children."""

    def __init__(self) -> None:
        r = CollectorRegistry()
        self.events = Counter("e", "e", ["topic", "outcome"], registry=r)
        self.pred = Counter("p", "p", ["learner"], registry=r)
        self.lat = Histogram("l", "l", ["learner"], registry=r, buckets=LATENCY_BUCKETS)
        self._ok: dict[str, Any] = {}
        self._p: dict[str, Any] = {}
        self._l: dict[str, Any] = {}

    def processed(self, topic: str, record: Any, event: Any) -> None:
        c = self._ok.get(topic) or self._ok.setdefault(topic, self.events.labels(topic, "ok"))
        c.inc()

    def published(self, learner: Any, event: Any, record: Any) -> None:
        c = self._p.get(learner.name) or self._p.setdefault(learner.name, self.pred.labels(learner.name))
        c.inc()
        h = self._l.get(learner.name) or self._l.setdefault(learner.name, self.lat.labels(learner.name))
        h.observe(max(time.time() - event.ts / 1000, 0))

    def dead_lettered(self, topic: str, stage: str) -> None:
        pass


CONFIG = {
    "learners": {
        "basket": {
            "kind": "custom",
            "input": "purchases",
            "output_topic": "basket",
            "label": "quantity",
            "task": "regression",
            "features": ["unit_price", "category", "account_age_days"],
            "model": [{"class": "preprocessing.StandardScaler"}, {"class": "linear_model.LinearRegression"}],
        }
    }
}


def records(n: int) -> list[RecordedMessage]:
    rng = random.Random(0)
    now = int(time.time() * 1000)
    enc = msgspec.json.Encoder().encode
    return [
        rec(
            "purchases",
            enc(
                {
                    "event_id": f"e{i}",
                    "ts": now,
                    "order_id": f"o{i}",
                    "user_id": f"u{i % 97}",
                    "item_id": f"i{i % 31}",
                    "quantity": rng.randint(1, 5),
                    "unit_price": rng.uniform(1, 100),
                    "category": rng.choice("abc"),
                    "account_age_days": rng.uniform(0, 900),
                }
            ),
            i,
        )
        for i in range(n)
    ]


def run(observer_kind: str, recs: list[RecordedMessage]) -> float:
    cfg = parse_config(CONFIG)
    learners = [build_learner(n, s, cfg.input_topics()) for n, s in cfg.learners.items()]
    observer: Any = None
    if observer_kind == "metrics":
        observer = PipelineMetrics(new_registry(), cfg.metrics)
    elif observer_kind == "naive":
        observer = NaiveObserver()
    pipeline = Pipeline(
        learners, ListSink(), contract_topics=cfg.input_topics(), dead_letter_topic="dl", observer=observer
    )
    process = pipeline.process
    started = time.perf_counter()
    for r in recs:
        process(r)
    if observer_kind == "metrics":
        observer.batch_processed(len(recs), time.perf_counter() - started)
    return time.perf_counter() - started


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    recs = records(n)
    best: dict[str, float] = {}
    # Interleaved repetitions, best of each: other processes on the machine add noise, never speed.
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 9):
        for kind in ("none", "metrics", "naive"):
            best[kind] = min(best.get(kind, float("inf")), run(kind, recs))
    base = best["none"]
    for kind in ("none", "metrics", "naive"):
        t = best[kind]
        print(
            f"{kind:8s} {n / t:10.0f} events/s  {t / n * 1e6:7.2f} us/event"
            f"  overhead {(t - base) / n * 1e6:+6.2f} us/event"
            f" ({(t / base - 1) * 100:+5.1f} %)"
        )


if __name__ == "__main__":
    main()
