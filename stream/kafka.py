"""Kafka clients, their configuration, topic administration and the output sink.

Our defaults encode the delivery contract (manual commits, idempotent
producer, no delivery timeout so a broker outage delays outputs instead of
dropping them); the user's ``[kafka.*]`` properties go over them, passed
straight through to librdkafka (security, SASL/SSL, tuning).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Config, all_topics, redact
from stream.errors import DeliveryFailed, TopicError
from stream.pipeline import DeadLetterBudget, Headers, RecordTooLarge, fit_dead_letter, record_size

# A topic partition as a plain, hashable, ordered pair: the key of every per-partition table.
TP = tuple[str, int]

__all__ = [
    "DeliveryFailed",
    "KafkaSink",
    "KafkaWriter",
    "admin_config",
    "consumer_config",
    "create_topics",
    "dead_letter_budget",
    "ensure_topics",
    "producer_config",
    "topic_retention_ms",
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


#: librdkafka's default ``message.max.bytes`` (the producer's largest request / record).
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
#: Head-room under the size limits for compression that expands incompressible values
#: (lz4: at most 0.4 % plus a few bytes) and the request framing.
SIZE_MARGIN = 0.98


def topic_max_message_bytes(config: Config, topic: str, timeout_s: float = 10.0) -> int | None:
    """The topic's effective ``max.message.bytes`` (its override, else the broker's default),
    or None if it cannot be read (no such topic yet, no DescribeConfigs permission)."""
    from confluent_kafka.admin import ConfigResource

    admin = AdminClient(admin_config(config) | {"error_cb": lambda e: None})
    try:
        futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)],
                                         request_timeout=timeout_s)  # fmt: skip
        for future in futures.values():
            entry = future.result(timeout=timeout_s).get("max.message.bytes")
            if entry is not None and entry.value is not None:
                return int(entry.value)
    except (KafkaException, ValueError, TypeError) as exc:
        log.warning("cannot read the topic's max.message.bytes", extra={"topic": topic, "reason": str(exc)})
    except Exception as exc:  # a timeout of the future, say: start anyway, delivery failures still cut further
        log.warning("cannot read the topic's max.message.bytes", extra={"topic": topic, "reason": repr(exc)})
    return None


def topic_retention_ms(config: Config, topics: Iterable[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Each topic's effective ``retention.ms`` (its override, else the broker's default;
    -1 = no time limit), for the topics whose configuration can be read. A topic that
    does not exist yet, or a missing DescribeConfigs permission, leaves it out."""
    from confluent_kafka.admin import ConfigResource

    wanted = sorted(set(topics))
    if not wanted:
        return {}
    admin = AdminClient(admin_config(config) | {"error_cb": lambda e: None})
    out: dict[str, int] = {}
    try:
        futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in wanted],
                                         request_timeout=timeout_s)  # fmt: skip
    except (KafkaException, ValueError, TypeError) as exc:
        log.warning("cannot read the topics' retention.ms", extra={"topics": wanted, "reason": str(exc)})
        return out
    for resource, future in futures.items():
        try:
            entry = future.result(timeout=timeout_s).get("retention.ms")
            if entry is not None and entry.value is not None:
                out[resource.name] = int(entry.value)
        except Exception as exc:  # no such topic, no permission, a timeout: the caller goes on without it
            log.warning("cannot read the topic's retention.ms", extra={"topic": resource.name, "reason": repr(exc)})
    return out


def dead_letter_budget(config: Config, producer_props: dict[str, Any]) -> tuple[int, int | None]:
    """The size budget of one dead letter, known before producing any: the smaller of the
    producer's ``message.max.bytes`` and the dead-letter topic's ``max.message.bytes``, with
    head-room for compression and framing. Also returns the topic's limit (None if unknown)."""
    producer_max = int(producer_props.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))
    topic_max = topic_max_message_bytes(config, config.topics.dead_letters)
    limit = producer_max if topic_max is None else min(producer_max, topic_max)
    return int(limit * SIZE_MARGIN), topic_max


def batch_size_for(topic_max: int | None, props: dict[str, Any]) -> dict[str, Any]:
    """librdkafka batches records of a partition up to ``batch.size`` bytes (1,000,000 by
    default), and the broker refuses a whole batch over the topic's ``max.message.bytes``:
    with a dead-letter topic whose limit is lower, several small dead letters batched
    together would be refused. Returns the ``batch.size`` that prevents it, if one is needed."""
    if topic_max is None:
        return {}
    current = int(props.get("batch.size", DEFAULT_MESSAGE_MAX_BYTES))
    wanted = int(topic_max * SIZE_MARGIN) - 1024
    return {"batch.size": max(wanted, 1024)} if wanted < current else {}


class KafkaSink:
    """Produces outputs and dead letters asynchronously, with delivery reports.

    A full local queue (``BufferError``) is handled by serving delivery
    reports until there is room, never by dropping. ``flush`` returns only
    once every record produced so far is acknowledged, which is what makes it
    safe to commit the offsets they depend on.

    A record over the producer's ``message.max.bytes`` raises ``RecordTooLarge``
    at ``produce`` (the pipeline contains it). A dead letter refused as too
    large on delivery (the topic's limit) lowers the shared ``budget``; without
    transactions it is produced again at once, cut to the new budget, before
    ``flush`` returns; in a transaction the failure is raised (the transaction
    must abort), and the records are dead-lettered again, cut, when reprocessed.

    With ``on_acknowledged`` set, the loop's batches (``consumed``) are timed from
    consumed to every output they made acknowledged: the pipeline's own share of the
    latency, apart from the broker's hops before and after it. Nothing is kept per
    record: one entry per batch, settled by counting delivery reports, and the time
    of acknowledgement is the broker's (``Message.latency()`` after its CreateTime),
    not when the report was served.
    """

    #: Called with (seconds from consumed to acknowledged, records) once per ``consumed`` batch.
    on_acknowledged: Callable[[float, int], None] | None = None

    def __init__(
        self,
        producer: Producer,
        dead_letter_topic: str | None = None,
        budget: DeadLetterBudget | None = None,
        transactional: bool = False,
    ) -> None:
        self.producer = producer
        self._produce = producer.produce
        self._poll = producer.poll
        self.failed: list[KafkaError] = []
        self.delivered = 0
        self.dead_letter_topic = dead_letter_topic
        self.budget = budget if budget is not None else DeadLetterBudget()
        self.transactional = transactional
        self._redo: list[tuple[bytes | None, bytes | None, Headers]] = []
        #: Dead letters produced again, cut further, after the topic refused them (for logs and tests).
        self.recut = 0
        #: Records produced, and delivery reports served (acknowledged or failed).
        self.produced = 0
        self.settled = 0
        #: Batches whose outputs are not all settled: (``produced`` after it, consumed at, records).
        self._batches: deque[tuple[int, float, int]] = deque()
        self._ack_target = sys.maxsize

    def consumed(self, consumed_at: float, records: int) -> None:
        """A batch of ``records`` consumed at ``consumed_at`` (wall clock, s) is processed and its
        outputs produced: report when they are all acknowledged (see ``on_acknowledged``)."""
        report = self.on_acknowledged
        if report is None:
            return
        if self.settled >= self.produced:  # nothing outstanding: no outputs, or all already acknowledged
            report(max(0.0, time.time() - consumed_at), records)
            return
        self._batches.append((self.produced, consumed_at, records))
        self._ack_target = self._batches[0][0]

    def _settled(self, msg: Message) -> None:
        """The delivery report that completes the outputs of the oldest batches."""
        latency = msg.latency()
        kind, ts_ms = msg.timestamp()
        if latency is None or kind == TIMESTAMP_NOT_AVAILABLE:
            acked_at = time.time()
        else:  # CreateTime is the whole ms of the produce call: half a ms after it on average
            acked_at = ts_ms / 1000 + 0.0005 + latency
        batches, report = self._batches, self.on_acknowledged
        while batches and batches[0][0] <= self.settled:
            _, consumed_at, records = batches.popleft()
            if report is not None:
                report(max(0.0, acked_at - consumed_at), records)
        self._ack_target = batches[0][0] if batches else sys.maxsize

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed.append(err)
        self.settled += 1
        if self.settled >= self._ack_target:
            self._settled(msg)

    def _dead_letter_report(
        self, key: bytes | None, value: bytes | None, headers: Headers
    ) -> Callable[[KafkaError | None, Message], None]:
        """Delivery report of one dead letter, which keeps what was produced: a delivery
        report's message carries no headers, and a refused one is produced again, cut."""

        def report(err: KafkaError | None, msg: Message) -> None:
            self.settled += 1
            if self.settled >= self._ack_target:
                self._settled(msg)
            if err is None:
                self.delivered += 1
                return
            if err.code() != KafkaError.MSG_SIZE_TOO_LARGE:
                self.failed.append(err)
                return
            size = record_size(key, value, headers)
            self.budget.lower(size)
            log.warning(
                "dead letter refused as too large; cutting it further",
                extra={"topic": msg.topic(), "bytes": size, "budget": self.budget.max_bytes,
                       "source_offset": dict(headers).get("stream.source.offset")},
            )  # fmt: skip
            if self.transactional:
                self.failed.append(err)  # the transaction must abort; reprocessing cuts it to the new budget
            else:
                self._redo.append((key, value, headers))

        return report

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        on_delivery: Callable[[KafkaError | None, Message], None] = self._on_delivery
        if topic == self.dead_letter_topic:
            on_delivery = self._dead_letter_report(key, value, headers or [])
        while True:
            try:
                if headers:
                    self._produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                else:  # outputs: no headers argument to parse
                    self._produce(topic, value, key, on_delivery=on_delivery)
                self.produced += 1
                return
            except BufferError:
                self._poll(0.05)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise RecordTooLarge(topic, record_size(key, value, headers), err.str()) from None
                raise

    def _reproduce(self) -> None:
        redo, self._redo = self._redo, []
        assert self.dead_letter_topic is not None
        for key, value, headers in redo:
            while True:
                limit = self.budget.max_bytes or record_size(key, value, headers) // 2
                key, value, headers = fit_dead_letter(key, value, headers, limit)
                try:
                    self.produce(self.dead_letter_topic, key, value, headers)
                    self.recut += 1
                    break
                except RecordTooLarge as exc:
                    before = self.budget.max_bytes
                    if self.budget.lower(exc.size) == before:
                        raise DeliveryFailed(f"dead letter cannot be cut to fit: {exc}") from None

    def poll(self) -> None:
        self._poll(0)
        if self._redo:
            self._reproduce()
        if self.failed:
            self._raise_failed()

    def flush(self, timeout_s: float) -> bool:
        """Wait until all outputs are acknowledged; False if ``timeout_s`` ran out."""
        deadline = time.monotonic() + timeout_s
        remaining = self.producer.flush(timeout_s)
        while self._redo:
            self._reproduce()
            remaining = self.producer.flush(max(0.0, deadline - time.monotonic()))
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


def _listed(admin: AdminClient, topics: Mapping[str, int], timeout_s: float) -> Any:
    """Cluster metadata once it lists every one of ``topics`` with its partitions: a topic just
    created reaches the metadata of the broker we ask a moment later, not with the create's answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=timeout_s)
        if all(t in meta.topics and len(meta.topics[t].partitions) >= n for t, n in topics.items()):
            return meta
        if time.monotonic() > deadline:
            raise TopicError(f"topic(s) created but not listed after {timeout_s:.0f} s: {', '.join(sorted(topics))}")
        time.sleep(0.1)


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
        meta = _listed(admin, missing, timeout_s)
        missing = {}
    if missing:
        need = ", ".join(f"{t} ({n} partition{'s' if n > 1 else ''})" for t, n in sorted(missing.items()))
        raise TopicError(
            f"topic(s) missing on {config.kafka.bootstrap_servers}: {need}; create them or pass --create-topics"
        )
    for topic, n in partitions.items():
        have = len(meta.topics[topic].partitions)
        if have < n:
            raise TopicError(f"topic {topic} has {have} partitions; the recording needs {n} (same partition numbers)")
