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


def test_dead_letter_refused_by_the_topic_is_cut_further_and_delivered(kafka_bootstrap: str, unique_topics) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from stream.pipeline import H_TRUNCATED, H_VALUE_SHA256, H_VALUE_SIZE, DeadLetterBudget

    (topic,) = unique_topics("dl-small")
    create_topics(kafka_bootstrap, [topic], config={"max.message.bytes": "20000"})
    budget = DeadLetterBudget()  # unknown up front: discovered by the refusal
    sink = KafkaSink(Producer({"bootstrap.servers": kafka_bootstrap}), dead_letter_topic=topic, budget=budget)
    value = bytes(range(256)) * 200  # 51,200 bytes, compresses little
    sink.produce(topic, b"k", value, [("stream.stage", b"decode"), ("stream.source.offset", b"7")])
    sink.produce(topic, b"k2", b"small", [("stream.stage", b"decode")])
    assert sink.flush(30)
    # The small one may have been refused with the big one (one batch): produced again, uncut.
    assert sink.recut >= 1 and budget.max_bytes is not None and budget.max_bytes < 20000
    got = read_all(kafka_bootstrap, topic, expected=2)
    assert len(got) == 2
    cut = next(m for m in got if m.key() == b"k")
    h = dict(cut.headers())
    assert h[H_TRUNCATED] == b"value" and h[H_VALUE_SIZE] == b"51200"
    assert h[H_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert h["stream.source.offset"] == b"7" and value.startswith(cut.value())
    small = next(m for m in got if m.key() == b"k2")
    assert small.value() == b"small" and H_TRUNCATED not in dict(small.headers())


def test_dead_letter_refused_in_a_transaction_fails_it_and_lowers_the_budget(
    kafka_bootstrap: str, unique_topics
) -> None:  # type: ignore[no-untyped-def]
    from stream.pipeline import DeadLetterBudget

    (topic,) = unique_topics("dl-txn")
    create_topics(kafka_bootstrap, [topic], config={"max.message.bytes": "20000"})
    budget = DeadLetterBudget(900_000)
    sink = KafkaSink(Producer({"bootstrap.servers": kafka_bootstrap}), topic, budget, transactional=True)
    sink.produce(topic, b"k", bytes(range(256)) * 200, [("stream.stage", b"decode")])
    # The transaction must abort; the record is dead-lettered again, cut to the lowered budget, when reprocessed.
    with pytest.raises(DeliveryFailed, match="MSG_SIZE_TOO_LARGE"):
        sink.flush(30)
    assert budget.max_bytes is not None and budget.max_bytes < 51_200


def test_record_over_the_producer_limit_raises_record_too_large(kafka_bootstrap: str, unique_topics) -> None:  # type: ignore[no-untyped-def]
    from stream.pipeline import RecordTooLarge

    (topic,) = unique_topics("big")
    create_topics(kafka_bootstrap, [topic])
    sink = KafkaSink(Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 10_000}))
    with pytest.raises(RecordTooLarge) as info:
        sink.produce(topic, b"k", b"x" * 20_000)
    assert info.value.size > 20_000


def test_a_batch_is_timed_to_its_outputs_acknowledged_by_the_broker(kafka_bootstrap: str, unique_topics) -> None:  # type: ignore[no-untyped-def]
    """The pipeline's own share of the latency (see KafkaSink.consumed): the broker's time of
    acknowledgement lies between the batch consumed and the flush that returned."""
    import time

    (topic,) = unique_topics("acks")
    create_topics(kafka_bootstrap, [topic])
    sink = KafkaSink(Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5}))
    reports: list[tuple[float, int]] = []
    sink.on_acknowledged = lambda seconds, records: reports.append((seconds, records))
    consumed_at = time.time()
    for i in range(5):
        sink.produce(topic, None, f"v{i}".encode())
    sink.consumed(consumed_at, records=5)
    assert sink.flush(30)
    flushed_after = time.time() - consumed_at
    ((seconds, records),) = reports
    assert records == 5 and 0.0 <= seconds <= flushed_after + 0.001  # CreateTime is whole ms
