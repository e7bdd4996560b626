"""Kafka clients, their configuration, topic administration and the output sink.

Our defaults encode the delivery contract (manual commits, idempotent
producer, no delivery timeout so a broker outage delays outputs instead of
dropping them); the user's ``[kafka.*]`` properties go over them, passed
straight through to librdkafka (security, SASL/SSL, tuning).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Config, all_topics, redact
from stream.errors import DeliveryFailed, TopicError
from stream.pipeline import Headers

__all__ = [
    "DeliveryFailed",
    "KafkaSink",
    "KafkaWriter",
    "admin_config",
    "consumer_config",
    "create_topics",
    "ensure_topics",
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


# --------------------------------------------------------------------------- producing recordings


class KafkaWriter:
    """An idempotent producer that keeps partitions, keys, timestamps and
    headers, and checks every delivery report (``flush`` raises on any failure)."""

    def __init__(self, config: Config, **extra: Any) -> None:
        # A bounded delivery timeout: a CLI replay should fail, not wait forever.
        props = producer_config(config, **{"message.timeout.ms": 300_000, **extra})
        self.producer = Producer(props)
        self.produced = 0
        self.delivered = 0
        self.failed = 0
        #: The first few delivery errors, for the message.
        self.errors: list[str] = []
        self._produce = self.producer.produce
        self._poll = self.producer.poll

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err.name()}: {err.str()}")

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        timestamp: int = 0,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"timestamp": timestamp, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self._produce(topic, value, key, **kwargs)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._poll(0.05)
        self.produced += 1
        if self.produced % 1000 == 0:
            self._poll(0)

    def poll(self, timeout_s: float = 0) -> None:
        self._poll(timeout_s)

    def flush(self, timeout_s: float = 600.0) -> None:
        """Wait for every delivery report; raise if any record failed or is still pending."""
        remaining = self.producer.flush(timeout_s)
        if self.failed:
            raise DeliveryFailed(f"{self.failed} records not delivered: {'; '.join(self.errors)}")
        if remaining:
            raise DeliveryFailed(f"{remaining} records still undelivered after {timeout_s:.0f}s")


def ensure_topics(config: Config, partitions: Mapping[str, int], *, create: bool, timeout_s: float = 30.0) -> None:
    """Check that each topic exists with at least the given partition count;
    create missing ones when ``create`` (replication factor from config)."""
    admin = AdminClient(admin_config(config))
    meta = admin.list_topics(timeout=timeout_s)
    missing = {t: n for t, n in partitions.items() if t not in meta.topics}
    if missing and create:
        rf = config.topics.replication_factor
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=n, replication_factor=rf) for t, n in missing.items()]
        )
        for topic, future in futures.items():
            try:
                future.result(timeout_s)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
            log.info("topic created", extra={"topic": topic, "partitions": missing[topic]})
        missing = {}
        meta = admin.list_topics(timeout=timeout_s)
    if missing:
        need = ", ".join(f"{t} ({n} partition{'s' if n > 1 else ''})" for t, n in sorted(missing.items()))
        raise TopicError(
            f"topic(s) missing on {config.kafka.bootstrap_servers}: {need}; create them or pass --create-topics"
        )
    for topic, n in partitions.items():
        have = len(meta.topics[topic].partitions)
        if have < n:
            raise TopicError(f"topic {topic} has {have} partitions; the recording needs {n} (same partition numbers)")
