"""Small Kafka helpers for integration tests: produce, read back, offsets, run the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]


def produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]], partition: int | None = None
) -> int:
    """Produce (key, value) pairs in order and wait for every acknowledgement."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    errors: list[Any] = []
    n = 0
    for key, value in records:
        kwargs: dict[str, Any] = {
            "key": key,
            "value": value,
            "on_delivery": lambda e, m: errors.append(e) if e else None,
        }
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, **kwargs)
        n += 1
    assert producer.flush(30) == 0, "produce did not finish"
    assert not errors, errors
    return n


def read_all(
    bootstrap: str, topic: str, expected: int | None = None, timeout: float = 60.0, idle: float = 3.0
) -> list[Message]:
    """Read a topic from the beginning (read_committed) until ``expected`` records
    arrived, or, with no expectation, until nothing new came for ``idle`` seconds."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None:
                    out.append(msg)
                    last_new = time.monotonic()
            if expected is not None and len(out) >= expected:
                # Linger briefly so duplicates beyond the expectation are seen too.
                for msg in consumer.consume(500, 1.0):
                    if msg.error() is None:
                        out.append(msg)
                break
            if expected is None and out and time.monotonic() - last_new > idle:
                break
    finally:
        consumer.close()
    return out


#: What a broker answers while a group's coordinator is being elected or loaded: ask again.
_TRANSIENT = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                        KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT})  # fmt: skip


def committed(bootstrap: str, group: str, topics: Mapping[str, int]) -> dict[tuple[str, int], int]:
    """Committed offsets of ``group`` for every partition of ``topics`` (name -> partition count)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return _committed(bootstrap, group, topics)
        except KafkaException as exc:
            if exc.args[0].code() not in _TRANSIENT or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _committed(bootstrap: str, group: str, topics: Mapping[str, int]) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
        return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=10)}
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topics: Mapping[str, int]) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offsets"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t, n in topics.items()
            for p in range(n)
        }
    finally:
        consumer.close()


def stream_cli(*args: str, env: Mapping[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m stream ARGS`` as a real subprocess (its stderr logs go to ``log``)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("STREAM_BOOTSTRAP_SERVERS", None)
    stderr = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "stream", *args], cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Signal the process and return its exit code (raises if it does not exit in time)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def group_toml(prefix: str, bootstrap: str, group: str, partitions: int) -> str:
    """The ``[kafka]``, ``[kafka.consumer]`` and ``[topics]`` tables every Kafka test's config starts
    with: its own topics (``<prefix>-clicks`` ...), its own group, a short session timeout."""
    return f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"

[kafka.consumer]
"session.timeout.ms" = 6000

[topics]
clicks = "{prefix}-clicks"
purchases = "{prefix}-purchases"
prices = "{prefix}-prices"
fraud_labels = "{prefix}-fraud-labels"
searches = "{prefix}-searches"
dead_letters = "{prefix}-dead-letters"
partitions = {partitions}
"""
