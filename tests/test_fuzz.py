"""Fuzzing the real ``stream run`` against a real broker: it never goes down on one record.

A corpus of bad records generated from the event contracts (``tests/corpus.py``:
every field of every contract with a wrong type, missing, null, NaN/Infinity,
1e400, 400-digit integers, out of bounds, lone surrogates, invalid UTF-8; random
bytes, truncated JSON, trailing garbage, nesting 10,000 deep, empty values,
tombstones, null keys; values over the producer's limit, the dead-letter topic's
limit and the broker's), shuffled (seeded) among good records across the five
input topics. The process must stay up, dead-letter each bad record exactly
once with its provenance (oversized ones cut, with the original's size and
sha256), and publish exactly one output per good record.

The three reproducers of the issue go through the real loop too, each with a
restart after it: no crash loop, one dead letter across the restart, offsets
committed past the record.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, Producer
from corpus import EVENT_TYPES, Bad, bad_records, good_doc, good_key, huge, is_valid
from kafka_broker import create_topics
from kafka_util import committed, end_offsets, group_toml, read_all, stop, stream_cli

from stream.events import Decoder, InvalidEvent
from stream.pipeline import H_TRUNCATED, H_VALUE_SHA256, H_VALUE_SIZE

pytestmark = pytest.mark.kafka

PARTITIONS = 2
#: The dead-letter topic's own limit, lower than the producer's 1,000,000 bytes.
DL_TOPIC_MAX = 400_000
#: Input topics accept more than the broker's default (10 MiB in tests/kafka_broker.py).
INPUT_TOPIC_MAX = 16 * 1024 * 1024
TOPIC_SUFFIX = {"clicks": "clicks", "purchases": "purchases", "prices": "prices", "fraud_labels": "fraud-labels",
                "searches": "searches"}  # fmt: skip


def config_text(
    prefix: str, bootstrap: str, group: str, ckpt: Path, partitions: int = PARTITIONS, guarantee: str = "at_least_once"
) -> str:
    return group_toml(prefix, bootstrap, group, partitions) + f"""
[processing]
guarantee = "{guarantee}"
batch_size = 200
commit_interval_s = 0.5
shutdown_timeout_s = 10.0

[metrics]
port = 0

[checkpoints]
dir = "{ckpt}"

[learners.click_price]
kind = "custom"
input = "clicks"
output_topic = "{prefix}-out-clicks"
label = "price"
task = "regression"
features = ["category"]
model = {{ class = "linear_model.LinearRegression" }}

[learners.order_size]
kind = "custom"
input = "purchases"
output_topic = "{prefix}-out-purchases"
label = "quantity"
task = "regression"
features = ["payment_method"]
model = {{ class = "linear_model.LinearRegression" }}

[learners.stock_price]
kind = "custom"
input = "prices"
output_topic = "{prefix}-out-prices"
label = "price"
task = "regression"
features = ["stock"]
model = {{ class = "linear_model.LinearRegression" }}

[learners.ranking]
kind = "ranking"
output_topic = "{prefix}-out-searches"

[learners.fraud_rate]
kind = "custom"
input = "fraud_labels"
output_topic = "{prefix}-out-fraud-labels"
label = "is_fraud"
task = "binary"
model = {{ class = "linear_model.LogisticRegression" }}
"""


Source = tuple[str, int, int]


def produce_all(bootstrap: str, records: list[tuple[str, bytes | None, bytes | None]]) -> list[Source]:
    """Produce in order; returns where each record landed (topic, partition, offset)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
         "message.max.bytes": 32 * 1024 * 1024, "compression.type": "none"}
    )  # fmt: skip
    where: list[Source | None] = [None] * len(records)
    errors: list[Any] = []

    def report(i: int) -> Callable[[Any, Message], None]:
        def cb(err: Any, msg: Message) -> None:
            if err is not None:
                errors.append((i, err))
            else:
                where[i] = (msg.topic(), msg.partition(), msg.offset())  # type: ignore[assignment]

        return cb

    for i, (topic, key, value) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report(i))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(120) == 0, "produce did not finish"
    assert not errors, errors[:5]
    return [w for w in where if w is not None]


def dead_letter_source(msg: Message) -> Source:
    h = {k: v.decode() for k, v in msg.headers() or []}
    return h["stream.source.topic"], int(h["stream.source.partition"]), int(h["stream.source.offset"])


def output_sources(messages: list[Message]) -> Counter[Source]:
    out: Counter[Source] = Counter()
    for m in messages:
        src = json.loads(m.value())["source"]
        out[(src["topic"], src["partition"], src["offset"])] += 1
    return out


def wait_for(predicate: Callable[[], bool], proc: Any, log: Path, timeout: float = 90.0, what: str = "") -> None:
    """Wait on an event (offsets committed, counts reached), failing at once if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"stream run exited ({proc.returncode}) while waiting for {what}:\n" + (log.read_text()[-3000:])
        )
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-2000:]}")


def check_dead_letter(msg: Message, bad: Bad) -> None:
    """Key and value untouched, or cut with headers naming the original's size and sha256."""
    h = dict(msg.headers() or [])
    assert h["stream.stage"] in (b"decode", b"validate"), (bad.kind, h)
    assert h["stream.error"], bad.kind
    if H_TRUNCATED not in h:
        assert msg.value() == bad.value and msg.key() == bad.key, bad.kind
        return
    parts = h[H_TRUNCATED].decode().split(",")
    if "value" in parts:
        assert bad.value is not None
        assert h[H_VALUE_SIZE] == str(len(bad.value)).encode(), bad.kind
        assert h[H_VALUE_SHA256] == hashlib.sha256(bad.value).hexdigest().encode(), bad.kind
        assert bad.value.startswith(msg.value()) and len(msg.value()) < len(bad.value), bad.kind
    else:
        assert msg.value() == bad.value
    if "key" in parts:
        assert bad.key is not None and bad.key.startswith(msg.key()), bad.kind
    else:
        assert msg.key() == bad.key


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_fuzz_corpus_through_the_real_loop(
    guarantee: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    prefix, group = topic_prefix, f"{topic_prefix}-group"
    rng = random.Random(20_251_201)
    cfg = tmp_path / "stream.toml"
    cfg.write_text(config_text(prefix, kafka_bootstrap, group, tmp_path / "ckpt", guarantee=guarantee))
    log = tmp_path / "stream.log"
    inputs = {stream: f"{prefix}-{suffix}" for stream, suffix in TOPIC_SUFFIX.items()}
    create_topics(kafka_bootstrap, list(inputs.values()), PARTITIONS, {"max.message.bytes": str(INPUT_TOPIC_MAX)})
    create_topics(kafka_bootstrap, [f"{prefix}-dead-letters"], PARTITIONS, {"max.message.bytes": str(DL_TOPIC_MAX)})
    assert stream_cli("topics", "create", "--config", str(cfg), log=log).wait(60) == 0

    # The corpus: every kind of every contract (the big ones on two topics, to keep it quick),
    # the broker-sized ones once, and good records, shuffled across the five topics.
    bads: list[Bad] = []
    for stream in EVENT_TYPES:
        bads.extend(bad_records(stream, rng, big=stream in ("clicks", "purchases")))
    bads += [huge("clicks", 10_000_000), huge("prices", 11_000_000)]  # the broker's 10 MiB default, and over it
    for b in bads:
        assert not is_valid(b.stream, b.value) or len(b.value or b"") > 65536, b.kind
        with pytest.raises(InvalidEvent):
            Decoder(EVENT_TYPES[b.stream]).decode(b.value)
    goods = [(stream, good_doc(stream, i)) for stream in EVENT_TYPES for i in range(60)]
    items: list[tuple[str, Bad | None, bytes | None, bytes | None]] = [(b.stream, b, b.key, b.value) for b in bads] + [
        (s, None, good_key(s, d), json.dumps(d).encode()) for s, d in goods
    ]
    rng.shuffle(items)
    kinds = {b.kind for b in bads}
    assert len(bads) >= 400 and len(kinds) >= 150, (len(bads), len(kinds))

    where = produce_all(kafka_bootstrap, [(inputs[s], k, v) for s, _, k, v in items])
    bad_at = {src: item[1] for src, item in zip(where, items, strict=True) if item[1] is not None}
    good_at = {src for src, item in zip(where, items, strict=True) if item[1] is None}
    topics = {t: PARTITIONS for t in inputs.values()}
    ends = end_offsets(kafka_bootstrap, topics)

    started = time.monotonic()
    proc = stream_cli("run", "--config", str(cfg), log=log)
    try:
        wait_for(lambda: committed(kafka_bootstrap, group, topics) == ends, proc, log, what="every input committed")
        dead = read_all(kafka_bootstrap, f"{prefix}-dead-letters", expected=len(bads))
        outs = [m for t in TOPIC_SUFFIX.values() for m in read_all(kafka_bootstrap, f"{prefix}-out-{t}",
                                                                   expected=60)]  # fmt: skip
        assert proc.poll() is None, "stream run must stay up through every bad record"
    finally:
        code = stop(proc, signal.SIGTERM, timeout=30)
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]

    # Each bad record exactly once in dead-letters, with its provenance; nothing else there.
    by_source = Counter(dead_letter_source(m) for m in dead)
    assert set(by_source) == set(bad_at), set(by_source) ^ set(bad_at)
    assert max(by_source.values()) == 1
    assert len(dead) == len(bads)
    truncated = 0
    for msg in dead:
        bad = bad_at[dead_letter_source(msg)]
        check_dead_letter(msg, bad)
        truncated += H_TRUNCATED in dict(msg.headers() or [])
        assert len(msg) <= DL_TOPIC_MAX
    big = [b for b in bads if len(b.value or b"") + len(b.key or b"") > DL_TOPIC_MAX]
    assert truncated == len(big) >= 6

    # Each good record exactly one output, no output for a bad one.
    assert output_sources(outs) == Counter(dict.fromkeys(good_at, 1))
    print(
        f"\nfuzz ({guarantee}): {len(bads)} bad records of {len(kinds)} kinds + {len(goods)} good; "
        f"{len(dead)} dead letters ({truncated} cut to fit), {len(outs)} outputs, 0 crashes; "
        f"stream run {elapsed:.1f}s"
    )


#: The issue's reproducers: (input stream, value).
REPRODUCERS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "huge_integer_ts": ("purchases", lambda: json.dumps({**good_doc("purchases", 0), "ts": 10**399}).encode()),
    "value_1040006_bytes": ("clicks", lambda: huge("clicks", 1_040_006).value or b""),
    "value_10MB": ("clicks", lambda: huge("clicks", 10_000_000).value or b""),
    "nesting_10000_deep": (
        "clicks",
        lambda: (
            json.dumps({**good_doc("clicks", 0), "extra": "NEST"})
            .encode()
            .replace(b'"NEST"', b"[" * 10_000 + b"]" * 10_000)
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(REPRODUCERS))
def test_poison_record_is_dead_lettered_once_across_a_restart(
    name: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    stream, make = REPRODUCERS[name]
    prefix, group = topic_prefix, f"{topic_prefix}-group"
    cfg = tmp_path / "stream.toml"
    cfg.write_text(config_text(prefix, kafka_bootstrap, group, tmp_path / "ckpt", partitions=1))
    log = tmp_path / "stream.log"
    topic = f"{prefix}-{TOPIC_SUFFIX[stream]}"
    create_topics(kafka_bootstrap, [topic], 1, {"max.message.bytes": str(INPUT_TOPIC_MAX)})
    assert stream_cli("topics", "create", "--config", str(cfg), log=log).wait(60) == 0
    value = make()
    key = b"poison"

    def good(i: int) -> tuple[str, bytes | None, bytes | None]:
        d = good_doc(stream, i)
        return topic, good_key(stream, d), json.dumps(d).encode()

    g1, (_, _, bad_offset), g2 = produce_all(kafka_bootstrap, [good(1), (topic, key, value), good(2)])
    topics = {topic: 1}
    out_topic = f"{prefix}-out-{TOPIC_SUFFIX[stream]}"
    dl_topic = f"{prefix}-dead-letters"

    def run_until_committed(n_good: int) -> None:
        proc = stream_cli("run", "--config", str(cfg), log=log)
        try:
            ends = end_offsets(kafka_bootstrap, topics)
            wait_for(lambda: committed(kafka_bootstrap, group, topics) == ends, proc, log, what="offsets committed")
            read_all(kafka_bootstrap, out_topic, expected=n_good)
            assert proc.poll() is None
        finally:
            assert stop(proc, signal.SIGTERM, timeout=30) == 0, log.read_text()[-3000:]

    run_until_committed(2)
    # The restart does not meet the record again (offsets are past it) and keeps running.
    (g3,) = produce_all(kafka_bootstrap, [good(3)])
    run_until_committed(3)

    dead = read_all(kafka_bootstrap, dl_topic, expected=1)
    assert [dead_letter_source(m) for m in dead] == [(topic, 0, bad_offset)]
    h = dict(dead[0].headers() or [])
    assert h["stream.stage"] in (b"decode", b"validate")
    if len(value) > 1_000_000:
        assert h[H_TRUNCATED] == b"value" and h[H_VALUE_SIZE] == str(len(value)).encode()
        assert h[H_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
        assert value.startswith(dead[0].value())
    else:
        assert dead[0].value() == value
    assert output_sources(read_all(kafka_bootstrap, out_topic, expected=3)) == Counter({g1: 1, g2: 1, g3: 1})
    assert committed(kafka_bootstrap, group, topics) == {(topic, 0): g3[2] + 1}
    text = log.read_text()
    assert "Traceback" not in text and text.count("partitions assigned") == 2, text[-3000:]
