"""The output sink against a real broker: a full local queue never drops a record."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer
from kafka_broker import create_topics
from kafka_util import read_all

from stream.kafka import DeliveryFailed, KafkaSink

pytestmark = pytest.mark.kafka


def test_full_producer_queue_is_drained_not_dropped(kafka_bootstrap: str, unique_topics) -> None:  # type: ignore[no-untyped-def]
    (topic,) = unique_topics("out")
    create_topics(kafka_bootstrap, [topic])
    # A queue of 5 messages forces BufferError on almost every produce.
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "queue.buffering.max.messages": 5, "linger.ms": 1})
    sink = KafkaSink(producer)
    n = 1000
    for i in range(n):
        sink.produce(topic, str(i).encode(), f"v{i}".encode())
    assert sink.flush(30)
    assert sink.delivered == n
    got = read_all(kafka_bootstrap, topic, expected=n)
    assert [m.value() for m in got] == [f"v{i}".encode() for i in range(n)]


def test_permanent_delivery_failure_is_raised(kafka_bootstrap: str, unique_topics) -> None:  # type: ignore[no-untyped-def]
    (topic,) = unique_topics("small")
    create_topics(kafka_bootstrap, [topic], config={"max.message.bytes": "1000"})
    sink = KafkaSink(Producer({"bootstrap.servers": kafka_bootstrap}))
    sink.produce(topic, None, b"x" * 5000)
    with pytest.raises(DeliveryFailed, match="MSG_SIZE_TOO_LARGE"):
        sink.flush(30)
