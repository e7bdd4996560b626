"""The real Kafka broker used by the tests: round trip, restart with durable data, pause."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from kafka_broker import KafkaBroker, broker_answers, create_topics

pytestmark = pytest.mark.kafka


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _msg: object) -> None:
        if error is not None:
            errors.append(error)

    for value in values:
        producer.produce(topic, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "messages still in flight after 30s"
    assert not errors, errors


def consume(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            value = msg.value()
            assert value is not None
            values.append(value)
    finally:
        consumer.close()
    return values


def test_roundtrip_100_messages_in_order(kafka_bootstrap: str, unique_topics: Callable[..., list[str]]) -> None:
    (topic,) = unique_topics("roundtrip")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    sent = [f"message-{i:03d}".encode() for i in range(100)]

    produce(kafka_bootstrap, topic, sent)

    assert consume(kafka_bootstrap, topic, len(sent)) == sent


def test_restart_keeps_data_and_address(kafka_broker: KafkaBroker, unique_topics: Callable[..., list[str]]) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    (topic,) = unique_topics("durable")
    create_topics(bootstrap, [topic], partitions=2)
    sent = [f"before-restart-{i}".encode() for i in range(20)]
    produce(bootstrap, topic, sent)

    kafka_broker.restart()

    assert kafka_broker.bootstrap_servers == bootstrap
    assert broker_answers(bootstrap, timeout=10)
    assert sorted(consume(bootstrap, topic, len(sent))) == sorted(sent)


def test_pause_makes_broker_unresponsive_until_resume(kafka_broker: KafkaBroker) -> None:
    kafka_broker.pause()
    try:
        assert kafka_broker.is_paused
        assert not broker_answers(kafka_broker.bootstrap_servers, timeout=1.5)
    finally:
        kafka_broker.resume()
    assert broker_answers(kafka_broker.bootstrap_servers, timeout=10)
