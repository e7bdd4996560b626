"""Checkpoints kept in a compacted Kafka topic: no shared filesystem needed.

``[checkpoints] storage = "kafka"`` keeps a group's checkpoints in the topic
``<group_id>.checkpoints`` (or ``[checkpoints] topic``), so an instance on a new
machine with an empty disk restores the state from Kafka, as Kafka Streams and
Quix Streams restore their stores from changelog topics.

A checkpoint file of N bytes is stored as ``ceil(N / chunk_bytes)`` chunk
records keyed ``<name>/<i>``, then one manifest record keyed ``<name>`` (JSON:
length, chunk count, sha256 of the whole). The topic has one partition, so the
manifest, written last, is seen after every chunk it names: a checkpoint
appears whole or not at all, the atomicity the ``stream.state.Storage``
protocol asks for. A reader that finds a manifest whose chunks are not all
there (a crash mid-write cannot produce one; a hand-made record can) passes it
over. Deleting writes tombstones, manifest first. The topic is compacted
(``cleanup.policy=compact``): Kafka keeps the latest value of every key and
drops deleted checkpoints, so the topic holds about ``[checkpoints] keep``
checkpoints. Chunks are fetched by offset only when a checkpoint is read
(start-up, ``stream model``), so an instance never holds more than the one it
restores in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Config
from stream.kafka import admin_config, consumer_config, producer_config
from stream.state import LocalStorage, Storage, checkpoint_dir

__all__ = ["KafkaStorage", "checkpoint_storage", "checkpoint_topic"]

log = logging.getLogger(__name__)

#: Framing, key and headers of a chunk record on top of its value.
_RECORD_OVERHEAD = 4096


def checkpoint_topic(config: Config) -> str:
    return config.checkpoints.topic or f"{config.kafka.group_id}.checkpoints"


def checkpoint_storage(config: Config) -> Storage:
    """The configured storage: a directory (``<dir>/<group_id>/``) or the compacted topic."""
    if config.checkpoints.storage == "kafka":
        return KafkaStorage(config, checkpoint_topic(config), chunk_bytes=config.checkpoints.chunk_bytes)
    return LocalStorage(checkpoint_dir(config))


class _Manifest:
    __slots__ = ("chunk_bytes", "chunks", "length", "sha256")

    def __init__(self, length: int, chunks: int, chunk_bytes: int, sha256: str) -> None:
        self.length, self.chunks, self.chunk_bytes, self.sha256 = length, chunks, chunk_bytes, sha256


class KafkaStorage:
    """A ``stream.state.Storage`` in one compacted topic partition (see the module doc)."""

    def __init__(self, config: Config, topic: str, *, chunk_bytes: int = 512 * 1024, timeout_s: float = 30.0) -> None:
        self.config = config
        self.topic = topic
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self._tp = TopicPartition(topic, 0)
        # Per process: a forked checkpoint writer makes its own clients (librdkafka's are not fork-safe).
        self._pid = -1
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._errors: list[KafkaError] = []
        self._topic_ready = False
        #: What the topic holds, read up to ``_position``: manifests by name, chunk offsets by key.
        self._manifests: dict[str, _Manifest] = {}
        self._chunks: dict[str, int] = {}
        self._position = 0

    def describe(self) -> str:
        return f"kafka topic {self.topic}"

    # -- clients -------------------------------------------------------------------

    def _clients(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._producer = Producer(producer_config(self.config, **{"message.max.bytes": self._max_message_bytes()}))
        reader = {
            "group.id": f"{self.config.kafka.group_id}.checkpoint-reader",  # assigned, never committed
            "isolation.level": "read_uncommitted",
            "fetch.message.max.bytes": self._max_message_bytes(),
        }
        self._consumer = Consumer(consumer_config(self.config, **reader))

    def _max_message_bytes(self) -> int:
        return self.chunk_bytes + _RECORD_OVERHEAD

    def ensure_topic(self) -> None:
        """Create the compacted topic if it is missing (idempotent)."""
        if self._topic_ready:
            return
        admin = AdminClient(admin_config(self.config))
        if self.topic not in admin.list_topics(timeout=self.timeout_s).topics:
            spec = NewTopic(
                self.topic,
                num_partitions=1,
                replication_factor=self.config.topics.replication_factor,
                config={"cleanup.policy": "compact", "max.message.bytes": str(self._max_message_bytes())},
            )
            try:
                admin.create_topics([spec], request_timeout=self.timeout_s)[self.topic].result(self.timeout_s)
                log.info("checkpoint topic created", extra={"topic": self.topic})
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise OSError(f"cannot create the checkpoint topic {self.topic}: {exc}") from exc
        self._topic_ready = True

    # -- writing -------------------------------------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(err)

    def _produce_all(self, records: Sequence[tuple[str, bytes | None]]) -> None:
        self.ensure_topic()
        self._clients()
        assert self._producer is not None
        self._errors.clear()
        for key, value in records:
            while True:
                try:
                    self._producer.produce(self.topic, value, key.encode(), partition=0, on_delivery=self._on_delivery)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        remaining = self._producer.flush(self.timeout_s)
        if self._errors or remaining:
            reason = self._errors[0].str() if self._errors else f"{remaining} records undelivered in {self.timeout_s}s"
            raise OSError(f"checkpoint topic {self.topic}: write failed: {reason}")

    def write(self, name: str, data: bytes) -> None:
        n = max(1, math.ceil(len(data) / self.chunk_bytes))
        view = memoryview(data)
        records: list[tuple[str, bytes | None]] = [
            (f"{name}/{i:06d}", bytes(view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes])) for i in range(n)
        ]
        manifest = {
            "length": len(data), "chunks": n, "chunk_bytes": self.chunk_bytes,
            "sha256": hashlib.sha256(data).hexdigest(),
        }  # fmt: skip
        records.append((name, json.dumps(manifest).encode()))
        self._produce_all(records)

    def delete(self, name: str) -> None:
        self._refresh()
        m = self._manifests.get(name)
        if m is None:
            return
        self._produce_all([(name, None)] + [(f"{name}/{i:06d}", None) for i in range(m.chunks)])
        self._manifests.pop(name, None)

    # -- reading -------------------------------------------------------------------

    def _refresh(self) -> None:
        """Index what was written since the last look (everything, the first time)."""
        self.ensure_topic()
        self._clients()
        consumer = self._consumer
        assert consumer is not None
        low, high = consumer.get_watermark_offsets(self._tp, timeout=self.timeout_s)
        if self._position >= high:
            return
        consumer.assign([TopicPartition(self.topic, 0, max(self._position, low) or OFFSET_BEGINNING)])
        deadline = time.monotonic() + self.timeout_s
        while self._position < high:
            if time.monotonic() > deadline:
                raise OSError(f"checkpoint topic {self.topic}: reading up to offset {high} timed out")
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    raise OSError(f"checkpoint topic {self.topic}: {msg.error().str()}")  # type: ignore[union-attr]
                self._index(msg)
                self._position = msg.offset() + 1  # type: ignore[operator]

    def _index(self, msg: Message) -> None:
        key = (msg.key() or b"").decode("utf-8", "replace")
        value = msg.value()
        if "/" in key:
            if value is None:
                self._chunks.pop(key, None)
            else:
                self._chunks[key] = msg.offset()  # type: ignore[assignment]
            return
        if value is None:
            self._manifests.pop(key, None)
            return
        try:
            doc: dict[str, Any] = json.loads(value)
            self._manifests[key] = _Manifest(
                int(doc["length"]), int(doc["chunks"]), int(doc["chunk_bytes"]), str(doc["sha256"])
            )
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable checkpoint manifest passed over", extra={"topic": self.topic, "key": key[:200]})

    def _complete(self, name: str, m: _Manifest) -> bool:
        return all(f"{name}/{i:06d}" in self._chunks for i in range(m.chunks))

    def names(self) -> list[str]:
        self._refresh()
        return sorted(n for n, m in self._manifests.items() if self._complete(n, m))

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        self._refresh()
        m = self._manifests.get(name)
        if m is None or not self._complete(name, m):
            raise FileNotFoundError(f"{self.describe()}: no checkpoint {name}")
        end = m.length if length is None else min(m.length, start + length)
        if start >= end:
            return b""
        # Only the chunks that cover [start, end): a header read fetches one.
        first, last = start // m.chunk_bytes, (end - 1) // m.chunk_bytes
        data = b"".join(self._fetch(f"{name}/{i:06d}") for i in range(first, last + 1))
        offset = first * m.chunk_bytes
        return data[start - offset : end - offset]

    def _fetch(self, key: str) -> bytes:
        consumer = self._consumer
        assert consumer is not None
        offset = self._chunks[key]
        consumer.assign([TopicPartition(self.topic, 0, offset)])
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for msg in consumer.consume(1, 0.5):
                if msg.error() is None and msg.offset() == offset:
                    return msg.value() or b""
        raise OSError(f"checkpoint topic {self.topic}: chunk {key} at offset {offset} not read in {self.timeout_s}s")
