"""A backlog is learned like a live stream (real broker, real ``stream run``).

The simulated shop's history is produced to the topics (3 partitions each, keyed as the contracts say,
record timestamps = event time) before the service starts, so it meets a backlog: whole fetches of one
partition arrive before the next. The risk learner joins fraud labels (keyed by order) to the purchases
they answer (keyed by user) on event time; read in fetch order, labels run hours of event time ahead of
their purchases and are "late", and the supervised model never sees them. With the partitions aligned
on event time (``[processing] align``, the default) it learns at least 98 % of the labelled orders a
broker-less run over the same events in event-time order learns.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from kafka_util import committed, end_offsets, group_toml, stop, stream_cli
from test_run_loop import wait_for

from stream.backtest import run_backtest
from stream.config import parse_config
from stream.demo import simulated_records
from stream.simulate import SimConfig, Simulation
from stream.state import CheckpointStore, LocalStorage
from stream.task_state import ScopedStorage

pytestmark = pytest.mark.kafka

PARTITIONS = 3
EVENTS = 20_000


def shop(start_ts: int) -> SimConfig:
    # Frauds far more often than in a real shop, so a short stream labels a few hundred orders.
    return SimConfig(seed=5, events=EVENTS, n_users=2_000, n_items=300, fraud_rate=0.3, start_ts=start_ts)


def config_text(prefix: str, bootstrap: str, group: str, checkpoints: Path, align: bool) -> str:
    return group_toml(prefix, bootstrap, group, PARTITIONS) + f"""
[processing]
commit_interval_s = 0.5
align = {str(align).lower()}

[metrics]
port = 0

[checkpoints]
dir = "{checkpoints}"

[learners.risk]
kind = "risk"
output_topic = "{prefix}-risk-scores"
label_window_s = 14400
fraud_weight = 20.0
min_labels = 200
min_fraud_labels = 10
model = {{ class = "linear_model.LogisticRegression" }}
"""


def learned_labels(prefix: str, bootstrap: str, tmp: Path, align: bool, name: str) -> dict[str, int]:
    group = f"{prefix}-{name}"
    cfg = tmp / f"{name}.toml"
    cfg.write_text(config_text(prefix, bootstrap, group, tmp / name, align))
    log = tmp / f"{name}.log"
    topics = {f"{prefix}-{t}": PARTITIONS for t in ("purchases", "fraud-labels")}  # what the risk learner reads
    proc = stream_cli("run", "--config", str(cfg), log=log)
    try:
        wait_for(lambda: committed(bootstrap, group, topics) == end_offsets(bootstrap, topics),
                 timeout=180, what=f"{name} to learn the backlog")  # fmt: skip
    finally:
        assert stop(proc, timeout=60) == 0, log.read_text()[-3000:]
    # One task per partition number; the fraud labels are a global table every task receives.
    stats: dict[str, int] = {}
    for task in range(PARTITIONS):
        latest = CheckpointStore(ScopedStorage(LocalStorage(tmp / name / group), task)).latest()
        assert latest is not None, f"task {task}: no checkpoint"
        mine = dict(latest.learner("risk").label_stats())  # type: ignore[union-attr]
        stats["received"] = mine["received"]  # every task receives every label
        stats["joined"] = stats.get("joined", 0) + mine["joined"]  # each joins the orders it scored
    return stats


def test_a_backlog_learns_the_labels_a_live_stream_does(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    start_ts = int(time.time() * 1000) - 3 * 86_400_000  # recent: within the topics' time retention
    prefix = topic_prefix
    config = parse_config({"learners": {"risk": {"kind": "risk", "output_topic": "risk-scores",
                                                 "label_window_s": 14400, "fraud_weight": 20.0,
                                                 "min_labels": 200, "min_fraud_labels": 10,
                                                 "model": {"class": "linear_model.LogisticRegression"}}}})  # fmt: skip
    _, run = run_backtest(simulated_records(Simulation(shop(start_ts)), config.input_topics()), config,
                                  progress=False)  # fmt: skip
    want = dict(run.learners[0].label_stats())
    assert want["joined"] >= 100, want

    names = {s: f"{prefix}-{t}" for s, t in config.input_topics().items()}
    cfg = tmp_path / "topics.toml"
    cfg.write_text(config_text(prefix, kafka_bootstrap, f"{prefix}-admin", tmp_path, True))
    assert stream_cli("topics", "create", "--config", str(cfg), log=tmp_path / "topics.log").wait(60) == 0
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for stream, key, value, ts in Simulation(shop(start_ts)):
        producer.produce(names[stream], value, key, timestamp=ts)
        producer.poll(0)
    assert producer.flush(60) == 0

    aligned = learned_labels(prefix, kafka_bootstrap, tmp_path, True, "aligned")
    fetch_order = learned_labels(prefix, kafka_bootstrap, tmp_path, False, "fetch-order")
    report = f"broker-less {want}, aligned {aligned}, fetch order {fetch_order}"
    assert aligned["received"] == want["received"], report
    assert aligned["joined"] >= 0.98 * want["joined"], report
