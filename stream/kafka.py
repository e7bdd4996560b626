"""Kafka clients, their configuration, topic administration and the output sink.

Our defaults encode the delivery contract (manual commits, idempotent
producer, no delivery timeout so a broker outage delays outputs instead of
dropping them); the user's ``[kafka.*]`` properties go over them, passed
straight through to librdkafka (security, SASL/SSL, tuning).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Config, redact
from stream.pipeline import Headers

__all__ = [
    "DeliveryFailed",
    "KafkaSink",
    "admin_config",
    "consumer_config",
    "create_topics",
    "producer_config",
    "wait_for_broker",
]

log = logging.getLogger(__name__)

#: Bounds the length of error texts put in dead-letter headers.
MAX_ERROR_CHARS = 1000


def _base(config: Config) -> dict[str, Any]:
    k = config.kafka
    return {"bootstrap.servers": k.bootstrap_servers, "client.id": k.client_id, **k.common}


def consumer_config(config: Config, **extra: Any) -> dict[str, Any]:
    props = _base(config) | {
        "group.id": config.kafka.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 100,
    }
    return props | extra | config.kafka.consumer


def producer_config(config: Config, **extra: Any) -> dict[str, Any]:
    props = _base(config) | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "compression.type": "lz4",
        # 0 = never time out: during an outage outputs wait in the queue and
        # offsets are not committed past them, so nothing is dropped.
        "message.timeout.ms": 0,
    }
    return props | extra | config.kafka.producer


def admin_config(config: Config) -> dict[str, Any]:
    return _base(config)


def log_error_cb(err: KafkaError) -> None:
    """librdkafka's client-level errors (broker down, auth): logged, never raised;
    the client keeps reconnecting by itself."""
    level = logging.ERROR if err.fatal() else logging.WARNING
    log.log(level, "kafka client error", extra={"code": err.name(), "reason": err.str()})


def wait_for_broker(config: Config, should_stop: Callable[[], bool], max_backoff_s: float = 30.0) -> bool:
    """Block until the cluster answers a metadata request, retrying with
    exponential backoff. Returns False if asked to stop first."""
    admin = AdminClient(admin_config(config) | {"error_cb": lambda e: None})
    backoff = 0.5
    while not should_stop():
        try:
            admin.list_topics(timeout=5)
            return True
        except KafkaException as exc:
            log.warning(
                "broker unavailable, retrying",
                extra={"bootstrap_servers": config.kafka.bootstrap_servers, "retry_in_s": backoff, "reason": str(exc)},
            )
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not should_stop():
            time.sleep(0.1)
        backoff = min(backoff * 2, max_backoff_s)
    return False


def all_topics(config: Config) -> dict[str, int]:
    """Every topic the configuration reads or writes, with its partition count."""
    from stream.learners import build_learner  # the learners know their output topics

    n = config.topics.partitions
    topics = dict.fromkeys(config.input_topics().values(), n)
    topics[config.topics.dead_letters] = n
    for name, spec in config.learners.items():
        learner = build_learner(name, spec, config.input_topics())
        for t in learner.reads:
            topics.setdefault(t, n)
        topics.setdefault(learner.output_topic, n)
    return topics


def create_topics(config: Config, timeout_s: float = 30.0) -> dict[str, str]:
    """Create every configured topic that does not exist yet (idempotent).
    Returns topic -> ``created`` or ``exists``; raises on any other error."""
    admin = AdminClient(admin_config(config))
    wanted = all_topics(config)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    result = {t: "exists" for t in wanted if t in existing}
    new = [
        NewTopic(t, num_partitions=p, replication_factor=config.topics.replication_factor)
        for t, p in wanted.items()
        if t not in existing
    ]
    if new:
        for topic, future in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                future.result()
                result[topic] = "created"
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                result[topic] = "exists"
    return result


class DeliveryFailed(RuntimeError):
    """An output could not be delivered and retrying cannot help."""


class KafkaSink:
    """Produces outputs and dead letters asynchronously, with delivery reports.

    A full local queue (``BufferError``) is handled by serving delivery
    reports until there is room, never by dropping. ``flush`` returns only
    once every record produced so far is acknowledged, which is what makes it
    safe to commit the offsets they depend on.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._produce = producer.produce
        self._poll = producer.poll
        self.failed: list[KafkaError] = []
        self.delivered = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed.append(err)

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        while True:
            try:
                self._produce(topic, value, key, headers=headers, on_delivery=self._on_delivery)
                return
            except BufferError:
                self._poll(0.05)

    def poll(self) -> None:
        self._poll(0)
        if self.failed:
            self._raise_failed()

    def flush(self, timeout_s: float) -> bool:
        """Wait until all outputs are acknowledged; False if ``timeout_s`` ran out."""
        remaining = self.producer.flush(timeout_s)
        if self.failed:
            self._raise_failed()
        return remaining == 0

    def _raise_failed(self) -> None:
        err = self.failed[0]
        raise DeliveryFailed(f"output delivery failed: {err.name()}: {err.str()}")


def describe_clients(config: Config) -> dict[str, Any]:
    """The effective client properties, secrets redacted, for the start-up log."""
    return {"consumer": redact(consumer_config(config)), "producer": redact(producer_config(config))}


def topic_partitions(items: Iterable[Any]) -> list[tuple[str, int, int]]:
    return [(tp.topic, tp.partition, tp.offset) for tp in items]
