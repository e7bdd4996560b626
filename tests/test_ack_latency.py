"""The pipeline's own share of the latency: from a consumed batch to every output it made
acknowledged, counted by the sink from delivery reports and exported by the metrics
(``stream_pipeline_latency_seconds``). A fake producer serves the delivery reports, so the
times are exact; the real broker's case is in tests/test_kafka_sink.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME
from prometheus_client import generate_latest

from stream.kafka import KafkaSink
from stream.metrics import OWN_LATENCY_BUCKETS, PipelineMetrics, new_registry
from stream.pipeline import Pipeline
from stream.task_state import TaskSink


class _Delivered:
    """What a delivery report carries that the sink reads."""

    def __init__(self, created_ms: int, latency: float | None) -> None:
        self._created_ms, self._latency = created_ms, latency

    def latency(self) -> float | None:
        return self._latency

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, self._created_ms


class FakeProducer:
    """Keeps each produce's delivery callback; ``deliver`` serves the oldest ``n`` of them."""

    def __init__(self) -> None:
        self.pending: list[Callable[[Any, Any], None]] = []

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **kw: Any) -> None:
        self.pending.append(kw["on_delivery"])

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return len(self.pending)

    def deliver(self, n: int, created_ms: int, latency: float | None) -> None:
        served, self.pending = self.pending[:n], self.pending[n:]
        for callback in served:
            callback(None, _Delivered(created_ms, latency))


def _sink() -> tuple[KafkaSink, FakeProducer, list[tuple[float, int]]]:
    producer = FakeProducer()
    sink = KafkaSink(producer)  # type: ignore[arg-type]
    reports: list[tuple[float, int]] = []
    sink.on_acknowledged = lambda seconds, records: reports.append((seconds, records))
    return sink, producer, reports


def test_a_batch_is_timed_to_its_last_output_acknowledged() -> None:
    sink, producer, reports = _sink()
    for i in range(3):
        sink.produce("out", None, b"%d" % i)
    sink.consumed(1000.000, records=5)
    producer.deliver(2, created_ms=1000_010, latency=0.004)
    assert reports == []  # one output still outstanding
    producer.deliver(1, created_ms=1000_020, latency=0.006)
    ((seconds, records),) = reports
    # Acknowledged at CreateTime + latency (+ half a ms: CreateTime is whole ms), not when the report was served.
    assert records == 5 and seconds == pytest.approx(0.020 + 0.0005 + 0.006)


def test_batches_settle_in_order_and_one_without_outputs_at_once() -> None:
    sink, producer, reports = _sink()
    sink.produce("out", None, b"a")
    sink.consumed(2000.0, records=1)
    sink.produce("out", None, b"b")
    sink.produce("out", None, b"c")
    sink.consumed(2000.5, records=2)
    producer.deliver(3, created_ms=2000_600, latency=0.001)
    assert [r for _, r in reports] == [1, 2]
    assert reports[0][0] == pytest.approx(0.6015) and reports[1][0] == pytest.approx(0.1015)
    sink.consumed(1e18, records=7)  # nothing outstanding, nothing produced: now - consumed, never negative
    assert reports[-1] == (0.0, 7)


def test_without_a_listener_nothing_is_kept() -> None:
    producer = FakeProducer()
    sink = KafkaSink(producer)  # type: ignore[arg-type]
    sink.produce("out", None, b"a")
    sink.consumed(0.0, records=1)
    producer.deliver(1, created_ms=0, latency=0.001)
    assert not sink._batches and sink.settled == sink.produced == 1


@pytest.mark.parametrize("tasked", [False, True], ids=["sink", "task-sink"])
def test_metrics_export_the_pipelines_own_latency_per_record(tasked: bool) -> None:
    # A task's pipeline writes through a TaskSink (its headers) over the shared KafkaSink: the
    # latency is measured all the same.
    producer = FakeProducer()
    shared = KafkaSink(producer)  # type: ignore[arg-type]
    sink: KafkaSink | TaskSink = TaskSink(shared, 0) if tasked else shared
    registry = new_registry()
    metrics = PipelineMetrics(registry)
    Pipeline([], sink, contract_topics={}, dead_letter_topic="dl", observer=metrics)
    sink.produce("out", None, b"a")
    metrics.batch_processed(records=4, seconds=0.001)
    producer.deliver(1, created_ms=0, latency=0.0)  # CreateTime 0: acknowledged long before: counted as 0 s
    text = generate_latest(registry).decode()
    assert f'stream_pipeline_latency_seconds_bucket{{le="{OWN_LATENCY_BUCKETS[0]}"}} 4.0' in text
    assert "stream_pipeline_latency_seconds_count 4.0" in text
