"""The real ``stream run`` loop against a real broker (at-least-once).

Valid events of every type yield exactly one output each; every kind of bad
input lands once in the dead-letter topic with its provenance and the loop
keeps going; SIGTERM drains and commits; a restart with the same group
resumes right after the last committed offset.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Message
from kafka_util import committed, end_offsets, group_toml, produce, read_all, stop, stream_cli

pytestmark = pytest.mark.kafka

PARTITIONS = 2
TS = 1_700_000_000_000


def config_text(prefix: str, bootstrap: str, group: str) -> str:
    return group_toml(prefix, bootstrap, group, PARTITIONS) + f"""
[processing]
batch_size = 100
commit_interval_s = 0.5
max_value_bytes = 2048
shutdown_timeout_s = 5.0

[metrics]
port = 0

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
model = [{{ class = "preprocessing.StandardScaler" }}, {{ class = "linear_model.LinearRegression" }}]

[learners.stock_price]
kind = "custom"
input = "prices"
output_topic = "{prefix}-out-prices"
label = "price"
task = "regression"
features = ["cost", "stock"]
model = {{ class = "linear_model.LinearRegression" }}

[learners.fraud_rate]
kind = "custom"
input = "fraud_labels"
output_topic = "{prefix}-out-fraud-labels"
label = "is_fraud"
task = "binary"
model = {{ class = "linear_model.LogisticRegression" }}
"""


def good_events(n: int, start: int = 0) -> dict[str, list[tuple[bytes, bytes]]]:
    events: dict[str, list[tuple[bytes, bytes]]] = {"clicks": [], "purchases": [], "prices": [], "fraud-labels": []}
    for i in range(start, start + n):
        user, item, order = f"u{i % 7}", f"i{i % 5}", f"o{i}"
        events["clicks"].append(
            (
                user.encode(),
                json.dumps(
                    {
                        "event_id": f"c{i}",
                        "ts": TS + i,
                        "user_id": user,
                        "item_id": item,
                        "category": f"cat{i % 3}",
                        "price": 10.0 + i % 4,
                    }
                ).encode(),
            )
        )
        events["purchases"].append(
            (
                user.encode(),
                json.dumps(
                    {
                        "event_id": f"p{i}",
                        "ts": TS + i,
                        "order_id": order,
                        "user_id": user,
                        "item_id": item,
                        "quantity": 1 + i % 3,
                        "unit_price": 5.0 + i % 2,
                        "payment_method": "card",
                    }
                ).encode(),
            )
        )
        events["prices"].append(
            (
                item.encode(),
                json.dumps(
                    {
                        "event_id": f"r{i}",
                        "ts": TS + i,
                        "item_id": item,
                        "price": 20.0 + i % 6,
                        "cost": 12.0,
                        "stock": i % 9,
                    }
                ).encode(),
            )
        )
        events["fraud-labels"].append(
            (
                order.encode(),
                json.dumps({"event_id": f"l{i}", "ts": TS + i, "order_id": order, "is_fraud": i % 10 == 0}).encode(),
            )
        )
    return events


#: One record of every kind of bad input, by the stage that must reject it.
BAD_CLICKS: list[tuple[bytes | None, bytes | None, str]] = [
    (b"u1", b"{this is not json", "decode"),
    (b"u1", b'{"event_id": "b2", "ts": 1, "user_id": "\xff\xfe", "item_id": "i1"}', "decode"),
    (b"u1", json.dumps({"event_id": "b3", "ts": TS, "user_id": "u1"}).encode(), "validate"),
    (b"u1", json.dumps({"event_id": "b4", "ts": "now", "user_id": "u1", "item_id": "i1"}).encode(), "validate"),
    (b"u1", b'{"event_id": "b5", "ts": 1, "user_id": "u1", "item_id": "i1", "price": NaN}', "decode"),
    (b"u1", b'{"event_id": "b6", "ts": 1, "user_id": "u1", "item_id": "i1", "price": 1e999}', "validate"),
    (
        b"u1",
        json.dumps({"event_id": "b7", "ts": TS, "user_id": "u1", "item_id": "i1", "price": -3}).encode(),
        "validate",
    ),
    (
        b"u1",
        json.dumps({"event_id": "b8", "ts": TS, "user_id": "u1", "item_id": "i1", "pad": "x" * 4096}).encode(),
        "decode",
    ),
    (b"u1", None, "decode"),
    # Valid, but the learner cannot learn without its label: predicted, then dead-lettered at `learn`.
    (b"u1", json.dumps({"event_id": "b10", "ts": TS, "user_id": "u1", "item_id": "i1"}).encode(), "learn"),
]


def topic_map(prefix: str) -> dict[str, int]:
    names = [
        "clicks",
        "purchases",
        "prices",
        "fraud-labels",
        "dead-letters",
        "out-clicks",
        "out-purchases",
        "out-prices",
        "out-fraud-labels",
    ]
    return {f"{prefix}-{n}": PARTITIONS for n in names}


def by_source(messages: list[Message]) -> Counter[tuple[str, int, int]]:
    keys = []
    for m in messages:
        src = json.loads(m.value())["source"]
        keys.append((src["topic"], src["partition"], src["offset"]))
    return Counter(keys)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_outputs_dead_letters_sigterm_and_resume(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    prefix, group = topic_prefix, f"{topic_prefix}-group"
    cfg = tmp_path / "stream.toml"
    cfg.write_text(config_text(prefix, kafka_bootstrap, group))
    log = tmp_path / "stream.log"

    # `stream topics create` creates every topic and is idempotent.
    assert stream_cli("topics", "create", "--config", str(cfg), log=log).wait(60) == 0
    assert stream_cli("topics", "create", "--config", str(cfg), log=log).wait(60) == 0
    n = 40
    events = good_events(n)
    for name, records in events.items():
        produce(kafka_bootstrap, f"{prefix}-{name}", records)
    produce(kafka_bootstrap, f"{prefix}-clicks", [(k, v) for k, v, _ in BAD_CLICKS], partition=0)

    proc = stream_cli("run", "--config", str(cfg), log=log)
    try:
        n_learn_fail = sum(1 for *_, stage in BAD_CLICKS if stage == "learn")
        dlq = read_all(kafka_bootstrap, f"{prefix}-dead-letters", expected=len(BAD_CLICKS))
        outs = {
            name: read_all(
                kafka_bootstrap, f"{prefix}-out-{name}", expected=n + (n_learn_fail if name == "clicks" else 0)
            )
            for name in events
        }
        assert proc.poll() is None, "the loop must keep running through bad input"
    finally:
        code = stop(proc, signal.SIGTERM, timeout=20)
    assert code == 0, log.read_text()[-3000:]

    # One output per good event, each for a distinct source offset, key = input key.
    for name, msgs in outs.items():
        expected = n + (n_learn_fail if name == "clicks" else 0)
        counts = by_source(msgs)
        assert len(msgs) == expected and max(counts.values()) == 1, name
        for m in msgs:
            doc = json.loads(m.value())
            assert set(doc) == {"event_id", "source", "learner", "model_version", "prediction", "predicted_at"}
            assert doc["source"]["topic"] == f"{prefix}-{name}"
        sent = {json.loads(v)["event_id"]: k for k, v in events[name]}
        assert all(
            m.key() == sent[json.loads(m.value())["event_id"]]
            for m in msgs
            if json.loads(m.value())["event_id"] in sent
        )

    # Each bad record once in the dead-letter topic, key and value untouched, with provenance.
    assert len(dlq) == len(BAD_CLICKS)
    seen = sorted(dlq, key=lambda m: int(dict(m.headers())["stream.source.offset"]))
    for msg, (key, value, stage) in zip(seen, BAD_CLICKS, strict=True):
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["stream.source.topic"] == f"{prefix}-clicks"
        assert headers["stream.source.partition"] == "0"
        assert headers["stream.stage"] == stage, headers
        assert headers["stream.error"] and int(headers["stream.source.timestamp"]) > 0
        assert msg.key() == key and msg.value() == value
    assert dict(seen[-1].headers())["stream.learner"] == b"click_price"

    # SIGTERM drained and committed everything consumed.
    topics = {f"{prefix}-{t}": PARTITIONS for t in events}
    assert committed(kafka_bootstrap, group, topics) == end_offsets(kafka_bootstrap, topics)

    # Restart with the same group: only the new events are processed.
    more = good_events(10, start=n)
    for name, records in more.items():
        produce(kafka_bootstrap, f"{prefix}-{name}", records)
    proc = stream_cli("run", "--config", str(cfg), log=log)
    try:
        wait_for(
            lambda: committed(kafka_bootstrap, group, topics) == end_offsets(kafka_bootstrap, topics),
            what="the restarted run to commit the new events",
        )
    finally:
        assert stop(proc) == 0
    for name in events:
        msgs = read_all(kafka_bootstrap, f"{prefix}-out-{name}")
        counts = by_source(msgs)
        expected = n + 10 + (n_learn_fail if name == "clicks" else 0)
        assert len(msgs) == expected and max(counts.values()) == 1, (name, len(msgs))
    assert "partitions assigned" in log.read_text()


def test_run_waits_for_a_broker_that_is_down(tmp_path: Path) -> None:
    """No broker at start: the loop logs and retries instead of exiting, and SIGTERM still stops it cleanly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text("down", dead, "g"))
    log = tmp_path / "down.log"
    proc = stream_cli("run", "--config", str(cfg), log=log)
    try:
        wait_for(lambda: "broker unavailable, retrying" in log.read_text(), timeout=30, what="retry log")
        assert proc.poll() is None
    finally:
        code = stop(proc, timeout=15)
    assert code == 0
    line = next(json.loads(x) for x in log.read_text().splitlines() if "broker unavailable" in x)
    assert line["bootstrap_servers"] == dead and line["retry_in_s"] > 0
